#!/usr/bin/env python3
"""Submit one job to mqtt-connector from Python (pika), wait for its reply, print it, and exit
with the job's exit-code.

    python3 examples/python/submit.py --topic a/b --content hi
    python3 examples/python/submit.py --connector local --topic a/b --content hi \
        --amqp-url amqp://guest:guest@127.0.0.1:5672/%2f --queue mqtt-connector.send

A command that answers: --response-topic makes the job a `request`; the worker publishes it,
waits for the device's answer on that topic and returns it under `response`, which this script
also writes on stderr (`answer on TOPIC: ...`). With MQTT 3.1.1 the device learns the topic from
the content; with --mqtt-version 5 also from the Response Topic property.

    python3 examples/python/submit.py --topic meters/42/read --content '{"reply": "meters/42/answer"}' \
        --response-topic meters/42/answer

The AMQP URL and the queue default to $MQTT_CONNECTOR_AMQP_URL and $MQTT_CONNECTOR_QUEUE, as
for the worker; the topic and the content to $MQTT_TOPIC and $MQTT_CONTENT. Needs pika
(pip install -r examples/python/requirements.txt). The job goes out with a publisher confirm
and `mandatory`, so a queue nobody declared is an error here rather than a silent loss; the
reply comes back on an exclusive queue of this connection, matched by its correlation id.
"""

import argparse
import base64
import json
import os
import sys
import time
import uuid

import pika


def parse_args():
    env = os.environ.get
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--amqp-url", default=env("MQTT_CONNECTOR_AMQP_URL",
                                                  "amqp://guest:guest@127.0.0.1:5672/%2f"))
    parser.add_argument("--queue", default=env("MQTT_CONNECTOR_QUEUE", "mqtt-connector.send"))
    parser.add_argument("--connector", default="local")
    parser.add_argument("--topic", default=env("MQTT_TOPIC"))
    parser.add_argument("--content", default=env("MQTT_CONTENT", "hello from Python"))
    parser.add_argument("--response-topic",
                        help="make the job a request answered on this topic")
    parser.add_argument("--mqtt-version", choices=["3.1.1", "5"])
    parser.add_argument("--timeout", type=int, help="the job's timeout in milliseconds")
    parser.add_argument("--wait", type=float, default=60.0,
                        help="seconds to wait for the reply (default 60)")
    args = parser.parse_args()
    if not args.topic:
        parser.error("give a topic: --topic a/b (or MQTT_TOPIC=a/b)")
    return args


def show_answer(reply):
    """A request's answer, on stderr: the text, or the bytes when it was not UTF-8."""
    response = reply.get("response")
    if response is None:
        return
    content = response["content"]
    if response["content-encoding"] == "base64":
        content = base64.b64decode(content)
    print(f"answer on {response['topic']}: {content!r}", file=sys.stderr)
    for name, value in response.get("user-properties", []):
        print(f"  {name}: {value}", file=sys.stderr)


def main():
    args = parse_args()
    # A cluster's URL list (comma-separated) is for the worker; a client needs one node.
    url = args.amqp_url.split(",")[0]
    job = {"connector": args.connector, "topic": args.topic, "content": args.content}
    if args.response_topic:
        job.update({"action": "request", "response-topic": args.response_topic})
    if args.mqtt_version:
        job["mqtt-version"] = args.mqtt_version
    if args.timeout is not None:
        job["timeout"] = args.timeout

    connection = pika.BlockingConnection(pika.URLParameters(url))
    channel = connection.channel()
    reply_queue = channel.queue_declare("", exclusive=True).method.queue
    channel.confirm_delivery()
    correlation_id = str(uuid.uuid4())
    try:
        channel.basic_publish(
            exchange="",
            routing_key=args.queue,
            body=json.dumps(job).encode(),
            properties=pika.BasicProperties(
                reply_to=reply_queue,
                correlation_id=correlation_id,
                content_type="application/json",
                delivery_mode=pika.DeliveryMode.Persistent,
            ),
            mandatory=True,
        )
    except pika.exceptions.UnroutableError:
        print(f"no queue {args.queue!r}: start a worker first (it declares the queue)",
              file=sys.stderr)
        return 1

    deadline = time.monotonic() + args.wait
    for _method, properties, body in channel.consume(reply_queue, auto_ack=True,
                                                     inactivity_timeout=1):
        if body is not None and properties.correlation_id == correlation_id:
            reply = json.loads(body)
            show_answer(reply)
            print(body.decode())
            connection.close()
            return reply["exit-code"]
        if time.monotonic() > deadline:
            break
    print(json.dumps({"exit-code": 6, "message": f"no reply within {args.wait:g} s"}))
    connection.close()
    return 6


if __name__ == "__main__":
    sys.exit(main())
