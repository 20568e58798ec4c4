"""Tests of the soak's TCP forwarder (scripts/soaklib/forward.py) against a local echo server:
relaying, latency, stop listening and listen again, reset, and a target it cannot reach.
Run: python3 -m unittest scripts/test_soak_forward.py"""

import pathlib
import socket
import sys
import tempfile
import threading
import time
import unittest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from soaklib.ports import free_port  # noqa: E402
from soaklib.proxy import Forwarder  # noqa: E402


def echo_server():
    server = socket.create_server(("127.0.0.1", 0))

    def serve():
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            threading.Thread(target=lambda c=conn: [c.sendall(d) for d in iter(lambda: c.recv(4096), b"")],
                             daemon=True).start()
    threading.Thread(target=serve, daemon=True).start()
    return server


class ForwarderTest(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.TemporaryDirectory()
        self.echo = echo_server()
        self.port = free_port()
        self.f = Forwarder("test", [("127.0.0.1", self.port, "127.0.0.1", self.echo.getsockname()[1])],
                           pathlib.Path(self.dir.name))

    def tearDown(self):
        self.f.stop()
        self.echo.close()
        self.dir.cleanup()

    def roundtrip(self, data=b"ping"):
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
            started = time.monotonic()
            s.sendall(data)
            got = b""
            while len(got) < len(data):
                got += s.recv(4096)
            return got, time.monotonic() - started

    def test_relays_both_ways(self):
        self.assertEqual(self.roundtrip()[0], b"ping")

    def test_latency_delays_each_direction(self):
        self.f.command("latency 200")
        got, took = self.roundtrip()
        self.assertEqual(got, b"ping")
        self.assertGreaterEqual(took, 0.4)
        self.f.command("normal")
        self.assertLess(self.roundtrip()[1], 0.2)

    def test_close_refuses_and_open_accepts_again(self):
        self.f.command("close")
        with self.assertRaises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", self.port), timeout=5)
        self.f.command("open")
        self.assertEqual(self.roundtrip()[0], b"ping")

    def test_reset_aborts_open_connections(self):
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
            s.sendall(b"x")
            self.assertEqual(s.recv(1), b"x")
            self.f.command("reset")
            with self.assertRaises(ConnectionResetError):
                s.sendall(b"y")
                s.recv(1)


class UnreachableTargetTest(unittest.TestCase):
    def test_connection_stays_silent_instead_of_reset(self):
        with tempfile.TemporaryDirectory() as d:
            port = free_port()
            f = Forwarder("unreachable", [("127.0.0.1", port, "127.0.0.1", free_port())], pathlib.Path(d))
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                    s.settimeout(1.5)
                    s.sendall(b"hello")
                    # Neither data, nor EOF, nor a reset: the client waits, as for a lost SYN.
                    with self.assertRaises(socket.timeout):
                        s.recv(1)
            finally:
                f.stop()


if __name__ == "__main__":
    unittest.main()
