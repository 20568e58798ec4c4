"""The soak's own RabbitMQ clients: queue setup, the submitter and the reply/dead-letter
reader. They use node 0, which the faults never kill: the instrument must not lose or double
what it measures (the workers use every node, node 1 first)."""

import base64
import json
import queue
import threading
import time

import pika

JOBS = "soak.jobs"
DEAD = "soak.dead"
REPLIES = "soak.replies"
FULL = "soak.replies.full"
FULL_LENGTH = 10
# A quorum queue counts returns beyond the first delivery (see src/amqp/queue.rs): 4 means a
# job whose worker died 5 times is dead-lettered.
DELIVERY_LIMIT = 4


def params(url):
    p = pika.URLParameters(url)
    p.heartbeat = 30
    p.blocked_connection_timeout = None
    p.connection_attempts = 5
    p.retry_delay = 1
    return p


def declare(leader_url, local_url):
    """The request queue and the dead-letter queue as quorum queues led by the node of
    `leader_url` (a node the faults kill), the reply queues on node 0 (`local_url`). The
    workers use existing queues as they are."""
    with pika.BlockingConnection(params(leader_url)) as conn:
        ch = conn.channel()
        ch.queue_declare(DEAD, durable=True, arguments={"x-queue-type": "quorum"})
        ch.queue_declare(JOBS, durable=True, arguments={
            "x-queue-type": "quorum", "x-delivery-limit": DELIVERY_LIMIT,
            "x-dead-letter-exchange": "", "x-dead-letter-routing-key": DEAD,
            # As the worker declares it (docs/fleet.md): at most once, a job dead-lettered
            # while soak.dead's leader is down is dropped.
            "x-dead-letter-strategy": "at-least-once", "x-overflow": "reject-publish"})
    with pika.BlockingConnection(params(local_url)) as conn:
        ch = conn.channel()
        ch.queue_declare(REPLIES, durable=True)
        ch.queue_declare(FULL, durable=True, arguments={"x-max-length": FULL_LENGTH,
                                                        "x-overflow": "reject-publish"})


class Submitter:
    """Publishes jobs to the request queue with publisher confirms, one at a time."""

    def __init__(self, url):
        self.url = url
        self.conn = None
        self.ch = None

    def _connect(self):
        self.conn = pika.BlockingConnection(params(self.url))
        self.ch = self.conn.channel()
        self.ch.confirm_delivery()

    def publish(self, body, correlation_id, reply_to):
        props = pika.BasicProperties(correlation_id=correlation_id, reply_to=reply_to, delivery_mode=2)
        for attempt in range(10):
            try:
                if self.conn is None or self.conn.is_closed:
                    self._connect()
                self.ch.basic_publish("", JOBS, body, props, mandatory=True)
                return
            except (pika.exceptions.AMQPError, OSError):
                # Node 0 is never killed: this is rare, and a job published twice would show
                # as a duplicate in the report rather than hide.
                self.conn = None
                time.sleep(0.5)
        raise RuntimeError(f"could not submit job {correlation_id}")

    def close(self):
        # Idle through the quiet period, the connection may have missed its heartbeats.
        try:
            if self.conn is not None and self.conn.is_open:
                self.conn.close()
        except (pika.exceptions.AMQPError, OSError):
            pass


def _reply_record(queue_name, props, body):
    record = {"t": time.time(), "id": props.correlation_id, "exit_code": None, "message": None,
              "response_payload": None, "queue": queue_name}
    try:
        reply = json.loads(body)
        record["exit_code"] = reply.get("exit-code")
        record["message"] = reply.get("message")
        response = reply.get("response")
        if isinstance(response, dict) and isinstance(response.get("content"), str):
            content = response["content"]
            if response.get("content-encoding") == "base64":
                content = base64.b64decode(content).decode("utf-8", "replace")
            record["response_payload"] = content
    except (ValueError, AttributeError):
        record["message"] = "unparsable reply: " + body.decode("utf-8", "replace")[:200]
    return record


def _dead_record(props, body):
    headers = props.headers or {}
    message = headers.get("x-mqtt-connector-message")
    if isinstance(message, bytes):
        message = message.decode("utf-8", "replace")
    return {"t": time.time(), "id": props.correlation_id,
            "exit_code": headers.get("x-mqtt-connector-exit-code"), "message": message}


class Reader(threading.Thread):
    """Reads the reply queues and the dead-letter queue into replies.jsonl and dead.jsonl. The
    faults ask it (through `call`) to pause the full reply queue, or delete a reply queue."""

    def __init__(self, url, recorder):
        super().__init__(name="amqp-reader", daemon=True)
        self.url = url
        self.recorder = recorder
        self.calls = queue.Queue()
        self.stopping = threading.Event()
        self.tags = {}
        self.error = None
        self.received = 0

    def call(self, fn):
        """Runs fn(channel) on this thread (the channel is not thread-safe); returns its result (or raises its error)."""
        done = queue.Queue()
        self.calls.put((fn, done))
        ok, value = done.get(timeout=120)
        if not ok:
            raise value
        return value

    def consume(self, ch, name, auto_ack=False):
        def on_reply(ch, method, props, body, name=name):
            self.recorder.write("replies", _reply_record(name, props, body))
            self.received += 1
            if not auto_ack:
                ch.basic_ack(method.delivery_tag)
        self.tags[name] = ch.basic_consume(name, on_reply, auto_ack=auto_ack)

    def declare_deletable(self, ch, name):
        """A reply queue the faults delete; read without acknowledgements, so what RabbitMQ
        sent before the delete is ours, not lost with the queue."""
        ch.queue_declare(name, durable=True)
        self.consume(ch, name, auto_ack=True)

    def delete_when_empty(self, name, deadline_s=10):
        """Deletes the queue once it holds no message (if-empty, retried: a refused if-empty
        closes the channel it was tried on, so a throwaway one)."""
        deadline = time.time() + deadline_s
        while True:
            self.conn.process_data_events(time_limit=0.05)
            try:
                side = self.conn.channel()
                side.queue_delete(name, if_empty=True)
                side.close()
                self.tags.pop(name, None)
                return True
            except pika.exceptions.ChannelClosedByBroker:
                if time.time() > deadline:
                    return False

    def cancel(self, ch, name):
        tag = self.tags.pop(name, None)
        if tag is not None:
            ch.basic_cancel(tag)

    def run(self):
        try:
            conn = self.conn = pika.BlockingConnection(params(self.url))
            ch = self.ch = conn.channel()
            ch.basic_qos(prefetch_count=500)
            self.consume(ch, REPLIES)
            self.consume(ch, FULL)

            def on_dead(ch, method, props, body):
                self.recorder.write("dead", _dead_record(props, body))
                ch.basic_ack(method.delivery_tag)
            ch.basic_consume(DEAD, on_dead)
            while not self.stopping.is_set():
                conn.process_data_events(time_limit=0.1)
                while not self.calls.empty():
                    fn, done = self.calls.get()
                    try:
                        done.put((True, fn(ch)))
                    except Exception as e:  # handed to the caller
                        done.put((False, e))
            conn.close()
        except Exception as e:  # reported by the soak at the end
            self.error = e
