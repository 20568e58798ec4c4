"""Free loopback ports."""

import socket

_given = set()


def free_port():
    """A port nobody listens on right now on 127.0.0.1, never the same twice in one soak."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _given:
            _given.add(port)
            return port


def port_open(port, host="127.0.0.1"):
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False
