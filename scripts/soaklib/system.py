"""Starts the whole system for one run and stops it again (also on failure or Ctrl-C)."""

import os

from . import amqp, certs, load, workers
from .mosquitto import Mosquitto
from .mqtt import BrokerClients
from .netns import Namespace
from .ports import free_port
from .proxy import Forwarder
from .record import log

WORKERS = ("w1", "w2", "w3")
# w3 runs in the namespace: the partitions cut it from one of these.
PARTITION_TARGETS = ("a", "b", "rabbit")


class System:
    def __init__(self, run_dir, recorder, worker_bin, seed):
        self.run_dir = run_dir
        self.recorder = recorder
        self.worker_bin = worker_bin
        self.seed = seed
        self.state_dir = run_dir / "system"
        self.state_dir.mkdir()
        self._cleanup = []
        self.cluster = None
        self.mosquittos = {}
        self.forwarders = {}
        self.ns_forwarders = {}
        self.clients = {}
        self.workers = {}
        self.ns = None
        self.reader = None
        self.submitter = None

    def at_exit(self, fn):
        self._cleanup.append(fn)

    def stop(self):
        while self._cleanup:
            fn = self._cleanup.pop()
            try:
                fn()
            except Exception as e:  # keep cleaning up
                log(f"cleanup step failed: {e}")

    def start(self):
        from .rabbit import Cluster
        tls = certs.generate(self.state_dir / "certs")
        self.tls = tls
        # RabbitMQ first: the slowest to start.
        self.cluster = Cluster(self.state_dir, 3)
        self.at_exit(self.cluster.stop)
        self.cluster.start()

        self.mosquittos = {"a": Mosquitto("a", self.state_dir),
                           "b": Mosquitto("b", self.state_dir, extra_conf="max_qos 1\n", tls=tls)}
        for m in self.mosquittos.values():
            self.at_exit(m.kill)
            m.start()

        self.ns = Namespace(PARTITION_TARGETS)
        self.at_exit(self.ns.delete)
        os.makedirs(self.state_dir, exist_ok=True)

        # Workers reach each Mosquitto through a forwarder the soak controls (latency, bandwidth,
        # resets; held shut while a restarted broker's subscribers come back). It also listens
        # on the host end of the broker's veth, for w3.
        self.worker_ports = {}
        for name, m in self.mosquittos.items():
            port = free_port()
            self.worker_ports[name] = port
            f = Forwarder(f"mqtt-{name}", [("127.0.0.1", port, "127.0.0.1", m.port),
                                           (self.ns.host_addr(name), port, "127.0.0.1", m.port)],
                          self.state_dir)
            self.at_exit(f.stop)
            self.forwarders[name] = f
        rabbit_maps = [(self.ns.host_addr("rabbit"), n.port, "127.0.0.1", n.port) for n in self.cluster.nodes]
        f = Forwarder("rabbit-host", rabbit_maps, self.state_dir)
        self.at_exit(f.stop)
        # One forwarder per service inside the namespace, so a broker's can stop listening
        # with the host's (a broker that is down refuses w3 as it refuses the others).
        inner = {"rabbit": [("127.0.0.1", n.port, self.ns.host_addr("rabbit"), n.port) for n in self.cluster.nodes]}
        for b in "ab":
            inner[b] = [("127.0.0.1", self.worker_ports[b], self.ns.host_addr(b), self.worker_ports[b])]
        for service, maps in inner.items():
            f = Forwarder(f"netns-{service}", maps, self.state_dir, prefix=self.ns.prefix())
            self.at_exit(f.stop)
            self.ns_forwarders[service] = f

        for name, m in self.mosquittos.items():
            c = BrokerClients(name, m, self.recorder, self.seed + ord(name))
            self.clients[name] = c
            self.at_exit(c.stop)
            c.start()
        for name, c in self.clients.items():
            if not c.wait_ready():
                raise RuntimeError(f"the soak's MQTT clients on broker {name} did not subscribe")

        # Queues before the workers: the workers use them as they are.
        amqp.declare(self.cluster.url(1), self.cluster.url(0))
        self.reader = amqp.Reader(self.cluster.url(0), self.recorder)
        self.reader.start()
        self.at_exit(self.stop_reader)
        self.submitter = amqp.Submitter(self.cluster.url(0))
        self.at_exit(self.submitter.close)

        brokers = {name: {"tls": m.tls is not None, "worker_port": self.worker_ports[name]}
                   for name, m in self.mosquittos.items()}
        load.connectors(self.state_dir / "connectors", brokers, tls["ca.crt"])
        # Node 1 first: the node faults kill, so workers move between nodes.
        urls = [self.cluster.url(i) for i in (1, 2, 0)]
        opts = workers.options(urls, self.state_dir / "connectors")
        log_dir = self.run_dir / "workers"
        log_dir.mkdir()
        for name in WORKERS:
            prefix = self.ns.prefix() if name == "w3" else ()
            w = workers.Worker(name, self.worker_bin, opts, log_dir, prefix)
            self.workers[name] = w
            self.at_exit(w.kill)
            w.start()
        self.worker_options = opts

    def stop_reader(self):
        if self.reader is not None:
            self.reader.stopping.set()
            self.reader.join(10)

    def meta_brokers(self):
        out = {}
        for name, m in self.mosquittos.items():
            out[name] = {"port": m.port, "worker_port": self.worker_ports[name], "tls": m.tls is not None,
                         "mqtt": [3, 5] if name == "a" else [5], "max_qos": 1 if name == "b" else 2}
        return out
