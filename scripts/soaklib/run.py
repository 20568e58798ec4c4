"""scripts/soak: argument parsing, the run directory, the load loop and the end of a run."""

import argparse
import datetime
import json
import os
import pathlib
import random
import signal
import subprocess
import sys
import threading
import time

from . import amqp
from .faults import Faults
from .load import Mix
from .record import Recorder, log
from .system import WORKERS, System

REPO = pathlib.Path(__file__).resolve().parents[2]
# RabbitMQ 3.10 publishes a job it could not dead-letter at once (at least once) again about 3
# minutes later: a run waits that long for its last jobs rather than count them lost.
QUIET_MAX_S = 240
# How long after its timeout a job may still be answered: the workers retry a reply RabbitMQ
# will not take for 30 s (then dead-letter it), plus a paused full reply queue or an alarm.
ANSWER_BOUND_S = 45


def parse():
    p = argparse.ArgumentParser(prog="scripts/soak", description=__doc__)
    p.add_argument("--minutes", type=float, default=2, help="how long the load and the faults run (default 2)")
    p.add_argument("--seed", type=int, default=None, help="the seed of every random choice (default: random)")
    p.add_argument("--rate", type=float, default=25, help="jobs a second (default 25)")
    p.add_argument("--worker-bin", type=pathlib.Path, default=None,
                   help="the worker binary (default: target/debug/mqtt-connector, built first)")
    p.add_argument("--no-faults", action="store_true", help="the load alone (to measure the faults' cost)")
    p.add_argument("--quiet-max", type=float, default=QUIET_MAX_S,
                   help=f"longest wait for outstanding jobs after the load (default {QUIET_MAX_S} s)")
    p.add_argument("--keep", action="store_true", help="leave the servers up at the end until Ctrl-C")
    return p.parse_args()


class Outstanding:
    """Jobs submitted and neither answered nor dead-lettered yet (for the quiet period)."""

    def __init__(self, recorder):
        self.ids = set()
        self.lock = threading.Lock()
        write = recorder.write

        def tracking(name, record):
            if name in ("replies", "dead"):
                with self.lock:
                    self.ids.discard(record.get("id"))
            write(name, record)
        recorder.write = tracking

    def add(self, job_id):
        with self.lock:
            self.ids.add(job_id)

    def count(self):
        with self.lock:
            return len(self.ids)


def run_load(system, recorder, mix, rng, outstanding, until, rate, faults):
    interval = 1 / rate
    next_t = time.time()
    while time.time() < until:
        now = time.time()
        if next_t > now:
            time.sleep(next_t - now)
        # A blocked publish (memory alarm) does not make the load burst afterwards.
        next_t = max(next_t + interval, time.time() - interval)
        roll = rng.random()
        reply_to = amqp.REPLIES if roll < 0.8 else amqp.FULL if roll < 0.9 else faults.deletable_queue
        t = time.time()
        record, body = mix.next(t, reply_to)
        outstanding.add(record["id"])
        system.submitter.publish(body, record["id"], reply_to)
        recorder.write("jobs", {"t": t, **record})


def main():
    args = parse()
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1, 2**31)
    master = random.Random(seed)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S")
    run_dir = REPO / "target" / "soak" / f"{stamp}-seed{seed}"
    run_dir.mkdir(parents=True)
    log(f"seed {seed} (replay: scripts/soak --minutes {args.minutes:g} --seed {seed})")
    log(f"run directory {run_dir}")
    worker_bin = args.worker_bin
    if worker_bin is None:
        # With a test target, so the features match what `cargo test` built (the binary alone
        # would rebuild the dependencies with other features, and the next `cargo test` again).
        subprocess.run(["cargo", "build", "--locked", "--bin", "mqtt-connector", "--test", "manifests"],
                       cwd=REPO, check=True)
        worker_bin = REPO / "target" / "debug" / "mqtt-connector"
    worker_bin = worker_bin.resolve()

    def on_signal(signum, frame):
        raise KeyboardInterrupt
    # SIGINT too: a shell starting the soak in the background leaves SIGINT ignored, and Python
    # then keeps it ignored.
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    recorder = Recorder(run_dir)
    outstanding = Outstanding(recorder)
    system = System(run_dir, recorder, worker_bin, master.getrandbits(32))
    meta = {"seed": seed, "minutes": args.minutes, "rate": args.rate, "started": None, "load_ended": None,
            "ended": None, "quiet_seconds": None, "answer_bound_seconds": ANSWER_BOUND_S,
            "workers": list(WORKERS), "brokers": {}, "worker_bin": str(worker_bin), "faults": not args.no_faults}

    def write_meta():
        (run_dir / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")

    status = 1
    try:
        log("starting RabbitMQ (3 nodes), 2 Mosquittos, the namespace, forwarders, clients, workers")
        system.start()
        meta["brokers"] = system.meta_brokers()
        meta["worker_options"] = system.worker_options
        load_rng = random.Random(master.getrandbits(64))
        faults = Faults(system, recorder, random.Random(master.getrandbits(64)))
        system.reader.call(lambda ch: system.reader.declare_deletable(ch, faults.deletable_queue))
        meta["started"] = time.time()
        write_meta()
        switches = {k: v for k, v in os.environ.items() if k.startswith("MQTT_CONNECTOR_FAULT_")}
        if switches:
            recorder.fault("worker-fault-switch", "all workers",
                           " ".join(f"{k}={v}" for k, v in sorted(switches.items())),
                           meta["started"], meta["started"])
        if not args.no_faults:
            faults.start()
        log(f"load: {args.rate:g} jobs/s for {args.minutes:g} min")
        run_load(system, recorder, Mix(load_rng), load_rng, outstanding,
                 meta["started"] + args.minutes * 60, args.rate, faults)
        meta["load_ended"] = time.time()
        log(f"load ended; waiting for the faults in progress, then up to {args.quiet_max:g} s for "
            f"{outstanding.count()} outstanding jobs")
        faults.stop()
        for w in system.workers.values():
            if not w.alive():
                log(f"worker {w.name} is not running at the end of the load: started again")
                w.start()
        quiet_start = time.time()
        while outstanding.count() and time.time() - quiet_start < args.quiet_max:
            time.sleep(0.5)
        # Late duplicates of MQTT messages and late dead letters still count.
        time.sleep(3)
        meta["quiet_seconds"] = time.time() - meta["load_ended"]
        log(f"quiet period over: {outstanding.count()} jobs neither answered nor dead-lettered")
        for w in system.workers.values():
            w.terminate()
        time.sleep(1)
        if system.reader.error is not None:
            log(f"the reply reader failed: {system.reader.error}")
        if faults.errors:
            log("faults that failed to run: " + "; ".join(faults.errors))
        meta["ended"] = time.time()
        write_meta()
        if args.keep:
            log("--keep: the servers stay up until Ctrl-C; state in " + str(system.state_dir))
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                pass
    except KeyboardInterrupt:
        log("interrupted: stopping everything")
        return 130
    finally:
        system.stop()
        recorder.close()
    checker = REPO / "scripts" / "soak_check.py"
    if not checker.exists():
        log(f"{checker} is missing: nothing checked")
        return 2
    status = subprocess.run([sys.executable, str(checker), str(run_dir)]).returncode
    log(f"checker exit status {status}; report in {run_dir}/report.md, picture {run_dir}/picture.svg")
    log(f"run directory {run_dir}")
    return status
