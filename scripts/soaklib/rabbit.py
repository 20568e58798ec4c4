"""A private RabbitMQ cluster: 3 nodes with their own names, ports, directories, config and
Erlang cookie (a private HOME), like tests/common/rabbitmq.rs. Never the machine's node on 5672."""

import os
import signal
import subprocess
import time
import uuid

from .ports import free_port, port_open
from .record import log

# Debian's scripts; the /usr/sbin wrappers would switch user.
BIN = "/usr/lib/rabbitmq/bin"


class Node:
    def __init__(self, index, name, port, dist_port):
        self.index = index
        self.name = name
        self.port = port
        self.dist_port = dist_port
        self.proc = None


class Cluster:
    def __init__(self, base_dir, size=3):
        self.dir = base_dir / "rabbitmq"
        self.dir.mkdir(parents=True)
        home = self.dir / "home"
        home.mkdir()
        cookie = home / ".erlang.cookie"
        cookie.write_text(uuid.uuid4().hex)
        cookie.chmod(0o400)
        (self.dir / "env.conf").write_text("")
        (self.dir / "enabled_plugins").write_text("[].\n")
        tag = uuid.uuid4().hex[:8]
        self.nodes = [Node(i, f"soak-{tag}-{i}@localhost", free_port(), free_port()) for i in range(size)]
        conf = ["loopback_users = none",
                "cluster_formation.peer_discovery_backend = classic_config",
                "cluster_formation.randomized_startup_delay_range.min = 0",
                "cluster_formation.randomized_startup_delay_range.max = 1"]
        conf += [f"cluster_formation.classic_config.nodes.{n.index + 1} = {n.name}" for n in self.nodes]
        self.conf = "\n".join(conf) + "\n"

    def env(self):
        env = dict(os.environ)
        env.update({"HOME": str(self.dir / "home"),
                    "RABBITMQ_CONF_ENV_FILE": str(self.dir / "env.conf"),
                    "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.dir / "enabled_plugins"),
                    "ERL_EPMD_ADDRESS": "127.0.0.1"})
        env.pop("RABBITMQ_NODENAME", None)
        env.pop("ERL_FLAGS", None)
        return env

    def url(self, i):
        return f"amqp://guest:guest@127.0.0.1:{self.nodes[i].port}/%2f"

    def start_node(self, i):
        node = self.nodes[i]
        conf_path = self.dir / f"node-{i}.conf"
        conf_path.write_text(self.conf)
        env = self.env()
        env.update({"RABBITMQ_NODENAME": node.name,
                    "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
                    "RABBITMQ_NODE_PORT": str(node.port),
                    "RABBITMQ_DIST_PORT": str(node.dist_port),
                    "RABBITMQ_CONFIG_FILE": str(conf_path),
                    "RABBITMQ_MNESIA_BASE": str(self.dir / f"node-{i}/mnesia"),
                    "RABBITMQ_LOG_BASE": str(self.dir / f"node-{i}/log")})
        out = open(self.dir / f"node-{i}.out", "ab")
        # Its own process group: a kill takes the Erlang VM and its helpers with the script.
        node.proc = subprocess.Popen([f"{BIN}/rabbitmq-server"], env=env, stdin=subprocess.DEVNULL,
                                     stdout=out, stderr=out, start_new_session=True)
        out.close()

    def wait_booted(self, i, timeout=120):
        deadline = time.time() + timeout
        while not port_open(self.nodes[i].port):
            if time.time() > deadline or self.nodes[i].proc.poll() is not None:
                raise RuntimeError(f"RabbitMQ node {i} did not start; see {self.dir}/node-{i}.out")
            time.sleep(0.2)
        self.ctl(i, "await_startup", "--timeout", "60")

    def start(self):
        started = time.time()
        for i in range(len(self.nodes)):
            self.start_node(i)
        for i in range(len(self.nodes)):
            self.wait_booted(i)
        deadline = time.time() + 120
        while self.ctl(0, "eval", "length(rabbit_nodes:all_running()).").strip() != str(len(self.nodes)):
            if time.time() > deadline:
                raise RuntimeError("the RabbitMQ cluster did not form")
            time.sleep(0.3)
        log(f"RabbitMQ: {len(self.nodes)} private nodes up in {time.time() - started:.1f} s")

    def kill_node(self, i):
        proc = self.nodes[i].proc
        if proc is None:
            return
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
        self.nodes[i].proc = None

    def ctl(self, via, *args, tool="rabbitmqctl", check=True):
        out = subprocess.run([f"{BIN}/{tool}", "-q", "-n", self.nodes[via].name, *args], env=self.env(),
                             stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=90)
        if check and out.returncode != 0:
            raise RuntimeError(f"{tool} {args} on node {via} failed: {out.stdout}{out.stderr}")
        return out.stdout

    def stop(self):
        for i in range(len(self.nodes)):
            self.kill_node(i)
