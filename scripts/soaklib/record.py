"""The run directory's JSON-lines files, written from many threads."""

import json
import threading
import time


class Recorder:
    """One JSONL file per name (`jobs`, `replies`, ...) under the run directory; each line is
    flushed at once so a crash keeps everything written so far."""

    def __init__(self, run_dir):
        self.run_dir = run_dir
        self._lock = threading.Lock()
        self._files = {}

    def write(self, name, record):
        line = json.dumps(record, ensure_ascii=False) + "\n"
        with self._lock:
            f = self._files.get(name)
            if f is None:
                f = open(self.run_dir / f"{name}.jsonl", "a", encoding="utf-8")
                self._files[name] = f
            f.write(line)
            f.flush()

    def fault(self, kind, target, detail, t_start, t_end=None):
        self.write("faults", {"t_start": t_start, "t_end": t_end if t_end is not None else time.time(),
                              "kind": kind, "target": target, "detail": detail})

    def close(self):
        with self._lock:
            for f in self._files.values():
                f.close()
            self._files.clear()


def log(message):
    """Progress on stdout, with the wall-clock time (UTC)."""
    print(time.strftime("%H:%M:%S", time.gmtime()) + " soak: " + message, flush=True)
