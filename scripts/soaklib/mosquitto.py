"""A private Mosquitto on its own port, config and log; killed and started again on the same
port, stopped and continued (SIGSTOP/SIGCONT) by the faults."""

import os
import signal
import subprocess
import time

from .ports import free_port, port_open


class Mosquitto:
    def __init__(self, name, base_dir, extra_conf="", tls=None):
        """`tls`: the paths from certs.generate, or None for plain TCP. `extra_conf` follows the
        listener line (max_qos is a listener option: before any listener it would open 1883)."""
        self.name = name
        self.dir = base_dir / f"mosquitto-{name}"
        self.dir.mkdir(parents=True)
        self.port = free_port()
        self.tls = tls
        self.proc = None
        tls_lines = ""
        if tls:
            tls_lines = (f"cafile {tls['ca.crt']}\ncertfile {tls['server.crt']}\n"
                         f"keyfile {tls['server.key']}\nrequire_certificate false\n")
        self.conf = self.dir / "mosquitto.conf"
        # `user root`: a soak run as root must not drop to the mosquitto user (it could not read
        # its directory). No persistence: a killed broker comes back empty, as after a crash.
        self.conf.write_text("user root\npersistence false\n"
                             f"log_dest file {self.dir}/mosquitto.log\n"
                             "log_type error\nlog_type warning\nlog_type notice\nlog_type information\n"
                             "connection_messages true\nlog_timestamp_format %Y-%m-%dT%H:%M:%S\n"
                             "max_inflight_messages 0\nmax_queued_messages 100000\n"
                             f"listener {self.port} 127.0.0.1\nallow_anonymous true\n{extra_conf}{tls_lines}")

    def start(self):
        out = open(self.dir / "stderr.log", "ab")
        self.proc = subprocess.Popen(["mosquitto", "-c", str(self.conf)], stdin=subprocess.DEVNULL,
                                     stdout=out, stderr=out, start_new_session=True)
        out.close()
        deadline = time.time() + 15
        while not port_open(self.port):
            if self.proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"mosquitto {self.name} did not start on {self.port}; see {self.dir}")
            time.sleep(0.05)

    def kill(self):
        if self.proc is not None:
            try:
                os.kill(self.proc.pid, signal.SIGCONT)
                self.proc.kill()
            except ProcessLookupError:
                pass
            self.proc.wait()
            self.proc = None

    def signal(self, sig):
        if self.proc is not None:
            os.kill(self.proc.pid, sig)

    def restart(self):
        """Started again on its port (a killed listener's port is free at once; retried while
        the kernel still holds it)."""
        self.kill()
        for _ in range(50):
            try:
                self.start()
                return
            except RuntimeError:
                time.sleep(0.2)
        raise RuntimeError(f"mosquitto {self.name} could not start again on {self.port}")
