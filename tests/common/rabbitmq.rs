//! Private RabbitMQ nodes owned by a test: a single node or a cluster, each node with its own
//! name (`mqc-<random>-<i>@localhost`), AMQP and distribution ports, data and log directories
//! and config file in a temporary directory, one Erlang cookie per cluster (in a private
//! `HOME`). Never the machine's shared node on 5672. Killed (SIGKILL to the node's process
//! group) when dropped or on [`RabbitCluster::kill`].
//!
//! ```ignore
//! let cluster = RabbitCluster::start(3, &RabbitConfig::default()).await;
//! let url = cluster.url(0);
//! cluster.kill(1);
//! ```

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Where Debian's package puts the scripts; the /usr/sbin wrappers would switch user.
const BIN: &str = "/usr/lib/rabbitmq/bin";

/// What a node is started with beyond the defaults.
#[derive(Clone, Debug, Default)]
pub struct RabbitConfig {
    /// Lines appended to every node's `rabbitmq.conf` (new-style sysctl format).
    pub extra_conf: String,
    /// Plugins to enable, e.g. `rabbitmq_auth_mechanism_ssl`.
    pub plugins: Vec<String>,
    /// Give each node a TLS listener too (its port is [`RabbitCluster::tls_port`]).
    pub tls_listener: bool,
}

/// One node: its process (the `rabbitmq-server` script, leader of its own process group, so the
/// Erlang VM dies with it) and its ports.
pub struct RabbitNode {
    pub name: String,
    pub port: u16,
    pub dist_port: u16,
    pub tls_port: Option<u16>,
    child: Option<Child>,
    log: PathBuf,
}

/// A set of private nodes forming one cluster (one node is a cluster of one).
pub struct RabbitCluster {
    pub nodes: Vec<RabbitNode>,
    dir: tempfile::TempDir,
}

impl RabbitCluster {
    /// Starts `n` nodes at once (they form a cluster through classic config peer discovery)
    /// and returns when every node is booted and the cluster lists all of them. Panics with
    /// the nodes' logs after 120 s.
    pub async fn start(n: usize, config: &RabbitConfig) -> RabbitCluster {
        let started = Instant::now();
        let dir = tempfile::Builder::new()
            .prefix("rabbitmq-")
            .tempdir()
            .expect("tempdir");
        let home = dir.path().join("home");
        std::fs::create_dir_all(&home).expect("home");
        let cookie = home.join(".erlang.cookie");
        std::fs::write(&cookie, uuid::Uuid::new_v4().simple().to_string()).expect("cookie");
        std::fs::set_permissions(&cookie, std::fs::Permissions::from_mode(0o400))
            .expect("chmod cookie");
        std::fs::write(dir.path().join("env.conf"), "").expect("env.conf");
        let plugins = format!("[{}].\n", config.plugins.join(","));
        std::fs::write(dir.path().join("enabled_plugins"), plugins).expect("enabled_plugins");

        let tag = &uuid::Uuid::new_v4().simple().to_string()[..8];
        let mut nodes: Vec<RabbitNode> = (0..n)
            .map(|i| RabbitNode {
                name: format!("mqc-{tag}-{i}@localhost"),
                port: super::free_port(),
                dist_port: super::free_port(),
                tls_port: config.tls_listener.then(super::free_port),
                child: None,
                log: dir.path().join(format!("node-{i}.out")),
            })
            .collect();
        let mut conf = String::from("loopback_users = none\n");
        if n > 1 {
            conf.push_str("cluster_formation.peer_discovery_backend = classic_config\n");
            // Nodes started together need no random delay to avoid racing: node 0 is the seed.
            conf.push_str("cluster_formation.randomized_startup_delay_range.min = 0\n");
            conf.push_str("cluster_formation.randomized_startup_delay_range.max = 1\n");
            for (i, node) in nodes.iter().enumerate() {
                conf.push_str(&format!(
                    "cluster_formation.classic_config.nodes.{} = {}\n",
                    i + 1,
                    node.name
                ));
            }
        }
        conf.push_str(&config.extra_conf);
        conf.push('\n');
        for (i, node) in nodes.iter_mut().enumerate() {
            let mut node_conf = conf.clone();
            if let Some(tls_port) = node.tls_port {
                node_conf.push_str(&format!("listeners.ssl.default = {tls_port}\n"));
            }
            let conf_path = dir.path().join(format!("node-{i}.conf"));
            std::fs::write(&conf_path, node_conf).expect("rabbitmq.conf");
            let out = std::fs::File::create(&node.log).expect("node log");
            let mut command = Command::new(format!("{BIN}/rabbitmq-server"));
            env(&mut command, dir.path())
                .env("RABBITMQ_NODENAME", &node.name)
                .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
                .env("RABBITMQ_NODE_PORT", node.port.to_string())
                .env("RABBITMQ_DIST_PORT", node.dist_port.to_string())
                .env("RABBITMQ_CONFIG_FILE", &conf_path)
                .env(
                    "RABBITMQ_MNESIA_BASE",
                    dir.path().join(format!("node-{i}/mnesia")),
                )
                .env(
                    "RABBITMQ_LOG_BASE",
                    dir.path().join(format!("node-{i}/log")),
                )
                .stdin(Stdio::null())
                .stdout(out.try_clone().expect("clone fd"))
                .stderr(out)
                .process_group(0);
            node.child = Some(command.spawn().expect("spawn rabbitmq-server"));
        }
        let cluster = RabbitCluster { nodes, dir };
        let deadline = Instant::now() + Duration::from_secs(120);
        for i in 0..n {
            cluster.wait_booted(i, deadline).await;
        }
        if n > 1 {
            cluster.wait_running(n, deadline).await;
        }
        eprintln!(
            "rabbitmq: {n} private node(s) up in {:.1} s",
            started.elapsed().as_secs_f64()
        );
        cluster
    }

    /// The node's AMQP URL (guest/guest, vhost `/`).
    pub fn url(&self, i: usize) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.nodes[i].port)
    }

    /// Every node's URL, comma-separated, starting with node `first`.
    pub fn urls_from(&self, first: usize) -> String {
        (0..self.nodes.len())
            .map(|step| self.url((first + step) % self.nodes.len()))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The node's TLS port (with [`RabbitConfig::tls_listener`]).
    pub fn tls_port(&self, i: usize) -> u16 {
        self.nodes[i]
            .tls_port
            .expect("started without a TLS listener")
    }

    /// Runs `rabbitmqctl -n NODE args…` (through a live node `via`) and returns its stdout;
    /// panics on failure with its output.
    pub fn ctl(&self, via: usize, args: &[&str]) -> String {
        self.tool("rabbitmqctl", via, args)
    }

    /// Runs `rabbitmq-queues -n NODE args…`.
    pub fn queues(&self, via: usize, args: &[&str]) -> String {
        self.tool("rabbitmq-queues", via, args)
    }

    fn tool(&self, tool: &str, via: usize, args: &[&str]) -> String {
        let out = env(&mut Command::new(format!("{BIN}/{tool}")), self.dir.path())
            .arg("-q")
            .arg("-n")
            .arg(&self.nodes[via].name)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("run {tool}: {e}"));
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "{tool} {args:?} on {} failed: {stdout}{}",
            self.nodes[via].name,
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
    }

    /// The node that holds the leader of quorum queue `queue`, asked through node `via`.
    pub fn quorum_leader(&self, via: usize, queue: &str) -> usize {
        let listing = self.ctl(
            via,
            &["list_queues", "name", "leader", "--no-table-headers"],
        );
        let leader = listing
            .lines()
            .find_map(|line| {
                let mut fields = line.split_whitespace();
                (fields.next() == Some(queue)).then(|| fields.next().map(str::to_owned))?
            })
            .unwrap_or_else(|| panic!("queue {queue} not listed: {listing}"));
        self.nodes
            .iter()
            .position(|node| node.name == leader)
            .unwrap_or_else(|| panic!("leader {leader} is none of our nodes"))
    }

    /// SIGKILL node `i` (its whole process group), as a crash would.
    pub fn kill(&mut self, i: usize) {
        self.nodes[i].kill();
    }

    /// The node's output (boot errors land here) and the tail of its log file.
    pub fn logs(&self, i: usize) -> String {
        let node = &self.nodes[i];
        let out = std::fs::read_to_string(&node.log).unwrap_or_default();
        let log_file = self
            .dir
            .path()
            .join(format!("node-{i}/log/{}.log", node.name));
        let log = std::fs::read_to_string(log_file).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(40).collect();
        format!(
            "--- {} output ---\n{out}\n--- log tail ---\n{}",
            node.name,
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        )
    }

    async fn wait_booted(&self, i: usize, deadline: Instant) {
        let port = self.nodes[i].port;
        loop {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "node {i} did not listen on {port}:\n{}",
                self.logs(i)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // The listener opens late in the boot; await_startup makes sure the boot is over.
        let _ = self.ctl(i, &["await_startup", "--timeout", "60"]);
    }

    async fn wait_running(&self, n: usize, deadline: Instant) {
        loop {
            let running = self.ctl(0, &["eval", "length(rabbit_nodes:all_running())."]);
            if running.trim() == n.to_string() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the cluster has {running} of {n} nodes running:\n{}",
                self.logs(0)
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The temporary directory holding the nodes' files.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

/// The environment every node and CLI tool of this cluster shares: the private HOME (cookie),
/// the plugins file, and an empty env file so the machine's `/etc/rabbitmq/rabbitmq-env.conf`
/// (the shared node's name) is not read.
fn env<'a>(command: &'a mut Command, dir: &Path) -> &'a mut Command {
    command
        .env("HOME", dir.join("home"))
        .env("RABBITMQ_CONF_ENV_FILE", dir.join("env.conf"))
        .env("RABBITMQ_ENABLED_PLUGINS_FILE", dir.join("enabled_plugins"))
        .env("ERL_EPMD_ADDRESS", "127.0.0.1")
        .env_remove("RABBITMQ_NODENAME")
        .env_remove("ERL_FLAGS")
}

impl RabbitNode {
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            // The script's group holds the Erlang VM and its helpers.
            let _ = Command::new("kill")
                .args(["-KILL", "--", &format!("-{}", child.id())])
                .status();
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for RabbitCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            node.kill();
        }
    }
}
