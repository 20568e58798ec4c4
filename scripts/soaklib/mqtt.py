"""The soak's MQTT clients on each broker, connected straight to Mosquitto (not through the
proxies): a recording subscriber on every job topic, and devices that answer requests fast,
slowly, or never."""

import random
import ssl
import threading
import time

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

DEVICES = ("fast", "slow", "never")


def send_topic(broker, connector, qos):
    return f"soak/{broker}/send/{connector}/q{qos}"


def request_topic(broker, device):
    return f"soak/{broker}/req/{device}"


def response_topic(broker):
    return f"soak/{broker}/resp/{{correlation-id}}"


class Client:
    """A persistent-session MQTT 5 client that subscribes again on every connect; `ready` is
    set once the broker acknowledged its subscriptions."""

    def __init__(self, broker, client_id, subscriptions, on_message):
        self.broker = broker
        self.subscriptions = subscriptions
        self.ready = threading.Event()
        c = self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                                      protocol=mqtt.MQTTv5)
        if broker.tls:
            c.tls_set(ca_certs=str(broker.tls["ca.crt"]), tls_version=ssl.PROTOCOL_TLS_CLIENT)
        c.reconnect_delay_set(0.1, 1)
        c.max_inflight_messages_set(1000)
        c.max_queued_messages_set(0)
        c.on_connect = self._on_connect
        c.on_disconnect = lambda *a: self.ready.clear()
        c.on_subscribe = lambda *a: self.ready.set()
        c.on_message = on_message

    def start(self):
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600
        self.client.connect_async("127.0.0.1", self.broker.port, keepalive=30, clean_start=False,
                                  properties=props)
        self.client.loop_start()

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        if not reason_code.is_failure:
            client.subscribe([(topic, qos) for topic, qos in self.subscriptions])

    def stop(self):
        self.client.disconnect()
        self.client.loop_stop()


class BrokerClients:
    """Everything the soak runs against one broker."""

    def __init__(self, name, broker, recorder, rng_seed):
        self.name = name
        self.recorder = recorder
        self.slow_delay = (1.0, 3.0)
        self._rng_lock = threading.Lock()
        self._rng = random.Random(rng_seed)
        self.clients = [Client(broker, f"soak-rec-{name}",
                               [(f"soak/{name}/send/#", 2), (f"soak/{name}/req/#", 2)], self._record)]
        for device in DEVICES:
            self.clients.append(Client(broker, f"soak-dev-{name}-{device}",
                                       [(request_topic(name, device), 1)],
                                       lambda c, u, m, d=device: self._device(d, c, m)))

    def start(self):
        for c in self.clients:
            c.start()

    def wait_ready(self, timeout=30):
        deadline = time.time() + timeout
        for c in self.clients:
            if not c.ready.wait(max(0.0, deadline - time.time())):
                return False
        return True

    def stop(self):
        for c in self.clients:
            c.stop()

    def _record(self, client, userdata, msg):
        self.recorder.write("mqtt", {"t": time.time(), "broker": self.name, "topic": msg.topic,
                                     "payload": msg.payload.decode("utf-8", "replace"),
                                     "qos": msg.qos, "retain": bool(msg.retain)})

    def _device(self, device, client, msg):
        text = msg.payload.decode("utf-8", "replace")
        if device == "never" or not text.startswith("soak "):
            return
        job_id = text[len("soak "):]
        props = Properties(PacketTypes.PUBLISH)
        asked = msg.properties
        if asked is not None and hasattr(asked, "CorrelationData"):
            props.CorrelationData = asked.CorrelationData
        topic = f"soak/{self.name}/resp/{job_id}"
        answer = f"answer {job_id}"

        def send():
            self.recorder.write("answers", {"t": time.time(), "job_id": job_id, "device": device,
                                            "payload": answer})
            client.publish(topic, answer, qos=1, properties=props)

        if device == "fast":
            send()
        else:
            with self._rng_lock:
                delay = self._rng.uniform(*self.slow_delay)
            timer = threading.Timer(delay, send)
            timer.daemon = True
            timer.start()
