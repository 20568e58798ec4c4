"""The faults, at moments drawn from the soak's seeded generator, each logged to faults.jsonl
with its start and end. Two lanes run side by side, each one fault at a time: the RabbitMQ
lane (node kills, memory alarms, reply queues: so never two nodes down at once) and the lane
of workers, Mosquittos, the partition and the proxy."""

import random
import signal
import threading
import time

from .record import log
from .system import PARTITION_TARGETS, WORKERS

RABBIT_LANE = ("rabbit-node-kill", "memory-alarm", "reply-queue-delete", "reply-queue-full")
OTHER_LANE = ("worker-kill", "worker-term", "mqtt-stop", "mqtt-kill", "partition", "proxy-latency",
              "proxy-bandwidth", "proxy-reset")


class Faults:
    def __init__(self, system, recorder, rng):
        self.s = system
        self.recorder = recorder
        self.rng = rng
        self.stopping = threading.Event()
        self.threads = []
        self.errors = []
        # The reply queue the reply-queue-delete fault deletes next; jobs name it (10 %).
        self.deletable = 0
        self.deletable_queue = "soak.replies.del-0"

    def start(self):
        # Each lane gets its own generator drawn from the seed, so one lane's timing does not
        # shift the other's choices.
        for name, kinds in (("rabbit", RABBIT_LANE), ("other", OTHER_LANE)):
            lane_seed = self.rng.getrandbits(64)
            t = threading.Thread(target=self._lane, args=(name, kinds, lane_seed), name=f"faults-{name}",
                                 daemon=True)
            t.start()
            self.threads.append(t)

    def stop(self):
        self.stopping.set()
        for t in self.threads:
            t.join(120)

    def _lane(self, name, kinds, seed):
        rng = random.Random(seed)
        order = []
        if self.stopping.wait(rng.uniform(5, 10)):
            return
        while not self.stopping.is_set():
            if not order:
                # Every kind once per round, in a random order.
                order = list(kinds)
                rng.shuffle(order)
            kind = order.pop()
            try:
                getattr(self, kind.replace("-", "_"))(rng)
            except Exception as e:  # the soak reports it; the other lane goes on
                self.errors.append(f"{kind}: {e}")
                log(f"fault {kind} failed: {e}")
            if self.stopping.wait(rng.uniform(1, 4)):
                return

    def _log(self, kind, target, detail, t_start):
        t_end = time.time()
        self.recorder.fault(kind, target, detail, t_start, t_end)
        log(f"fault {kind} {target}: {detail} ({t_end - t_start:.1f} s)")

    # The RabbitMQ lane.

    def rabbit_node_kill(self, rng):
        node = rng.choice((1, 2))  # node 0 carries the soak's own clients
        down = rng.uniform(2, 6)
        t = time.time()
        self.s.cluster.kill_node(node)
        time.sleep(down)
        self.s.cluster.start_node(node)
        self.s.cluster.wait_booted(node)
        self._log("rabbit-node-kill", f"node{node}", f"SIGKILL, started again after {down:.1f} s", t)

    def memory_alarm(self, rng):
        node = rng.choice((0, 1, 2))
        hold = rng.uniform(2, 6)
        t = time.time()
        self.s.cluster.ctl(node, "set_vm_memory_high_watermark", "absolute", "1")
        time.sleep(hold)
        self.s.cluster.ctl(node, "set_vm_memory_high_watermark", "0.4")
        self._log("memory-alarm", f"node{node}", f"watermark 1 byte for {hold:.1f} s", t)

    def reply_queue_delete(self, rng):
        """Jobs keep naming the deleted queue for a few seconds: their replies cannot be routed,
        so the workers dead-letter them (with their outcome) after their 30-s reply window."""
        old = self.deletable_queue
        t = time.time()
        deleted = self.s.reader.call(lambda ch: self.s.reader.delete_when_empty(old))
        time.sleep(rng.uniform(2, 5))
        self.deletable += 1
        new = f"soak.replies.del-{self.deletable}"
        self.s.reader.call(lambda ch: self.s.reader.declare_deletable(ch, new))
        self.deletable_queue = new
        self._log("reply-queue-delete", old, f"deleted ({'empty' if deleted else 'not emptied in 10 s'}); "
                  f"jobs named it until {new} replaced it", t)

    def reply_queue_full(self, rng):
        from .amqp import FULL, FULL_LENGTH
        pause = rng.uniform(5, 15)
        t = time.time()
        self.s.reader.call(lambda ch: self.s.reader.cancel(ch, FULL))
        time.sleep(pause)
        self.s.reader.call(lambda ch: self.s.reader.consume(ch, FULL))
        self._log("reply-queue-full", FULL, f"not read for {pause:.1f} s (x-max-length {FULL_LENGTH}, "
                  "reject-publish)", t)

    # The other lane.

    def worker_kill(self, rng):
        w = self.s.workers[rng.choice(WORKERS)]
        down = rng.uniform(0.5, 3)
        t = time.time()
        w.kill()
        time.sleep(down)
        w.start()
        self._log("worker-kill", w.name, f"SIGKILL, started again after {down:.1f} s", t)

    def worker_term(self, rng):
        w = self.s.workers[rng.choice(WORKERS)]
        t = time.time()
        status = w.terminate()
        w.start()
        self._log("worker-term", w.name, f"SIGTERM, exit status {status}, started again", t)

    def mqtt_stop(self, rng):
        name = rng.choice(("a", "b"))
        hold = rng.uniform(2, 10)
        t = time.time()
        self.s.mosquittos[name].signal(signal.SIGSTOP)
        time.sleep(hold)
        self.s.mosquittos[name].signal(signal.SIGCONT)
        self._log("mqtt-stop", name, f"SIGSTOP for {hold:.1f} s, then SIGCONT", t)

    def mqtt_kill(self, rng):
        """The workers' forwarder stops relaying half a second before the kill, so what the
        broker acknowledged has reached the recording subscriber (the soak measures the
        worker, not Mosquitto's durability), and stops listening (connections are refused, as
        by a broker that is down) until the subscribers and devices are back on the restarted
        broker."""
        name = rng.choice(("a", "b"))
        down = rng.uniform(0.5, 3)
        f, inner = self.s.forwarders[name], self.s.ns_forwarders[name]
        t = time.time()
        inner.command("close")
        f.command("close")
        f.command("hold")
        time.sleep(0.5)
        self.s.mosquittos[name].kill()
        f.command("release")
        time.sleep(down)
        self.s.mosquittos[name].restart()
        ready = self.s.clients[name].wait_ready(30)
        f.command("open")
        inner.command("open")
        self._log("mqtt-kill", name, f"SIGKILL, started again on its port after {down:.1f} s"
                  + ("" if ready else "; subscribers not back within 30 s"), t)

    def partition(self, rng):
        target = rng.choice(PARTITION_TARGETS)
        hold = rng.uniform(2, 10)
        t = time.time()
        self.s.ns.set_link(target, False)
        time.sleep(hold)
        self.s.ns.set_link(target, True)
        self._log("partition", f"w3-{target}", f"veth down for {hold:.1f} s", t)

    def proxy_latency(self, rng):
        name = rng.choice(("a", "b"))
        ms = rng.uniform(100, 1000)
        self._forwarder_for_a_while(rng, "proxy-latency", name, f"latency {ms:.0f}",
                                    f"{ms:.0f} ms each way")

    def proxy_bandwidth(self, rng):
        name = rng.choice(("a", "b"))
        bps = rng.uniform(500, 5000)
        self._forwarder_for_a_while(rng, "proxy-bandwidth", name, f"bandwidth {bps:.0f}",
                                    f"{bps:.0f} bytes/s per direction")

    def _forwarder_for_a_while(self, rng, kind, name, command, what):
        """A forwarder slowed by `command` for 3-10 s, then normal again."""
        hold = rng.uniform(3, 10)
        t = time.time()
        self.s.forwarders[name].command(command)
        time.sleep(hold)
        self.s.forwarders[name].command("normal")
        self._log(kind, name, f"{what} for {hold:.1f} s", t)

    def proxy_reset(self, rng):
        name = rng.choice(("a", "b"))
        t = time.time()
        self.s.forwarders[name].command("reset")
        self._log("proxy-reset", name, "every worker connection reset (RST)", t)
