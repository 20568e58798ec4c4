"""The job mix: `send` and `request` jobs over both brokers, QoS 0/1/2, MQTT 3.1.1 and 5,
several connectors, some with `not-after`, and a trickle of bad jobs of every class the worker
must contain. Every choice comes from the soak's seeded random generator."""

import datetime
import json

from .mqtt import request_topic, response_topic, send_topic

TIMEOUT_MS = 8000
MAX_CONTENT_BYTES = 65536

# connector name -> (broker, MQTT version); written to the connectors folder by connectors().
CONNECTORS = {"a3": ("a", 3), "a5": ("a", 5), "b5": ("b", 5)}


def connectors(folder, brokers, ca_path):
    """The connector files every worker loads: brokers as the workers reach them (127.0.0.1
    and the port of the forwarder in front of each Mosquitto)."""
    folder.mkdir(parents=True)
    for name, (broker, version) in CONNECTORS.items():
        b = brokers[broker]
        c = {"client-id": f"soak-{name}", "qos": 1}
        if b["tls"]:
            c["broker"] = f"ssl://127.0.0.1:{b['worker_port']}"
            c["root-ca-crt"] = str(ca_path)
        else:
            c["broker"] = f"tcp://127.0.0.1:{b['worker_port']}"
        if version == 5:
            c["mqtt-version"] = "5"
        (folder / f"{name}.json").write_text(json.dumps(c, indent=1) + "\n")
    locked = {"broker": f"tcp://127.0.0.1:{brokers['a']['worker_port']}", "client-id": "soak-locked",
              "topic": "soak/a/send/locked/q1", "qos": 1, "job-may-set": ["topic", "content", "qos"]}
    (folder / "locked.json").write_text(json.dumps(locked, indent=1) + "\n")


def rfc3339(t):
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).isoformat(timespec="milliseconds")


def _bad(cls, job_id):
    """(body bytes, broker) for one bad job of class `cls`; every one must end in an error."""
    content = f"soak {job_id}"
    ok = {"connector": "a3", "topic": send_topic("a", "bad", 1), "content": content}

    def j(**changes):
        body = dict(ok)
        body.update(changes)
        return json.dumps(body).encode()

    bodies = {
        "invalid-json": b'{"connector": "a3", "topic": ',
        "not-utf8": b'{"connector": "a3", "content": "\xff\xfe"}',
        "not-an-object": json.dumps([ok]).encode(),
        "two-objects": j() + j(),
        "unknown-connector": j(connector="no-such-connector"),
        "unknown-key": j(qoss=1),
        "wrong-type": j(qos="high"),
        "qos-3": j(qos=3),
        "empty-topic": j(topic=""),
        "wildcard-topic": j(topic="soak/a/send/+/x"),
        "wildcard-hash": j(topic="soak/a/send/#"),
        "nul-in-topic": j(topic="soak/a/send/bad\u0000x"),
        "oversized-content": j(content=content + " " + "x" * MAX_CONTENT_BYTES),
        "forbidden-key": j(connector="locked", retain=True),
        "not-after-no-offset": j(**{"not-after": "2026-12-05T09:00:00"}),
        "job-file": j(**{"root-ca-crt": "/etc/ssl/certs/ca-certificates.crt"}),
        "request-no-response-topic": j(action="request"),
        "unknown-action": j(action="delete"),
        "timeout-zero": j(timeout=0),
        "no-broker": json.dumps({"client-id": "x", "topic": "soak/a/send/bad/q1", "content": content}).encode(),
    }
    return bodies[cls]


BAD_CLASSES = ("invalid-json", "not-utf8", "not-an-object", "two-objects", "unknown-connector",
               "unknown-key", "wrong-type", "qos-3", "empty-topic", "wildcard-topic", "wildcard-hash",
               "nul-in-topic", "oversized-content", "forbidden-key", "not-after-no-offset", "job-file",
               "request-no-response-topic", "unknown-action", "timeout-zero", "no-broker")


class Mix:
    def __init__(self, rng):
        self.rng = rng
        self.seq = 0
        self.bad_next = 0

    def next(self, now, reply_to):
        """(job record for jobs.jsonl without `t`, AMQP body)."""
        rng = self.rng
        self.seq += 1
        job_id = f"j{self.seq:06d}"
        record = {"id": job_id, "kind": None, "expect": "ok", "bad_class": None, "broker": "a",
                  "topic": None, "qos": None, "mqtt": None, "timeout_s": TIMEOUT_MS / 1000,
                  "not_after": None, "device": None, "reply_to": reply_to, "marker": job_id}
        roll = rng.random()
        if roll < 0.04:
            cls = BAD_CLASSES[self.bad_next % len(BAD_CLASSES)]
            self.bad_next += 1
            record.update(kind="bad", expect="error", bad_class=cls, topic=send_topic("a", "bad", 1),
                          qos=1, mqtt=3)
            return record, _bad(cls, job_id)
        connector = rng.choice(list(CONNECTORS))
        broker, version = CONNECTORS[connector]
        qos = rng.choice((0, 1, 2))
        body = {"connector": connector, "content": f"soak {job_id}", "qos": qos, "timeout": TIMEOUT_MS}
        record.update(broker=broker, qos=qos, mqtt=version)
        if roll < 0.55:
            record["kind"] = "send"
            topic = send_topic(broker, connector, qos)
            if rng.random() < 0.15:
                # Already past (must end 9, nothing published), or so close that either is right.
                if rng.random() < 0.5:
                    not_after, record["expect"] = now - rng.uniform(0.5, 5), "expired"
                else:
                    not_after, record["expect"] = now + rng.uniform(0.05, 1.0), "any"
                record["not_after"] = not_after
                body["not-after"] = rfc3339(not_after)
        else:
            device = rng.choices(("fast", "slow", "never"), (0.5, 0.35, 0.15))[0]
            record.update(kind="request", device=device, expect="no-answer" if device == "never" else "ok")
            topic = request_topic(broker, device)
            body.update({"action": "request", "response-topic": response_topic(broker)})
        body["topic"] = topic
        record["topic"] = topic
        return record, json.dumps(body).encode()
