#!/usr/bin/env python3
"""The soak's checker: reads a run directory, applies the delivery rules, writes report.md and
picture.svg next to the records, prints a short summary and exits 0 (no violation), 1 (the
offending job ids are named) or 2 (the run directory cannot be checked).

    scripts/soak_check.py RUN_DIR

Independent of the workers' own metrics: it trusts only what the soak recorded (jobs submitted,
replies read, dead letters read, MQTT messages received, device answers, faults). The rules are
written once, in RULES below, and printed at the top of every report. Python 3.11, stdlib only.
"""

import json
import math
import re
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

# Used when meta.json does not say (answer_bound_seconds).
DEFAULT_BOUND_S = 10.0
# A message received this long after its job's not-after still counts as published in time
# (publish, broker and subscriber on one machine; the check is made right before the publish).
EXPIRY_SLACK_S = 1.0
# Faults that can delay or hold back an MQTT message: they explain a late receipt of a job with
# not-after, and the loss of a QoS 0 message (at most once).
MQTT_PATH_FAULTS = {"mqtt-stop", "mqtt-kill", "partition", "proxy-latency", "proxy-bandwidth",
                    "proxy-reset"}
# The self-test's own switch is what is under test: it never explains anything.
NEVER_EXPLAINS = {"worker-fault-switch"}
# Faults that cannot make a job published or answered twice: a reply RabbitMQ refuses or cannot
# route is retried, then the job is settled without it (never run again); an alarm only makes
# jobs wait. They explain no duplicate.
NO_DUPLICATES = {"reply-queue-delete", "reply-queue-full", "memory-alarm"}
# Exit codes that mean "nothing was sent" (invalid job, unknown connector, credentials or
# identity refused, TLS, broker refused the message).
NOTHING_SENT = {1, 2, 4, 5, 8}
# Findings reported and listed but no violation: the contract asks for them, the list of
# violations does not (a fault-free run of 3 workers sharing client-ids has shown them).
NOTED = {"failed without a fault", "expired in transit"}
# What a job whose expected outcome is "ok" may still get when faults are on (transient
# failures that ran out of time, a validity that passed, an answer lost with a connection).
OK_UNDER_FAULTS = {0, 3, 6, 7, 9, 10}

RULES = f"""\
Rules (one line each; B = meta.json's answer_bound_seconds, {DEFAULT_BOUND_S:g} s when absent;
T = the job's timeout_s; a fault's window is [t_start - T, t_end + B]; faults of kind
`worker-fault-switch` never explain anything):
1. **Lost**: a job with no line in replies.jsonl and none in dead.jsonl. Violation.
2. **Send not received**: a reply with exit-code 0 to a `send` job at QoS 1 or 2 whose payload
   `soak <id>` was never received on the job's broker. Violation. At QoS 0 (at most once: its
   exit-code 0 means written to the connection) such sends are counted and listed, with a fault
   of kind {", ".join(sorted(MQTT_PATH_FAULTS))} whose window covers the reply if any, but are
   no violation. **Expired in transit**: an MQTT 5 send with not_after replied 0 no earlier than
   not_after - {EXPIRY_SLACK_S:g} s and never received: its Message Expiry Interval (the validity
   left) may have run out before the broker delivered it, and the broker drops it, as asked.
   Listed and counted, not a violation.
3. **Wrong answer**: a reply with exit-code 0 to a `request` job whose response payload is not
   exactly `answer <its own id>` (another job's answer is named). Violation.
4. **Expired published**: a job with not_after whose payload was received later than
   not_after + {EXPIRY_SLACK_S:g} s (unless that receipt lies in the window of a fault of a kind
   listed in rule 2: a stopped broker delivers what it accepted in time), or a reply with
   exit-code 9, and none with 0, whose payload was received after not_after (or at all,
   without not_after): a copy of the job run again after a fault may answer 9 once another
   copy has published it in time. Violation.
5. **Published though refused**: the payload of a job received while every reply to it has an
   exit-code that means nothing was sent ({", ".join(map(str, sorted(NOTHING_SENT)))}). Violation.
6. **Contradicted expectation**: expect `ok` but exit-code not in
   {{{", ".join(map(str, sorted(OK_UNDER_FAULTS)))}}} (10 only for a request); expect `error` or
   `expired` or `no-answer` but exit-code 0. Violation. **Failed without a fault**: expect `ok`,
   a non-zero exit-code of that list, and no fault overlapping [job t, reply t] (the contract:
   workers sharing client-ids answer 0 every job one worker would have). Listed and counted,
   not a violation.
7. **Answer time**: reply t (first reply, else first dead letter) - job t. A job slower than
   T + B is a violation unless a fault (any window) overlaps [job t, answer t]: a job redelivered
   after a worker died, or waiting out a RabbitMQ alarm, starts its clock again. The worst is
   reported either way.
8. **Duplicates**: the same payload received more than once by one subscriber on one broker
   (retained re-deliveries, retain=1 after a first receipt, are not counted), and a job with
   more than one reply. Explained when the first receipt (first reply) lies in the window of a
   fault that can make a job run twice (every kind but {", ".join(sorted(NO_DUPLICATES))}:
   those only delay or lose a reply); the covering fault is named as the cause: one on the same
   broker first, then one whose [t_start - T, t_end + T] covers it, then the nearest. Without
   such a fault, the worker's own account explains it: its log line for the job (workers/*.log,
   or an `attempts` field of the reply) says the delivery was redelivered, or, for an MQTT
   duplicate, that the publish took more than one attempt (a retry after the connection was
   lost, e.g. to a client-id takeover between workers sharing a client-id). Else UNEXPLAINED: a
   violation (at least once is the contract, an unexplained duplicate is a finding).
9. **Record problems**: a malformed line (not JSON, not an object, a required field missing or
   of the wrong type, a job id seen twice) is reported with its file and line, never crashes the
   check, and is a violation (a record that cannot be read cannot vouch for the run). A reply
   or dead letter for a job id never submitted is a violation too.
"""


@dataclass
class Record:
    """One line of a JSONL file, kept with where it came from."""
    data: dict
    where: str

    def __getitem__(self, key):
        return self.data[key]

    def get(self, key, default=None):
        return self.data.get(key, default)


@dataclass
class Run:
    dir: Path
    meta: dict
    jobs: dict  # id -> Record
    replies: list
    dead: list
    mqtt: list
    answers: list
    faults: list
    malformed: list = field(default_factory=list)  # "file:line: why"
    missing: list = field(default_factory=list)    # files absent (read as empty)
    accounts: dict = field(default_factory=dict)   # job id -> (attempts, redelivered, worker)

    @property
    def bound(self):
        value = self.meta.get("answer_bound_seconds")
        return float(value) if is_number(value) else DEFAULT_BOUND_S


def is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# Required fields of each file and the check of their type.
REQUIRED = {
    "jobs": {"id": str, "t": "number", "kind": str},
    "replies": {"id": str, "t": "number", "exit_code": int},
    "dead": {"id": str, "t": "number"},
    "mqtt": {"t": "number", "broker": str, "payload": str},
    "answers": {"t": "number"},
    "faults": {"t_start": "number", "t_end": "number", "kind": str},
}


def field_problem(data, name):
    for key, kind in REQUIRED[name].items():
        value = data.get(key)
        if kind == "number":
            ok = is_number(value)
        elif kind is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
        else:
            ok = isinstance(value, kind)
        if not ok:
            return f"field {key!r} missing or not a {kind if isinstance(kind, str) else kind.__name__}"
    return None


def read_jsonl(run_dir, name, malformed, missing):
    path = run_dir / f"{name}.jsonl"
    if not path.exists():
        missing.append(path.name)
        return []
    records = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path.name}:{number}"
            try:
                data = json.loads(line)
            except json.JSONDecodeError as err:
                malformed.append(f"{where}: not JSON ({err.msg})")
                continue
            if not isinstance(data, dict):
                malformed.append(f"{where}: not a JSON object")
                continue
            problem = field_problem(data, name)
            if problem:
                malformed.append(f"{where}: {problem}")
                continue
            records.append(Record(data, where))
    return records


# The worker's one line per finished job (text or JSON log format), for its attempts and whether
# the delivery was a redelivery: used only to explain a duplicate, never to find a violation.
TEXT_SUMMARY_RE = re.compile(r'\bcorrelation_id="([^"]*)".*?\battempts=(\d+)\b.*?\bredelivered=(true|false)')


def worker_accounts(run_dir):
    """job id -> (most attempts, redelivered, worker) from workers/*.log; {} without logs."""
    accounts = {}
    for path in sorted((run_dir / "workers").glob("*.log")):
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                if "attempts" not in line or "redelivered" not in line:
                    continue
                found = None
                if line.lstrip().startswith("{"):
                    try:
                        fields = json.loads(line).get("fields", {})
                        found = (fields.get("correlation_id"), fields.get("attempts"),
                                 fields.get("redelivered"))
                    except (json.JSONDecodeError, AttributeError):
                        found = None
                else:
                    match = TEXT_SUMMARY_RE.search(line)
                    if match:
                        found = (match[1], int(match[2]), match[3] == "true")
                if not found or not isinstance(found[0], str) or not isinstance(found[1], int):
                    continue
                job_id, attempts, redelivered = found
                before = accounts.get(job_id, (0, False, path.stem))
                accounts[job_id] = (max(attempts, before[0]), bool(redelivered) or before[1],
                                    path.stem if attempts >= before[0] else before[2])
    return accounts


class Unreadable(Exception):
    """The run directory cannot be checked at all."""


def load(run_dir):
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise Unreadable(f"{run_dir} is not a directory")
    try:
        meta = json.loads((run_dir / "meta.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise Unreadable(f"{run_dir / 'meta.json'} cannot be read: {err}") from err
    if not isinstance(meta, dict):
        raise Unreadable(f"{run_dir / 'meta.json'} is not a JSON object")
    if not (run_dir / "jobs.jsonl").exists():
        raise Unreadable(f"{run_dir / 'jobs.jsonl'} is missing: no job to check")
    malformed, missing = [], []
    records = {name: read_jsonl(run_dir, name, malformed, missing) for name in REQUIRED}
    jobs = {}
    for job in records["jobs"]:
        if job["id"] in jobs:
            malformed.append(f"{job.where}: job id {job['id']!r} seen twice")
            continue
        jobs[job["id"]] = job
    return Run(run_dir, meta, jobs, records["replies"], records["dead"], records["mqtt"],
               records["answers"], records["faults"], malformed, missing, worker_accounts(run_dir))


def timeout_of(job):
    value = job.get("timeout_s") if job else None
    return float(value) if is_number(value) else 10.0


def soak_payload(job_id):
    return f"soak {job_id}"


def payload_job_id(payload):
    return payload[5:] if payload.startswith("soak ") else None


@dataclass
class Finding:
    rule: str
    job: str
    detail: str


@dataclass
class Duplicate:
    what: str     # "mqtt" or "reply"
    job: str      # job id, or the payload when it names no known job
    broker: str
    count: int
    first: float
    cause: str    # "kind target @ +s" or "UNEXPLAINED"


class Check:
    """Applies every rule to a loaded run; findings and tables for the report."""

    def __init__(self, run):
        self.run = run
        self.findings = []
        self.duplicates = []
        self.worst = None          # (seconds, job id, explained)
        self.worst_unexplained = None
        self.qos0_losses = []      # (job, a fault on the MQTT path then, or "-")
        self.foreign = 0           # received payloads that are no job's
        self.retained_again = 0
        self.faults = [f for f in run.faults]
        self.replies_by_job = defaultdict(list)
        for reply in sorted(run.replies, key=lambda r: r["t"]):
            self.replies_by_job[reply["id"]].append(reply)
        self.dead_by_job = defaultdict(list)
        for dead in sorted(run.dead, key=lambda r: r["t"]):
            self.dead_by_job[dead["id"]].append(dead)
        # (broker, payload) -> receipts, in time order
        self.received = defaultdict(list)
        for msg in sorted(run.mqtt, key=lambda r: r["t"]):
            self.received[(msg["broker"], msg["payload"])].append(msg)

    def find(self, rule, job, detail):
        self.findings.append(Finding(rule, job, detail))

    def explaining(self, t, timeout_s, kinds=None, broker=None):
        """The faults whose window [t_start - T, t_end + B] covers t, same broker first."""
        covering = [f for f in self.faults
                    if f["kind"] not in NEVER_EXPLAINS and (kinds is None or f["kind"] in kinds)
                    and f["t_start"] - timeout_s <= t <= f["t_end"] + self.run.bound]
        def on_broker(fault):  # targets such as "a", "w3-a" (a worker's link to broker a)
            return broker is not None and broker in str(fault.get("target") or "").split("-")

        def tight(fault):  # the job's life overlaps the fault itself
            return fault["t_start"] - timeout_s <= t <= fault["t_end"] + timeout_s

        return sorted(covering, key=lambda f: (not on_broker(f), not tight(f),
                                               abs(f["t_start"] - t)))

    def overlapping(self, start, end):
        return [f for f in self.faults if f["kind"] not in NEVER_EXPLAINS
                and f["t_start"] <= end and f["t_end"] >= start]

    def describe(self, fault):
        started = self.run.meta.get("started")
        at = f" @ +{fault['t_start'] - started:.1f}s" if is_number(started) else ""
        target = fault.get("target")
        return f"{fault['kind']}{' ' + str(target) if target else ''}{at}"

    def run_all(self):
        run = self.run
        for where in run.malformed:
            self.find("malformed", "-", where)
        for reply in run.replies:
            if reply["id"] not in run.jobs:
                self.find("unknown job", reply["id"], f"reply at {reply.where} names no submitted job")
        for dead in run.dead:
            if dead["id"] not in run.jobs:
                self.find("unknown job", dead["id"], f"dead letter at {dead.where} names no submitted job")
        for job_id, job in run.jobs.items():
            self.check_job(job_id, job)
        self.check_duplicates()
        return self

    def receipts(self, job):
        return self.received.get((job.get("broker"), soak_payload(job["id"])), [])

    def check_job(self, job_id, job):
        replies = self.replies_by_job.get(job_id, [])
        dead = self.dead_by_job.get(job_id, [])
        timeout_s = timeout_of(job)
        if not replies and not dead:
            self.find("lost", job_id, "no reply and not dead-lettered")
        receipts = self.receipts(job)
        for reply in replies:
            self.check_reply(job_id, job, reply, receipts, timeout_s)
        self.check_expiry(job_id, job, replies, receipts, timeout_s)
        codes = {r["exit_code"] for r in replies}
        if receipts and codes and codes <= NOTHING_SENT:
            self.find("published though refused", job_id,
                      f"received {len(receipts)}x on broker {job.get('broker')} but replied "
                      f"{sorted(codes)}")
        answered = [r["t"] for r in replies[:1]] or [d["t"] for d in dead[:1]]
        if answered:
            self.check_answer_time(job_id, job, answered[0], timeout_s)

    def check_reply(self, job_id, job, reply, receipts, timeout_s):
        code, kind, expect = reply["exit_code"], job["kind"], job.get("expect")
        if code == 0 and kind == "send" and not receipts:
            if job.get("qos") == 0:
                covering = self.explaining(reply["t"], timeout_s, MQTT_PATH_FAULTS,
                                           job.get("broker"))
                self.qos0_losses.append((job_id, self.describe(covering[0]) if covering else "-"))
            elif (job.get("mqtt") == 5 and job.get("not_after") is not None
                  and reply["t"] >= job["not_after"] - EXPIRY_SLACK_S):
                self.find("expired in transit", job_id,
                          f"replied 0 at {reply.where}, {reply['t'] - job['not_after']:+.2f} s "
                          f"after its not_after; `soak {job_id}` never received")
            else:
                self.find("send not received", job_id,
                          f"replied 0 at {reply.where}, `soak {job_id}` never received on broker "
                          f"{job.get('broker')} (qos {job.get('qos')})")
        if code == 0 and kind == "request":
            got = reply.get("response_payload")
            if got != f"answer {job_id}":
                other = got[7:] if isinstance(got, str) and got.startswith("answer ") else None
                detail = (f"answered with job {other}'s answer" if other
                          else f"answer payload {got!r}")
                self.find("wrong answer", job_id, f"{detail} ({reply.where})")
        allowed = OK_UNDER_FAULTS - ({10} if kind != "request" else set())
        if expect == "ok" and code not in allowed:
            self.find("contradicted expectation", job_id,
                      f"expected ok, exit-code {code}: {reply.get('message')!r}")
        elif expect == "ok" and code != 0 and not self.overlapping(job["t"], reply["t"]):
            self.find("failed without a fault", job_id,
                      f"expected ok, exit-code {code} with no fault meanwhile: "
                      f"{reply.get('message')!r}")
        if expect in ("error", "expired", "no-answer") and code == 0:
            self.find("contradicted expectation", job_id,
                      f"expected {expect} (bad class {job.get('bad_class')}), exit-code 0")

    def check_expiry(self, job_id, job, replies, receipts, timeout_s):
        not_after = job.get("not_after")
        if is_number(not_after):
            late = [m for m in receipts if m["t"] > not_after + EXPIRY_SLACK_S]
            for msg in late[:1]:
                covering = self.explaining(msg["t"], timeout_s, MQTT_PATH_FAULTS, job.get("broker"))
                if not covering:
                    self.find("expired published", job_id,
                              f"received {msg['t'] - not_after:.2f}s after not-after ({msg.where})")
            if late:
                return
        codes = {r["exit_code"] for r in replies}
        if 9 in codes and 0 not in codes:
            after = [m for m in receipts if not is_number(not_after) or m["t"] > not_after]
            if after:
                self.find("expired published", job_id,
                          f"replied 9 (expired, nothing published) but received ({after[0].where})")

    def check_answer_time(self, job_id, job, answered_t, timeout_s):
        took = answered_t - job["t"]
        explained = took <= timeout_s + self.run.bound or bool(self.overlapping(job["t"], answered_t))
        if self.worst is None or took > self.worst[0]:
            self.worst = (took, job_id, explained)
        if not explained:
            if self.worst_unexplained is None or took > self.worst_unexplained[0]:
                self.worst_unexplained = (took, job_id)
            self.find("answer time", job_id,
                      f"answered after {took:.2f}s > timeout {timeout_s:g}s + bound "
                      f"{self.run.bound:g}s, no fault meanwhile")

    def check_duplicates(self):
        run = self.run
        by_subscriber = defaultdict(list)
        for (broker, payload), msgs in self.received.items():
            for msg in msgs:
                by_subscriber[(broker, msg.get("subscriber"), payload)].append(msg)
        for (broker, _sub, payload), msgs in sorted(by_subscriber.items(),
                                                    key=lambda kv: kv[1][0]["t"]):
            job_id = payload_job_id(payload)
            job = run.jobs.get(job_id) if job_id is not None else None
            if job is None:
                self.foreign += 1
                continue
            first = msgs[0]
            again = [m for m in msgs[1:] if not m.get("retain")]
            self.retained_again += len(msgs) - 1 - len(again)
            if again:
                self.duplicate("mqtt", job_id, broker, 1 + len(again), first["t"], timeout_of(job))
        for job_id, replies in self.replies_by_job.items():
            if len(replies) > 1 and job_id in run.jobs:
                self.duplicate("reply", job_id, "-", len(replies), replies[0]["t"],
                               timeout_of(run.jobs[job_id]))

    def duplicate(self, what, job_id, broker, count, first, timeout_s):
        kinds = {f["kind"] for f in self.faults} - NO_DUPLICATES
        covering = self.explaining(first, timeout_s, kinds, broker)
        cause = self.describe(covering[0]) if covering else self.account(what, job_id)
        self.duplicates.append(Duplicate(what, job_id, broker, count, first, cause))
        if cause == "UNEXPLAINED":
            self.find("unexplained duplicate", job_id,
                      f"{what} {count}x{' on broker ' + broker if what == 'mqtt' else ''}, "
                      "no fault window covers the first")

    def account(self, what, job_id):
        """The worker's own account of a job run twice, or UNEXPLAINED."""
        attempts, redelivered, worker = self.run.accounts.get(job_id, (1, False, None))
        reply_attempts = [r.get("attempts") for r in self.replies_by_job.get(job_id, [])]
        attempts = max([attempts] + [a for a in reply_attempts if isinstance(a, int)])
        if redelivered:
            return f"redelivered (log of {worker})"
        if what == "mqtt" and attempts > 1:
            return f"retried, attempts={attempts}" + (f" (log of {worker})" if worker else "")
        return "UNEXPLAINED"

    @property
    def violations(self):
        return [f for f in self.findings if f.rule not in NOTED]

    @property
    def offending(self):
        seen = []
        for finding in self.violations:
            if finding.job != "-" and finding.job not in seen:
                seen.append(finding.job)
        return seen


# ---------------------------------------------------------------- report

def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines) if rows else "(none)"


def summary_lines(check):
    run = check.run
    counts = defaultdict(int)
    for finding in check.findings:
        counts[finding.rule] += 1
    verdict = "FAIL" if check.violations else "PASS"
    lines = [f"soak check {verdict}: {len(run.jobs)} jobs, {len(run.replies)} replies, "
             f"{len(run.dead)} dead letters, {len(run.mqtt)} MQTT messages, {len(run.faults)} faults"]
    for rule in ("lost", "send not received", "wrong answer", "expired published",
                 "unexplained duplicate", "published though refused", "contradicted expectation",
                 "answer time", "unknown job", "malformed"):
        lines.append(f"  {rule}: {counts.get(rule, 0)}")
    for rule in sorted(NOTED):
        lines.append(f"  {rule} (noted, not a violation): {counts.get(rule, 0)}")
    explained = sum(1 for d in check.duplicates if d.cause != "UNEXPLAINED")
    lines.append(f"  duplicates: {len(check.duplicates)} ({explained} explained)")
    qos0 = sum(1 for j in run.jobs.values() if j["kind"] == "send" and j.get("qos") == 0)
    lines.append(f"  QoS 0 sends not received (not a violation): {len(check.qos0_losses)} of {qos0}")
    if check.worst:
        took, job_id, _ = check.worst
        lines.append(f"  worst answer time: {took:.2f}s (job {job_id})")
    if check.violations:
        shown = check.offending
        more = f" … and {len(shown) - 50} more (see the report)" if len(shown) > 50 else ""
        lines.append("  offending jobs: " + (", ".join(shown[:50]) or "-") + more)
    return lines


def write_report(check, path):
    run = check.run
    meta = run.meta
    out = [f"# Soak report: {run.dir.name}", ""]
    out.append(f"seed {meta.get('seed')}, {meta.get('minutes')} minute(s) of load, workers "
               f"{', '.join(map(str, meta.get('workers') or [])) or '-'}; "
               f"answer bound B = {run.bound:g} s; picture: [picture.svg](picture.svg)")
    out += ["", "## Rules", "", RULES, "## Summary", "", "```", *summary_lines(check), "```", ""]
    if run.missing:
        out += [f"Files absent, read as empty: {', '.join(run.missing)}.", ""]

    out += ["## Violations", ""]
    out.append(table(["rule", "job", "detail"],
                     [(f.rule, f.job, f.detail) for f in check.violations]))

    out += ["", "## Faults by kind", ""]
    by_kind = defaultdict(lambda: [0, 0.0])
    for fault in run.faults:
        by_kind[fault["kind"]][0] += 1
        by_kind[fault["kind"]][1] += max(0.0, fault["t_end"] - fault["t_start"])
    out.append(table(["kind", "count", "total seconds"],
                     [(k, c, f"{s:.1f}") for k, (c, s) in sorted(by_kind.items())]))

    out += ["", "## Jobs by kind and outcome", "",
            "Outcome: the exit-code of the first reply; `dead` = dead-lettered without reply; "
            "`lost` = neither.", ""]
    outcomes = defaultdict(lambda: defaultdict(int))
    columns = set()
    for job_id, job in run.jobs.items():
        replies = check.replies_by_job.get(job_id)
        if replies:
            column = str(replies[0]["exit_code"])
        elif check.dead_by_job.get(job_id):
            column = "dead"
        else:
            column = "lost"
        outcomes[(job["kind"], job.get("expect") or "-")][column] += 1
        columns.add(column)
    columns = sorted(columns, key=lambda c: (not c.isdigit(), int(c) if c.isdigit() else 0, c))
    out.append(table(["kind", "expect", *[f"exit {c}" if c.isdigit() else c for c in columns], "total"],
                     [(kind, expect, *[row.get(c, 0) for c in columns], sum(row.values()))
                      for (kind, expect), row in sorted(outcomes.items())]))

    def listed(rule, title):
        rows = [(f.job, f.detail) for f in check.findings if f.rule == rule]
        return ["", f"## {title} ({len(rows)})", "", table(["job", "detail"], rows)]

    out += listed("lost", "Lost")
    out += listed("send not received", "Sends replied 0, never received")
    qos0 = sum(1 for j in run.jobs.values() if j["kind"] == "send" and j.get("qos") == 0)
    out += ["", f"## QoS 0 sends replied 0, never received ({len(check.qos0_losses)} of {qos0} "
            "QoS 0 sends; at most once: counted, not a violation)", "",
            table(["job", "a fault on the MQTT path then"], check.qos0_losses)]
    out += listed("wrong answer", "Wrong answers")
    out += listed("expired published", "Expired published")
    out += listed("published though refused", "Published though the reply says nothing was sent")
    out += listed("contradicted expectation", "Outcomes that contradict the expectation")
    out += listed("failed without a fault",
                  "Expected ok, failed with no fault meanwhile (noted, not a violation)")

    out += ["", f"## Duplicates ({len(check.duplicates)})", ""]
    out.append(table(["what", "job", "broker", "received", "first at", "cause"],
                     [(d.what, d.job, d.broker, d.count, clock(run, d.first), d.cause)
                      for d in check.duplicates]))
    if check.retained_again or check.foreign:
        out += ["", f"Not counted: {check.retained_again} retained re-deliveries, "
                f"{check.foreign} received payloads that name no submitted job."]

    out += ["", "## Answer time", ""]
    if check.worst:
        took, job_id, explained = check.worst
        job = run.jobs[job_id]
        out.append(f"Worst: {took:.2f} s, job {job_id} ({job['kind']}, timeout "
                   f"{timeout_of(job):g} s){'' if explained else ' — over the bound, no fault'}.")
        if check.worst_unexplained:
            out.append(f"Worst over the bound with no fault: {check.worst_unexplained[0]:.2f} s, "
                       f"job {check.worst_unexplained[1]}.")
    else:
        out.append("No job answered.")
    out += listed("answer time", "Answers over the bound with no fault")
    out += listed("unknown job", "Replies and dead letters of unknown jobs")
    out += listed("malformed", "Record problems")
    path.write_text("\n".join(out) + "\n", encoding="utf-8")


def clock(run, t):
    started = run.meta.get("started")
    return f"+{t - started:.1f}s" if is_number(started) else f"{t:.1f}"


# ---------------------------------------------------------------- picture

FAULT_COLOURS = ["#e6194b", "#f58231", "#911eb4", "#4363d8", "#3cb44b", "#9a6324", "#f032e6",
                 "#469990", "#808000", "#000075", "#800000", "#bfef45", "#42d4f4", "#a9a9a9"]


def esc(text):
    return (str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
            .replace('"', "&quot;"))


def nice_step(span, target):
    """A round step (1, 2, 5 × 10^k) that cuts span into about `target` parts."""
    raw = max(span / max(target, 1), 1e-9)
    power = 10 ** math.floor(math.log10(raw))
    for factor in (1, 2, 5, 10):
        if raw <= factor * power:
            return factor * power
    return 10 * power


def time_step(span):
    for step in (5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600):
        if span / step <= 10:
            return step
    return 7200


def mmss(seconds):
    seconds = int(round(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}"


def write_picture(check, path):
    run = check.run
    times = ([j["t"] for j in run.jobs.values()] + [r["t"] for r in run.replies]
             + [f["t_start"] for f in run.faults] + [f["t_end"] for f in run.faults])
    start = run.meta.get("started") if is_number(run.meta.get("started")) else min(times, default=0)
    end = run.meta.get("ended") if is_number(run.meta.get("ended")) else max(times, default=start)
    span = max(end - start, 1.0)
    # About 120 bins whatever the length: 1 s for 2 minutes, 15 s for 30.
    bin_s = max(1, math.ceil(span / 120))
    bins = math.ceil(span / bin_s)
    replies, errors = [0] * bins, [0] * bins
    for reply in run.replies:
        i = int((reply["t"] - start) // bin_s)
        if 0 <= i < bins:
            replies[i] += 1
            if reply["exit_code"] != 0:
                errors[i] += 1
    rate = [c / bin_s for c in replies]
    err_rate = [c / bin_s for c in errors]
    kinds = sorted({f["kind"] for f in run.faults})
    colour = {k: FAULT_COLOURS[i % len(FAULT_COLOURS)] for i, k in enumerate(kinds)}

    width, left, right, top = 1200, 170, 20, 40
    plot_h = 300
    lane_h = 16
    lanes_top = top + plot_h + 40
    height = lanes_top + lane_h * len(kinds) + 50
    plot_w = width - left - right

    def x(t):
        return left + (t - start) / span * plot_w

    y_max = max(max(rate, default=0), 1.0)
    y_step = nice_step(y_max, 5)
    y_max = math.ceil(y_max / y_step) * y_step

    def y(v):
        return top + plot_h - v / y_max * plot_h

    svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">',
           '<rect width="100%" height="100%" fill="white"/>',
           f'<text x="{left}" y="20" font-size="15" font-weight="bold">{esc(run.dir.name)}: '
           f'replies/s (blue), errors/s = non-zero exit-codes (red), faults (bands); '
           f'{bin_s} s bins</text>']
    # Faults: shaded bands over the plot, and one labelled lane per kind beneath it.
    for fault in run.faults:
        x0, x1 = x(fault["t_start"]), x(fault["t_end"])
        w = max(x1 - x0, 1.5)
        svg.append(f'<rect x="{x0:.1f}" y="{top}" width="{w:.1f}" height="{plot_h}" '
                   f'fill="{colour[fault["kind"]]}" fill-opacity="0.15">'
                   f'<title>{esc(check.describe(fault))}: {esc(fault.get("detail") or "")}</title></rect>')
        lane = kinds.index(fault["kind"])
        svg.append(f'<rect x="{x0:.1f}" y="{lanes_top + lane * lane_h + 2}" width="{w:.1f}" '
                   f'height="{lane_h - 4}" fill="{colour[fault["kind"]]}">'
                   f'<title>{esc(check.describe(fault))}</title></rect>')
    for lane, kind in enumerate(kinds):
        count = sum(1 for f in run.faults if f["kind"] == kind)
        svg.append(f'<text x="{left - 6}" y="{lanes_top + lane * lane_h + 12}" text-anchor="end" '
                   f'fill="{colour[kind]}">{esc(kind)} ({count}×)</text>')
    if not kinds:
        svg.append(f'<text x="{left}" y="{lanes_top + 12}" fill="#555">no faults</text>')
    # Axes and grid.
    v = 0.0
    while v <= y_max + 1e-9:
        svg.append(f'<line x1="{left}" x2="{width - right}" y1="{y(v):.1f}" y2="{y(v):.1f}" '
                   'stroke="#ddd"/>')
        svg.append(f'<text x="{left - 6}" y="{y(v) + 4:.1f}" text-anchor="end">{v:g}</text>')
        v += y_step
    step = time_step(span)
    s = 0
    while s <= span + 1e-9:
        svg.append(f'<line x1="{x(start + s):.1f}" x2="{x(start + s):.1f}" y1="{top}" '
                   f'y2="{lanes_top + lane_h * max(len(kinds), 1)}" stroke="#eee"/>')
        svg.append(f'<text x="{x(start + s):.1f}" y="{top + plot_h + 16}" '
                   f'text-anchor="middle">{mmss(s)}</text>')
        s += step
    svg.append(f'<text x="{left + plot_w / 2}" y="{top + plot_h + 32}" text-anchor="middle" '
               'fill="#555">time since start (m:ss)</text>')
    svg.append(f'<text x="16" y="{top + plot_h / 2}" transform="rotate(-90 16 {top + plot_h / 2})" '
               'text-anchor="middle" fill="#555">per second</text>')
    load_ended = run.meta.get("load_ended")
    if is_number(load_ended):
        svg.append(f'<line x1="{x(load_ended):.1f}" x2="{x(load_ended):.1f}" y1="{top}" '
                   f'y2="{top + plot_h}" stroke="#333" stroke-dasharray="4 3"/>')
        # Near the right edge the label goes to the left of the line.
        anchor, dx = ("end", -3) if x(load_ended) > left + plot_w * 0.85 else ("start", 3)
        svg.append(f'<text x="{x(load_ended) + dx:.1f}" y="{top + 12}" text-anchor="{anchor}" '
                   'fill="#333">load ended</text>')
    # The two series as step lines.
    for series, stroke in ((rate, "#1f5fbf"), (err_rate, "#d62728")):
        points = []
        for i, value in enumerate(series):
            t0 = start + i * bin_s
            points.append(f"{x(t0):.1f},{y(value):.1f}")
            points.append(f"{x(min(t0 + bin_s, end)):.1f},{y(value):.1f}")
        if points:
            svg.append(f'<polyline fill="none" stroke="{stroke}" stroke-width="1.5" '
                       f'points="{" ".join(points)}"/>')
    svg.append(f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" '
               'stroke="#333"/>')
    svg.append(f'<text x="{left}" y="{height - 14}" fill="#555">lanes: one per fault kind '
               '(hover a band for its target and detail); dashed line: end of the load, then '
               'the quiet period</text>')
    svg.append("</svg>")
    path.write_text("\n".join(svg) + "\n", encoding="utf-8")


def main(argv):
    if len(argv) != 2 or argv[1] in ("-h", "--help"):
        print(__doc__.strip(), file=sys.stderr if len(argv) != 2 else sys.stdout)
        return 0 if len(argv) == 2 else 2
    try:
        run = load(argv[1])
    except Unreadable as err:
        print(f"soak check: cannot check: {err}", file=sys.stderr)
        return 2
    check = Check(run).run_all()
    report = run.dir / "report.md"
    write_report(check, report)
    write_picture(check, run.dir / "picture.svg")
    print("\n".join(summary_lines(check)))
    print(f"report: {report}")
    print(f"picture: {run.dir / 'picture.svg'}")
    return 1 if check.violations else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
