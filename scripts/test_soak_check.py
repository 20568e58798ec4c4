"""Unit tests of the soak's checker on synthetic run directories.

    python3 -m unittest scripts/test_soak_check.py
"""

import io
import json
import sys
import tempfile
import unittest
import unittest.mock
from contextlib import redirect_stdout
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import soak_check  # noqa: E402  (the checker lives beside this file, not in a package)

T0 = 1_800_000_000.0


class RunDir:
    """A run directory written line by line, as the soak would."""

    def __init__(self, root):
        self.dir = Path(root) / "20261205T120000-seed7"
        self.dir.mkdir()
        self.meta = {"seed": 7, "minutes": 2, "started": T0, "load_ended": T0 + 120,
                     "ended": T0 + 150, "quiet_seconds": 30, "answer_bound_seconds": 10,
                     "workers": ["w1", "w2", "w3"], "brokers": {"a": {}, "b": {}}}
        self.lines = {name: [] for name in ("jobs", "replies", "dead", "mqtt", "answers", "faults")}

    def job(self, job_id, t, kind="send", expect="ok", broker="a", qos=1, timeout_s=5,
            not_after=None, device=None):
        self.lines["jobs"].append({
            "id": job_id, "t": T0 + t, "kind": kind, "expect": expect, "bad_class": None,
            "broker": broker, "topic": f"soak/{broker}/{job_id}", "qos": qos, "mqtt": 5,
            "timeout_s": timeout_s, "not_after": None if not_after is None else T0 + not_after,
            "device": device, "reply_to": "soak.replies", "marker": job_id})

    def reply(self, job_id, t, exit_code=0, response=None):
        self.lines["replies"].append({"t": T0 + t, "id": job_id, "exit_code": exit_code,
                                      "message": "m", "response_payload": response,
                                      "queue": "soak.replies"})

    def received(self, job_id, t, broker="a", retain=False):
        self.lines["mqtt"].append({"t": T0 + t, "broker": broker, "topic": f"soak/{broker}/{job_id}",
                                   "payload": f"soak {job_id}", "qos": 1, "retain": retain})

    def dead(self, job_id, t, exit_code=None):
        self.lines["dead"].append({"t": T0 + t, "id": job_id, "exit_code": exit_code,
                                   "message": None})

    def fault(self, kind, start, end, target="w1"):
        self.lines["faults"].append({"t_start": T0 + start, "t_end": T0 + end, "kind": kind,
                                     "target": target, "detail": ""})

    def sent_ok(self, job_id, t, broker="a"):
        """A send job published, received once and answered 0."""
        self.job(job_id, t, broker=broker)
        self.received(job_id, t + 0.1, broker=broker)
        self.reply(job_id, t + 0.2)

    def write(self, raw=None):
        (self.dir / "meta.json").write_text(json.dumps(self.meta))
        for name, records in self.lines.items():
            text = "".join(json.dumps(r) + "\n" for r in records)
            text += (raw or {}).get(name, "")
            (self.dir / f"{name}.jsonl").write_text(text)
        return self.dir


class CheckerTest(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.run_dir = RunDir(self.tmp.name)

    def tearDown(self):
        self.tmp.cleanup()

    def check(self, raw=None):
        """Runs the checker as the soak does; returns (exit status, printed, findings by rule)."""
        path = self.run_dir.write(raw)
        out = io.StringIO()
        with redirect_stdout(out):
            status = soak_check.main(["soak_check.py", str(path)])
        check = soak_check.Check(soak_check.load(path)).run_all()
        rules = {}
        for finding in check.findings:
            rules.setdefault(finding.rule, []).append(finding.job)
        return status, out.getvalue(), rules, check

    def a_clean_run(self):
        run = self.run_dir
        for i in range(20):
            run.sent_ok(f"s{i}", i)
        run.job("r1", 3, kind="request", device="fast")
        run.received("r1", 3.1)
        run.reply("r1", 3.5, response="answer r1")
        run.job("x1", 4, kind="request", expect="no-answer", device="never")
        run.received("x1", 4.1)
        run.reply("x1", 9.2, exit_code=10)
        run.dead("x1", 9.3, exit_code=10)
        run.job("b1", 5, kind="bad", expect="error")
        run.reply("b1", 5.1, exit_code=1)
        run.dead("b1", 5.2)
        run.job("e1", 6, expect="expired", not_after=-1)
        run.reply("e1", 6.1, exit_code=9)
        run.fault("worker-kill", 30, 31)

    def test_a_clean_run_passes_and_writes_report_and_picture(self):
        self.a_clean_run()
        status, printed, rules, check = self.check()
        self.assertEqual(status, 0, printed)
        self.assertEqual(rules, {})
        self.assertIn("soak check PASS", printed)
        report = (self.run_dir.dir / "report.md").read_text()
        self.assertIn("## Rules", report)
        self.assertIn("| worker-kill | 1 | 1.0 |", report)
        self.assertIn("| send | ok | 20 | 0 | 0 | 0 | 20 |", report)
        svg = (self.run_dir.dir / "picture.svg").read_text()
        self.assertTrue(svg.startswith("<svg") and svg.rstrip().endswith("</svg>"))
        self.assertIn("worker-kill", svg)
        self.assertIn(str(self.run_dir.dir / "report.md"), printed)
        self.assertEqual(check.worst[1], "x1")

    def test_a_lost_job_is_named(self):
        self.a_clean_run()
        self.run_dir.job("gone", 10)
        self.run_dir.received("gone", 10.1)
        status, printed, rules, _ = self.check()
        self.assertEqual(status, 1)
        self.assertEqual(rules, {"lost": ["gone"]})
        self.assertIn("offending jobs: gone", printed)

    def test_a_dead_lettered_job_without_reply_is_not_lost(self):
        self.a_clean_run()
        self.run_dir.job("dl", 10)
        self.run_dir.received("dl", 10.1)
        self.run_dir.dead("dl", 10.2, exit_code=0)
        status, _, rules, _ = self.check()
        self.assertEqual((status, rules), (0, {}))

    def test_a_send_replied_0_never_received_is_named(self):
        self.a_clean_run()
        self.run_dir.job("unseen", 10)
        self.run_dir.reply("unseen", 10.2)
        status, printed, rules, _ = self.check()
        self.assertEqual(status, 1)
        self.assertEqual(rules, {"send not received": ["unseen"]})
        self.assertIn("send not received: 1", printed)

    def test_a_send_received_on_the_other_broker_only_is_not_received(self):
        self.a_clean_run()
        self.run_dir.job("wrongbroker", 10, broker="a")
        self.run_dir.received("wrongbroker", 10.1, broker="b")
        self.run_dir.reply("wrongbroker", 10.2)
        _, _, rules, _ = self.check()
        self.assertEqual(rules, {"send not received": ["wrongbroker"]})

    def test_a_qos0_send_not_received_is_counted_not_a_violation(self):
        self.a_clean_run()
        self.run_dir.job("q0", 40, qos=0)
        self.run_dir.reply("q0", 40.2)
        self.run_dir.fault("mqtt-stop", 40, 45, target="a")
        self.run_dir.job("q0bis", 60, qos=0)
        self.run_dir.reply("q0bis", 60.2)
        status, printed, rules, check = self.check()
        self.assertEqual((status, rules), (0, {}))
        self.assertEqual(check.qos0_losses, [("q0", "mqtt-stop a @ +40.0s"), ("q0bis", "-")])
        self.assertIn("QoS 0 sends not received (not a violation): 2 of 2", printed)

    def test_an_mqtt5_send_acknowledged_around_its_not_after_may_expire_in_transit(self):
        self.a_clean_run()
        self.run_dir.job("late", 40, not_after=40.5)
        self.run_dir.reply("late", 41.0)
        self.run_dir.job("early", 50, not_after=58)
        self.run_dir.reply("early", 50.2)
        status, printed, rules, _ = self.check()
        self.assertEqual(status, 1)
        self.assertEqual(rules, {"expired in transit": ["late"], "send not received": ["early"]})
        self.assertIn("expired in transit (noted, not a violation): 1", printed)

    def test_a_request_answered_with_another_jobs_answer_is_named(self):
        self.a_clean_run()
        self.run_dir.job("r2", 10, kind="request", device="fast")
        self.run_dir.received("r2", 10.1)
        self.run_dir.reply("r2", 10.5, response="answer r1")
        status, _, rules, check = self.check()
        self.assertEqual(status, 1)
        self.assertEqual(rules, {"wrong answer": ["r2"]})
        self.assertIn("job r1's answer", check.findings[0].detail)

    def test_an_expired_job_published_is_named(self):
        self.a_clean_run()
        # Received 3 s after its not-after, no fault.
        self.run_dir.job("late", 10, not_after=12)
        self.run_dir.received("late", 15)
        self.run_dir.reply("late", 15.1)
        # Replied 9 (nothing published), yet received after its not-after.
        self.run_dir.job("liar", 11, expect="expired", not_after=11.5)
        self.run_dir.received("liar", 11.6)
        self.run_dir.reply("liar", 11.7, exit_code=9)
        # A copy answered 9 after another copy published in time (0): no violation.
        self.run_dir.job("copies", 12, not_after=13)
        self.run_dir.received("copies", 13.2)
        self.run_dir.reply("copies", 12.5)
        self.run_dir.reply("copies", 14, exit_code=9)
        status, printed, rules, _ = self.check()
        self.assertEqual(status, 1)
        # ("copies", with no fault in this run, is also listed under other rules.)
        self.assertEqual(rules["expired published"], ["late", "liar"])
        self.assertIn("expired published: 2", printed)

    def test_a_job_published_in_time_then_redelivered_and_expired_is_not_expired_published(self):
        self.a_clean_run()
        self.run_dir.job("redo", 10, not_after=12)
        self.run_dir.received("redo", 10.5)
        self.run_dir.fault("worker-kill", 10.6, 11)
        self.run_dir.reply("redo", 13, exit_code=9)
        status, _, rules, _ = self.check()
        self.assertEqual((status, rules), (0, {}))

    def test_a_duplicate_inside_a_fault_window_is_explained_outside_it_unexplained(self):
        self.a_clean_run()
        # s3 first received at +3.1; a worker-kill from +6 with timeout 5 covers it
        # (window starts at +1).
        self.run_dir.received("s3", 8)
        self.run_dir.fault("worker-kill", 6, 7)
        # s19 first received at +19.1: no fault window covers it (the kill at +6 ends its
        # window at +7 + 10 s bound, the one at +30 starts its window at +25).
        self.run_dir.received("s19", 19.5)
        status, printed, rules, check = self.check()
        self.assertEqual(status, 1)
        self.assertEqual(rules, {"unexplained duplicate": ["s19"]})
        causes = {d.job: d.cause for d in check.duplicates}
        self.assertEqual(causes["s19"], "UNEXPLAINED")
        self.assertTrue(causes["s3"].startswith("worker-kill w1"), causes)
        report = (self.run_dir.dir / "report.md").read_text()
        self.assertIn("UNEXPLAINED", report)
        self.assertIn("duplicates: 2 (1 explained)", printed)

    def test_the_self_tests_fault_switch_explains_no_duplicate(self):
        self.a_clean_run()
        self.run_dir.fault("worker-fault-switch", 0, 150)
        self.run_dir.received("s5", 5.5)
        _, _, rules, _ = self.check()
        self.assertEqual(rules, {"unexplained duplicate": ["s5"]})

    def test_a_fault_that_only_delays_or_loses_replies_explains_no_duplicate(self):
        self.a_clean_run()
        self.run_dir.fault("reply-queue-full", 5, 8, target="soak.replies.full")
        self.run_dir.fault("memory-alarm", 5, 8, target="node0")
        self.run_dir.received("s6", 6.5)
        _, _, rules, _ = self.check()
        self.assertEqual(rules, {"unexplained duplicate": ["s6"]})

    def test_the_cause_named_is_a_fault_on_the_duplicates_broker_first(self):
        self.a_clean_run()
        self.run_dir.fault("proxy-reset", 8.5, 8.6, target="a")
        self.run_dir.fault("partition", 8, 9, target="w2-b")
        self.run_dir.received("s8", 8.7)
        _, _, rules, check = self.check()
        self.assertEqual(rules, {})
        self.assertTrue(check.duplicates[0].cause.startswith("proxy-reset a"), check.duplicates)

    def worker_log(self, name, lines):
        (self.run_dir.dir / "workers").mkdir(exist_ok=True)
        (self.run_dir.dir / "workers" / f"{name}.log").write_text("".join(l + "\n" for l in lines))

    def test_a_duplicate_the_worker_retried_is_explained_by_its_log(self):
        self.a_clean_run()
        self.run_dir.received("s9", 9.5)    # the worker says: 2 attempts (text log)
        self.run_dir.received("s10", 10.5)  # the worker says: 1 attempt (JSON log)
        self.run_dir.received("s11", 11.5)  # the worker says: redelivered (text log)
        self.run_dir.write()
        self.worker_log("w1", [
            '2026-12-05T15:42:58Z  INFO job{correlation_id=s9}: mqtt_connector::worker: published '
            'correlation_id="s9" connector=a3 exit_code=0 attempts=2 duration_ms=1539 '
            'redelivered=false reply=Confirmed settlement=Ack',
            '2026-12-05T15:42:59Z  INFO job{correlation_id=s11}: mqtt_connector::worker: published '
            'correlation_id="s11" connector=a3 exit_code=0 attempts=1 duration_ms=9 '
            'redelivered=true reply=Confirmed settlement=Ack',
            "not a log line at all {"])
        self.worker_log("w2", [json.dumps({"level": "INFO", "fields": {
            "message": "published", "correlation_id": "s10", "exit_code": 0, "attempts": 1,
            "redelivered": False}}), '{"broken json'])
        _, _, rules, check = self.check()
        self.assertEqual(rules, {"unexplained duplicate": ["s10"]})
        causes = {d.job: d.cause for d in check.duplicates}
        self.assertEqual(causes, {"s9": "retried, attempts=2 (log of w1)", "s10": "UNEXPLAINED",
                                  "s11": "redelivered (log of w1)"})

    def test_a_retained_redelivery_is_not_a_duplicate(self):
        self.a_clean_run()
        self.run_dir.received("s4", 20, retain=True)
        status, _, rules, _ = self.check()
        self.assertEqual((status, rules), (0, {}))

    def test_two_replies_to_one_job_without_a_fault_are_an_unexplained_duplicate(self):
        self.a_clean_run()
        self.run_dir.reply("s7", 7.9)
        _, _, rules, check = self.check()
        self.assertEqual(rules, {"unexplained duplicate": ["s7"]})
        self.assertEqual(check.duplicates[0].what, "reply")

    def test_a_bad_job_answered_0_contradicts_its_expectation(self):
        self.a_clean_run()
        self.run_dir.job("b2", 10, kind="bad", expect="error")
        self.run_dir.received("b2", 10.1)
        self.run_dir.reply("b2", 10.2, exit_code=0)
        _, _, rules, _ = self.check()
        self.assertEqual(rules, {"contradicted expectation": ["b2"]})

    def test_a_job_expected_ok_failing_is_named_unless_a_fault_overlaps_it(self):
        self.a_clean_run()
        self.run_dir.job("f1", 40)
        self.run_dir.reply("f1", 48, exit_code=6)
        self.run_dir.job("f2", 29)
        self.run_dir.reply("f2", 37, exit_code=3)  # the worker-kill at +30 overlaps it
        status, printed, rules, _ = self.check()
        self.assertEqual(rules, {"failed without a fault": ["f1"]})
        self.assertEqual(status, 0)
        self.assertIn("failed without a fault (noted, not a violation): 1", printed)

    def test_a_job_received_though_its_reply_says_nothing_was_sent_is_named(self):
        self.a_clean_run()
        self.run_dir.job("b3", 10, kind="bad", expect="error")
        self.run_dir.received("b3", 10.1)
        self.run_dir.reply("b3", 10.2, exit_code=1)
        _, _, rules, _ = self.check()
        self.assertEqual(rules, {"published though refused": ["b3"]})

    def test_a_slow_answer_without_a_fault_is_named_and_with_one_is_not(self):
        self.a_clean_run()
        self.run_dir.sent_ok("slow", 50)
        self.run_dir.lines["replies"][-1]["t"] = T0 + 70  # 20 s > 5 s timeout + 10 s bound
        self.run_dir.sent_ok("waited", 80)
        self.run_dir.lines["replies"][-1]["t"] = T0 + 100
        self.run_dir.fault("memory-alarm", 82, 95, target="rabbit-1")
        status, printed, rules, check = self.check()
        self.assertEqual(status, 1)
        self.assertEqual(rules, {"answer time": ["slow"]})
        self.assertEqual(check.worst[:2], (20.0, "slow"))
        self.assertIn("worst answer time: 20.00s (job slow)", printed)

    def test_malformed_lines_are_reported_not_crashed(self):
        self.a_clean_run()
        raw = {"replies": '{"t": 1, "id": \n[1, 2]\n{"t": "soon", "id": "s1", "exit_code": 0}\n',
               "jobs": json.dumps(self.run_dir.lines["jobs"][0]) + "\n",
               "mqtt": "\x00garbage\n",
               "faults": '{"kind": "worker-kill"}\n'}
        status, printed, rules, check = self.check(raw)
        self.assertEqual(status, 1)
        self.assertEqual(rules, {"malformed": ["-"] * 6})
        details = " ".join(f.detail for f in check.findings)
        for expected in ("replies.jsonl:", "not JSON", "not a JSON object", "field 't'",
                         "seen twice", "mqtt.jsonl:", "field 't_start'"):
            self.assertIn(expected, details)
        self.assertIn("malformed: 6", printed)

    def test_missing_record_files_are_read_as_empty_but_a_run_without_jobs_cannot_be_checked(self):
        self.a_clean_run()
        path = self.run_dir.write()
        (path / "faults.jsonl").unlink()
        (path / "answers.jsonl").unlink()
        run = soak_check.load(path)
        self.assertEqual(sorted(run.missing), ["answers.jsonl", "faults.jsonl"])
        (path / "jobs.jsonl").unlink()
        err = io.StringIO()
        with redirect_stdout(io.StringIO()), unittest.mock.patch("sys.stderr", err):
            status = soak_check.main(["soak_check.py", str(path)])
        self.assertEqual(status, 2)
        self.assertIn("jobs.jsonl", err.getvalue())

    def test_the_picture_bins_a_30_minute_run_in_15_second_steps(self):
        self.run_dir.meta["ended"] = T0 + 1800
        self.run_dir.sent_ok("only", 1)
        self.run_dir.fault("mqtt-kill", 600, 610, target="b")
        self.check()
        svg = (self.run_dir.dir / "picture.svg").read_text()
        self.assertIn("15 s bins", svg)
        self.assertIn("mqtt-kill", svg)
        self.assertIn(">30:00<", svg)


    def test_the_docs_state_the_rules_the_checker_applies(self):
        docs = (Path(__file__).resolve().parent.parent / "docs" / "soak.md").read_text()
        self.assertIn(soak_check.RULES, docs)


if __name__ == "__main__":
    unittest.main()
