"""Runs forward.py as a child process and sends it commands."""

import pathlib
import subprocess
import sys
import threading

FORWARD = pathlib.Path(__file__).with_name("forward.py")


class Forwarder:
    def __init__(self, name, maps, log_dir, prefix=()):
        """`maps`: [(listen_host, listen_port, target_host, target_port)]; `prefix`: e.g.
        `ip netns exec NS` to run it inside a namespace."""
        self.name = name
        args = [*prefix, sys.executable, str(FORWARD)]
        for lh, lp, th, tp in maps:
            args += ["--map", f"{lh}:{lp}={th}:{tp}"]
        err = open(log_dir / f"forward-{name}.log", "ab")
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err,
                                     text=True, start_new_session=True)
        err.close()
        self._lock = threading.Lock()
        line = self.proc.stdout.readline()
        if line.strip() != "ready":
            raise RuntimeError(f"forwarder {name} did not start (see forward-{name}.log)")

    def command(self, cmd):
        with self._lock:
            self.proc.stdin.write(cmd + "\n")
            self.proc.stdin.flush()
            self.proc.stdout.readline()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
