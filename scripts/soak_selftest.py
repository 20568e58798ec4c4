#!/usr/bin/env python3
"""The soak checker's self-test: the same soak against workers that break the contract on
purpose must fail, and say why.

    scripts/soak_selftest.py [--minutes N] [--seed S] [--rate R] [--drop-every N] [--double-every N]
                             [--only drop-reply|double-publish] [--skip-build]

1. Builds the worker with the cargo feature `soak-faults` and copies it to
   target/soak/mqtt-connector-faulty, then builds the ordinary binary again, so
   target/debug/mqtt-connector stays the one without fault switches.
2. Runs `scripts/soak --minutes N --no-faults --worker-bin target/soak/mqtt-connector-faulty`
   with MQTT_CONNECTOR_FAULT_DROP_REPLY_EVERY=500 in the environment (the soak hands it to its
   workers): the soak must exit 1, and the jobs the checker names as lost must be exactly the
   jobs whose reply a worker dropped (its log line `soak fault switch: reply dropped`), less those
   the worker dead-lettered anyway (a permanent exit-code is dead-lettered after its reply).
3. Runs it again with MQTT_CONNECTOR_FAULT_DOUBLE_PUBLISH_EVERY=200: the soak must exit 1 and the
   checker must report at least one UNEXPLAINED duplicate, and no more duplicated jobs than the
   workers logged double publishes.
Exits 0 when both runs failed as they should, 1 otherwise. `scripts/soak --self-test` calls
`selftest()`.
"""

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import soak_check  # noqa: E402  (beside this file)

ROOT = Path(__file__).resolve().parent.parent
FAULTY = ROOT / "target" / "soak" / "mqtt-connector-faulty"
SOAK = ROOT / "scripts" / "soak"
# --quiet-max passed on to the soak (None: the soak's default).
QUIET_MAX = None
RUN_DIR_RE = re.compile(r"(\S*target/soak/\d{8}T\d{6}-seed\d+)")
DROPPED_RE = re.compile(r"reply dropped.*?fault_correlation_id\W+([^\"\s,}]+)"
                        r"|fault_correlation_id\W+([^\"\s,}]+).*?reply dropped")
DOUBLED = "this publish is published twice"
# The job of a doubled publish, from the line's span: text `job{correlation_id=X}: …`, JSON
# `"span":{"correlation_id":"X"…}` (best effort: the count is checked either way).
DOUBLED_JOB_RE = re.compile(r'correlation_id\W+([^"\s,}]+)[^\n]*?' + re.escape(DOUBLED)
                            + r'|' + re.escape(DOUBLED) + r'[^\n]*?"correlation_id":"([^"]+)"')


def say(message):
    print(time.strftime("%H:%M:%S", time.gmtime()) + " soak self-test: " + message, flush=True)


def build():
    """The faulty binary beside the soak's runs; the ordinary one back in target/debug."""
    cargo = ["cargo", "build", "--locked", "--bin", "mqtt-connector"]
    subprocess.run(cargo + ["--features", "soak-faults"], cwd=ROOT, check=True)
    FAULTY.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(ROOT / "target" / "debug" / "mqtt-connector", FAULTY)
    subprocess.run(cargo, cwd=ROOT, check=True)


def soak(minutes, seed, rate, env_name, every):
    """Runs the soak with one switch on; returns (exit status, run dir, its output)."""
    command = [str(SOAK), "--minutes", f"{minutes:g}", "--no-faults",
               "--worker-bin", str(FAULTY)]
    if seed is not None:
        command += ["--seed", str(seed)]
    if rate is not None:
        command += ["--rate", f"{rate:g}"]
    if QUIET_MAX is not None:
        command += ["--quiet-max", f"{QUIET_MAX:g}"]
    env = dict(os.environ, **{env_name: str(every)})
    say(f"{env_name}={every} {' '.join(command)}")
    started = time.time()
    done = subprocess.run(command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, errors="replace")
    sys.stdout.write(done.stdout)
    found = RUN_DIR_RE.findall(done.stdout)
    if found:
        run_dir = Path(found[-1])
        run_dir = run_dir if run_dir.is_absolute() else ROOT / run_dir
    else:  # not printed: the newest run directory made since the start
        candidates = [d for d in (ROOT / "target" / "soak").glob("*-seed*")
                      if d.is_dir() and d.stat().st_mtime >= started - 1]
        run_dir = max(candidates, key=lambda d: d.stat().st_mtime, default=None)
    return done.returncode, run_dir, done.stdout


def checked(run_dir):
    """The checker's verdict on a run directory, or None when the soak left none to check."""
    try:
        return soak_check.Check(soak_check.load(run_dir)).run_all()
    except soak_check.Unreadable as err:
        say(f"the soak left no run to check: {err}")
        return None


def worker_logs(run_dir):
    logs = sorted((run_dir / "workers").glob("*.log"))
    return "".join(p.read_text(encoding="utf-8", errors="replace") for p in logs), len(logs)


def failed_as_it_should(status, run_dir):
    """What is wrong with how a self-test soak ended, before its findings are read."""
    problems = [] if status == 1 else [f"the soak exited {status}, not 1"]
    if run_dir is None:
        problems.append("no run directory found")
    return problems


def check_dropped_replies(status, run_dir, output):
    problems = failed_as_it_should(status, run_dir)
    if run_dir is None:
        return problems
    text, logs = worker_logs(run_dir)
    dropped = {a or b for a, b in DROPPED_RE.findall(text)}
    if logs == 0:
        problems.append(f"no worker log in {run_dir / 'workers'}: cannot tell which replies were dropped")
    elif not dropped:
        problems.append("no worker logged a dropped reply: each worker answered fewer replies than "
                        "the switch's N (raise --minutes or --rate, or lower --drop-every)")
    check = checked(run_dir)
    if check is None:
        return problems + ["the soak did not get as far as a run to check (see its output)"]
    lost = {f.job for f in check.violations if f.rule == "lost"}
    dead = {d["id"] for d in check.run.dead}
    expected = dropped - dead
    if lost != expected:
        problems.append(f"checker's lost jobs {sorted(lost)} != replies dropped and not "
                        f"dead-lettered {sorted(expected)}")
    others = sorted({f.rule for f in check.violations} - {"lost"})
    if others:  # the switch loses replies only: these are the soak's own findings
        say(f"drop-reply run: other findings, not the switch's (see the report): {others}")
    unnamed = sorted(job for job in lost if job not in output
                     and job not in (run_dir / "report.md").read_text(encoding="utf-8"))
    if unnamed:
        problems.append(f"lost jobs named neither in the soak's output nor its report: {unnamed}")
    say(f"drop-reply run: {len(dropped)} replies dropped by the switch, {len(dropped & dead)} of "
        f"them dead-lettered anyway, {len(lost)} named lost by the checker")
    return problems


def check_double_publish(status, run_dir, output):
    problems = failed_as_it_should(status, run_dir)
    if run_dir is None:
        return problems
    text, _ = worker_logs(run_dir)
    doubled = text.count(DOUBLED)
    doubled_jobs = {a or b for a, b in DOUBLED_JOB_RE.findall(text)}
    check = checked(run_dir)
    if check is None:
        return problems + ["the soak did not get as far as a run to check (see its output)"]
    unexplained = [d for d in check.duplicates if d.cause == "UNEXPLAINED" and d.what == "mqtt"]
    if not unexplained:
        problems.append("no UNEXPLAINED duplicate reported")
    if not doubled:
        problems.append("no worker logged a doubled publish (raise --minutes or lower --double-every)")
    strays = sorted({d.job for d in unexplained} - doubled_jobs) if doubled_jobs else []
    if strays:
        problems.append(f"unexplained duplicates of jobs the switch did not double: {strays}")
    if "UNEXPLAINED" not in (run_dir / "report.md").read_text(encoding="utf-8"):
        problems.append("the report does not say UNEXPLAINED")
    if doubled and len(unexplained) > doubled:
        problems.append(f"{len(unexplained)} duplicated jobs but only {doubled} double publishes")
    say(f"double-publish run: {doubled} publishes doubled by the switch, {len(unexplained)} "
        f"unexplained duplicates reported")
    return problems


def selftest(minutes=1, seed=None, drop_every=500, double_every=200, skip_build=False, rate=None,
             only=None):
    """Both runs (or the one named by `only`); True when each failed as it should."""
    if not skip_build:
        build()
    ok = True
    for name, env_name, every, verify in (
            ("drop-reply", "MQTT_CONNECTOR_FAULT_DROP_REPLY_EVERY", drop_every, check_dropped_replies),
            ("double-publish", "MQTT_CONNECTOR_FAULT_DOUBLE_PUBLISH_EVERY", double_every,
             check_double_publish)):
        if only not in (None, name):
            continue
        status, run_dir, output = soak(minutes, seed, rate, env_name, every)
        problems = verify(status, run_dir, output)
        for problem in problems:
            say(f"{name}: FAIL: {problem}")
        if not problems:
            say(f"{name}: the soak failed as it should ({run_dir})")
        ok = ok and not problems
    say("PASS" if ok else "FAIL")
    return ok


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=1)
    parser.add_argument("--seed")
    parser.add_argument("--rate", type=float, default=None,
                        help="jobs a second, passed to the soak (default: the soak's)")
    parser.add_argument("--drop-every", type=int, default=500)
    parser.add_argument("--double-every", type=int, default=200)
    parser.add_argument("--only", choices=("drop-reply", "double-publish"),
                        help="run one of the two self-tests")
    parser.add_argument("--quiet-max", type=float, default=None,
                        help="passed to the soak: the longest wait for outstanding jobs "
                             "(a dropped reply keeps its job outstanding to the end)")
    parser.add_argument("--skip-build", action="store_true",
                        help="use the target/soak/mqtt-connector-faulty already built")
    args = parser.parse_args()
    if not SOAK.exists():
        say(f"{SOAK} is missing: the self-test drives it")
        return 2
    global QUIET_MAX
    QUIET_MAX = args.quiet_max
    return 0 if selftest(args.minutes, args.seed, args.drop_every, args.double_every,
                         args.skip_build, args.rate, args.only) else 1


if __name__ == "__main__":
    sys.exit(main())
