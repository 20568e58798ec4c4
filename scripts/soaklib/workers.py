"""The three workers: the same binary and the same options; the third runs inside the network
namespace. Their stderr goes to workers/<name>.log (appended across restarts)."""

import os
import signal
import subprocess
import time

GRACE_PERIOD_S = 10


class Worker:
    def __init__(self, name, binary, options, log_dir, prefix=()):
        self.name = name
        self.args = [*prefix, str(binary), "worker", *options]
        self.log_path = log_dir / f"{name}.log"
        self.proc = None
        self.starts = 0

    def start(self):
        log = open(self.log_path, "ab")
        log.write(f"==== soak: start {self.starts + 1} at {time.time():.3f}\n".encode())
        log.flush()
        self.proc = subprocess.Popen(self.args, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                     start_new_session=True)
        log.close()
        self.starts += 1

    def signal(self, sig):
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, sig)

    def kill(self):
        self.signal(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait()

    def terminate(self, timeout=GRACE_PERIOD_S + 10):
        """SIGTERM, then wait for the worker to finish its jobs and exit; returns its status."""
        self.signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return "killed after the grace period"

    def alive(self):
        return self.proc is not None and self.proc.poll() is None


def options(urls, connectors_dir):
    return ["--amqp-url", ",".join(urls), "--queue", "soak.jobs", "--queue-type", "quorum",
            "--delivery-limit", "5", "--dead-letter-queue", "soak.dead", "--connectors", str(connectors_dir),
            "--prefetch", "64", "--grace-period", str(GRACE_PERIOD_S),
            "--max-content-bytes", "65536", "--idle-timeout", "60"]
