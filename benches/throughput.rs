//! Throughput benchmark of the worker, end to end, against the local RabbitMQ and a Mosquitto it
//! starts itself. A system benchmark with printed figures, not a timed test.
//!
//! ```text
//! cargo bench --bench throughput                 # full mode (release): 20,000 jobs per scenario
//! cargo bench --bench throughput -- --quick      # smaller counts
//! cargo test  --bench throughput                 # smoke mode (debug): correctness only
//! RUST_LOG=warn cargo bench --bench throughput   # the worker without its per-job log line
//! ```
//!
//! Options (after `--`): `--quick`, `--smoke`, `--jobs N`, `--prefetch N` (default 256),
//! `--outstanding N` (closed loop, default 2 x prefetch), `--rate N` (open loop, default 500),
//! `--open-seconds S`, `--clients N` (default 1000), `--brokers N` (default 20), `--durable`
//! (durable queues and persistent jobs), `--mosquitto-nodelay` (`set_tcp_nodelay true` on the
//! broker). The RabbitMQ URL comes from `MQTT_CONNECTOR_BENCH_AMQP_URL`, else
//! `MQTT_CONNECTOR_TEST_AMQP_URL`, else `amqp://guest:guest@127.0.0.1:5672/%2f`.
//!
//! What runs, in one invocation:
//! - one Mosquitto process (started here, killed at the end) with 1 + `--brokers` listeners: the
//!   "20 brokers" scenario uses 20 distinct broker URLs served by that one process (not 20
//!   processes), so it exercises 20 worker connections, not 20 broker event loops;
//! - one MQTT subscriber (rumqttc, QoS 1 subscription on `bench/<run>/#`) that counts every payload
//!   it receives, to check each published job arrived (and count duplicates);
//! - ceilings: `mqtt ceiling` = one rumqttc connection publishing QoS 1 with up to 1,000 tracked
//!   publishes in flight (the worker's default in-flight window) to that Mosquitto; `echo ceiling`
//!   = this benchmark binary re-run as a child process (`--echo-server`) that consumes with the
//!   same prefetch, replies with a publisher confirm, then acks, one task per delivery like the
//!   worker, driven by the same load generator as the worker (apples to apples);
//! - the worker: `mqtt-connector worker` as a child process (its stderr in a temporary file),
//!   driven closed loop (N jobs outstanding) at QoS 1, 0 and 2, open loop at `--rate` jobs/s and at
//!   50% of the measured QoS 1 capacity (sampling its RSS: the soak), with jobs spread over 20
//!   brokers, and over 1,000 client-ids (last: the worker keeps those connections open for its
//!   idle timeout; RSS before/after gives the memory per open connection).
//!
//! Latency is from the moment a job is handed to lapin to the moment its reply is read. CPU is
//! utime+stime from `/proc/PID/stat`; per-scenario peak RSS is VmHWM after resetting it through
//! `/proc/PID/clear_refs` (falls back to the process-lifetime peak where that is not allowed).
//!
//! Correctness, every scenario: each correlation id answered exactly once, exit-code 0, and each
//! content received by the subscriber (QoS 0 losses are reported, not failed, in full mode). Smoke
//! mode exits non-zero on any failed check; full mode also exits non-zero on a missing or
//! duplicate reply or a non-zero exit-code. No speed assertion anywhere: the targets are printed.

use std::collections::HashMap;
use std::io::Read;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicU8, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use rumqttc::{
    AsyncClient, Event, MqttOptions, NetworkOptions, Packet, PublishOptions, PublishResult, QoS,
};
use tokio::sync::Semaphore;

// ---------------------------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    Smoke,
    Quick,
    Full,
}

#[derive(Clone, Debug)]
struct Config {
    mode: Mode,
    amqp_url: String,
    jobs: usize,
    prefetch: u16,
    outstanding: usize,
    rate: f64,
    open_seconds: f64,
    soak_seconds: f64,
    clients: usize,
    brokers: usize,
    mqtt_ceiling_publishes: usize,
    durable: bool,
    mosquitto_nodelay: bool,
    /// How long without a new reply before a scenario gives up waiting.
    stall: Duration,
}

impl Config {
    fn from_args(args: &[String]) -> Config {
        let has = |flag: &str| args.iter().any(|a| a == flag);
        let value = |flag: &str| -> Option<f64> {
            let at = args.iter().position(|a| a == flag)?;
            let raw = args
                .get(at + 1)
                .unwrap_or_else(|| panic!("{flag} needs a value"));
            Some(
                raw.parse()
                    .unwrap_or_else(|e| panic!("{flag} {raw:?}: not a number ({e})")),
            )
        };
        // `cargo bench` passes --bench; `cargo test` does not: that is the smoke mode.
        let mode = if has("--smoke") || !has("--bench") {
            Mode::Smoke
        } else if has("--quick") {
            Mode::Quick
        } else {
            Mode::Full
        };
        let known = [
            "--bench",
            "--quick",
            "--smoke",
            "--durable",
            "--mosquitto-nodelay",
        ];
        let with_value = [
            "--jobs",
            "--prefetch",
            "--outstanding",
            "--rate",
            "--open-seconds",
            "--clients",
            "--brokers",
        ];
        let mut skip = false;
        for arg in args {
            if std::mem::take(&mut skip) {
                continue;
            }
            if with_value.contains(&arg.as_str()) {
                skip = true;
            } else if !known.contains(&arg.as_str()) {
                eprintln!("throughput: ignoring unknown argument {arg:?}");
            }
        }
        let (jobs, open_seconds, soak_seconds, clients) = match mode {
            Mode::Smoke => (300, 0.5, 1.0, 100),
            Mode::Quick => (5_000, 3.0, 5.0, 1_000),
            Mode::Full => (20_000, 10.0, 20.0, 1_000),
        };
        let jobs = value("--jobs").map_or(jobs, |v| v as usize).max(1);
        let prefetch = value("--prefetch").map_or(256, |v| v as u16).max(1);
        let amqp_url = std::env::var("MQTT_CONNECTOR_BENCH_AMQP_URL")
            .or_else(|_| std::env::var("MQTT_CONNECTOR_TEST_AMQP_URL"))
            .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned());
        Config {
            mode,
            amqp_url,
            jobs,
            prefetch,
            outstanding: value("--outstanding")
                .map_or(2 * usize::from(prefetch), |v| v as usize)
                .max(1),
            rate: value("--rate").unwrap_or(500.0).max(1.0),
            open_seconds: value("--open-seconds").unwrap_or(open_seconds),
            soak_seconds: value("--open-seconds").unwrap_or(soak_seconds),
            clients: value("--clients").map_or(clients, |v| v as usize).max(1),
            brokers: value("--brokers").map_or(20, |v| v as usize).max(1),
            mqtt_ceiling_publishes: if mode == Mode::Smoke { 1_000 } else { 5 * jobs },
            durable: has("--durable"),
            mosquitto_nodelay: has("--mosquitto-nodelay"),
            stall: Duration::from_secs(if mode == Mode::Smoke { 20 } else { 30 }),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Entry point
// ---------------------------------------------------------------------------------------------

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--echo-server") {
        return echo_server_main(&args[1..]);
    }
    let config = Config::from_args(&args);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("build the tokio runtime");
    let started = Instant::now();
    let ok = runtime.block_on(run(config.clone()));
    println!(
        "\nthroughput benchmark ({:?} mode) took {:.1} s: {}",
        config.mode,
        started.elapsed().as_secs_f64(),
        if ok {
            "every check passed"
        } else {
            "SOME CHECKS FAILED"
        }
    );
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Nanoseconds since the benchmark started (never 0, so 0 can mean "not yet").
fn now_ns() -> u64 {
    static BASE: OnceLock<Instant> = OnceLock::new();
    let base = BASE.get_or_init(Instant::now);
    u64::try_from(base.elapsed().as_nanos()).unwrap_or(u64::MAX) + 1
}

fn free_port() -> u16 {
    TcpListener::bind(("127.0.0.1", 0))
        .expect("bind 127.0.0.1:0")
        .local_addr()
        .expect("local_addr of a bound socket")
        .port()
}

// ---------------------------------------------------------------------------------------------
// Processes: a child killed on drop, /proc figures
// ---------------------------------------------------------------------------------------------

/// A child process killed (SIGKILL) and reaped when dropped, also on a panic.
struct ChildGuard {
    name: &'static str,
    child: Child,
}

impl ChildGuard {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn check_running(&mut self, log: &Path) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!(
                "{} exited early with {status}; its log {}:\n{}",
                self.name,
                log.display(),
                tail(log, 4_000)
            );
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn tail(path: &Path, bytes: usize) -> String {
    let text = std::fs::read(path).unwrap_or_default();
    let from = text.len().saturating_sub(bytes);
    String::from_utf8_lossy(&text[from..]).into_owned()
}

fn clock_ticks_per_second() -> f64 {
    static TICKS: OnceLock<f64> = OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|out| String::from_utf8(out.stdout).ok())
            .and_then(|text| text.trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// CPU time and memory of one process, from /proc.
#[derive(Clone, Copy, Debug, Default)]
struct ProcSample {
    cpu_s: f64,
    rss_kib: u64,
    hwm_kib: u64,
}

fn proc_sample(pid: u32) -> Option<ProcSample> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after "(comm) ": state is field 3, utime 14, stime 15.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib = |key: &str| {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    Some(ProcSample {
        cpu_s: ticks as f64 / clock_ticks_per_second(),
        rss_kib: kib("VmRSS:"),
        hwm_kib: kib("VmHWM:"),
    })
}

/// Resets VmHWM to the current RSS (`echo 5 > /proc/PID/clear_refs`); false where not allowed.
fn reset_peak_rss(pid: u32) -> bool {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").is_ok()
}

/// The local RabbitMQ's Erlang VM, to show its CPU share (absent if RabbitMQ is elsewhere).
fn find_rabbitmq_pid() -> Option<u32> {
    let mut best: Option<(u64, u32)> = None;
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        if comm.trim() == "beam.smp" {
            let rss = proc_sample(pid).map_or(0, |s| s.rss_kib);
            if best.is_none_or(|(r, _)| rss > r) {
                best = Some((rss, pid));
            }
        }
    }
    best.map(|(_, pid)| pid)
}

/// CPU seconds of every process that matters, at one instant.
#[derive(Clone, Copy, Debug, Default)]
struct CpuSnapshot {
    server: Option<ProcSample>,
    rabbitmq: Option<f64>,
    mosquitto: Option<f64>,
    bench: Option<f64>,
}

#[derive(Clone, Copy)]
struct Pids {
    server: Option<u32>,
    rabbitmq: Option<u32>,
    mosquitto: u32,
}

fn snapshot(pids: Pids) -> CpuSnapshot {
    CpuSnapshot {
        server: pids.server.and_then(proc_sample),
        rabbitmq: pids.rabbitmq.and_then(proc_sample).map(|s| s.cpu_s),
        mosquitto: proc_sample(pids.mosquitto).map(|s| s.cpu_s),
        bench: proc_sample(std::process::id()).map(|s| s.cpu_s),
    }
}

// ---------------------------------------------------------------------------------------------
// Mosquitto: one process, 1 + N listeners
// ---------------------------------------------------------------------------------------------

struct Mosquitto {
    _dir: tempfile::TempDir,
    /// ports[0] is the main listener; ports[1..] the "other brokers".
    ports: Vec<u16>,
    process: ChildGuard,
}

impl Mosquitto {
    fn start(extra_listeners: usize, nodelay: bool) -> Mosquitto {
        let dir = tempfile::Builder::new()
            .prefix("bench-mosquitto-")
            .tempdir()
            .expect("create a temporary directory for mosquitto");
        let d = dir
            .path()
            .to_str()
            .expect("utf-8 temporary path")
            .to_owned();
        for _attempt in 0..5 {
            let ports: Vec<u16> = (0..=extra_listeners).map(|_| free_port()).collect();
            // `user root`: do not drop privileges when run as root (could not read the temp dir).
            // max_inflight_messages / max_queued_messages 0: no limit towards the subscriber, so
            // the broker never drops or throttles what the benchmark must count.
            let mut conf = format!(
                "user root\npersistence false\nlog_dest file {d}/mosquitto.log\n\
                 log_type error\nlog_type warning\nconnection_messages false\n\
                 max_inflight_messages 0\nmax_queued_messages 0\nallow_anonymous true\n\
                 set_tcp_nodelay {nodelay}\n"
            );
            for port in &ports {
                conf.push_str(&format!("listener {port} 127.0.0.1\n"));
            }
            let conf_path = dir.path().join("mosquitto.conf");
            std::fs::write(&conf_path, conf).expect("write mosquitto.conf");
            let log = std::fs::File::create(dir.path().join("stderr.log"))
                .expect("create mosquitto stderr.log");
            let child = Command::new("mosquitto")
                .arg("-c")
                .arg(&conf_path)
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("clone a file handle"))
                .stderr(log)
                .spawn()
                .expect("spawn mosquitto (is it on PATH?)");
            let mut process = ChildGuard {
                name: "mosquitto",
                child,
            };
            let deadline = Instant::now() + Duration::from_secs(10);
            let mut listening = false;
            while Instant::now() < deadline {
                if matches!(process.child.try_wait(), Ok(Some(_))) {
                    break;
                }
                if ports
                    .iter()
                    .all(|p| std::net::TcpStream::connect(("127.0.0.1", *p)).is_ok())
                {
                    listening = true;
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            if listening {
                return Mosquitto {
                    _dir: dir,
                    ports,
                    process,
                };
            }
            eprintln!(
                "mosquitto did not start (a port was taken?), retrying:\n{}{}",
                tail(&dir.path().join("mosquitto.log"), 2_000),
                tail(&dir.path().join("stderr.log"), 2_000)
            );
        }
        panic!("mosquitto did not start after 5 attempts");
    }

    fn version() -> String {
        Command::new("mosquitto")
            .arg("-h")
            .output()
            .ok()
            .and_then(|out| {
                String::from_utf8_lossy(&out.stdout)
                    .lines()
                    .next()
                    .map(str::to_owned)
            })
            .unwrap_or_else(|| "mosquitto (version unknown)".into())
    }
}

// ---------------------------------------------------------------------------------------------
// MQTT subscriber: counts every payload `TAG.SEQ` it receives
// ---------------------------------------------------------------------------------------------

#[derive(Default)]
struct Arrivals {
    /// Per scenario tag: how many times each sequence number arrived.
    counts: Mutex<HashMap<u32, Vec<u32>>>,
    unparsed: AtomicU64,
    errors: Mutex<Option<String>>,
}

impl Arrivals {
    fn record(&self, payload: &[u8]) {
        let parsed = std::str::from_utf8(payload).ok().and_then(parse_tag_seq);
        match parsed {
            Some((tag, seq)) => {
                let mut counts = self.counts.lock().expect("arrivals lock");
                let vec = counts.entry(tag).or_default();
                if vec.len() <= seq {
                    vec.resize(seq + 1, 0);
                }
                vec[seq] += 1;
            }
            None => {
                self.unparsed.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// (missing, duplicates) among `expected` sequence numbers of `tag`.
    fn check(&self, tag: u32, expected: &[usize]) -> (usize, u64) {
        let counts = self.counts.lock().expect("arrivals lock");
        let empty = Vec::new();
        let vec = counts.get(&tag).unwrap_or(&empty);
        let mut missing = 0;
        let mut duplicates = 0;
        for &seq in expected {
            match vec.get(seq).copied().unwrap_or(0) {
                0 => missing += 1,
                n => duplicates += u64::from(n - 1),
            }
        }
        (missing, duplicates)
    }
}

fn parse_tag_seq(text: &str) -> Option<(u32, usize)> {
    let (tag, seq) = text.split_once('.')?;
    Some((tag.parse().ok()?, seq.parse().ok()?))
}

async fn start_subscriber(port: u16, filter: String, arrivals: Arc<Arrivals>) -> AsyncClient {
    let mut options = MqttOptions::new(
        format!("bench-subscriber-{}", uuid::Uuid::new_v4().simple()),
        ("127.0.0.1", port),
    );
    options.set_max_packet_size(1 << 20, 1 << 20);
    options.set_keep_alive(30);
    let (client, mut eventloop) = AsyncClient::builder(options).capacity(1_000).build();
    let notice = client
        .subscribe_tracked(filter.clone(), QoS::AtLeastOnce)
        .await
        .expect("queue the subscribe");
    let task_client = client.clone();
    tokio::spawn(async move {
        let mut connacks = 0;
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::Publish(publish))) => arrivals.record(&publish.payload),
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    connacks += 1;
                    if connacks > 1 {
                        let _ = task_client.try_subscribe(filter.clone(), QoS::AtLeastOnce);
                    }
                }
                Ok(_) => {}
                Err(err) => {
                    *arrivals.errors.lock().expect("arrivals lock") = Some(err.to_string());
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(10), notice.wait_async())
        .await
        .expect("no SUBACK from mosquitto within 10 s")
        .expect("subscribe refused");
    client
}

// ---------------------------------------------------------------------------------------------
// The echo server (child process): consume, reply with a confirm, ack
// ---------------------------------------------------------------------------------------------

const ECHO_BODY: &[u8] = br#"{"exit-code":0,"message":"echo"}"#;

fn echo_server_main(args: &[String]) -> ExitCode {
    let [url, queue, prefetch] = args else {
        eprintln!("usage: throughput --echo-server AMQP_URL QUEUE PREFETCH");
        return ExitCode::FAILURE;
    };
    let prefetch: u16 = prefetch.parse().expect("prefetch is a number");
    // Exit when the benchmark goes away (our stdin is its pipe).
    std::thread::spawn(|| {
        let mut sink = Vec::new();
        let _ = std::io::stdin().read_to_end(&mut sink);
        std::process::exit(0);
    });
    // Same runtime as the worker's main: the default multi-thread runtime.
    let runtime = tokio::runtime::Runtime::new().expect("build the echo runtime");
    runtime.block_on(async move {
        let connection = Connection::connect(url, ConnectionProperties::default())
            .await
            .expect("echo: connect to RabbitMQ");
        let channel = connection
            .create_channel()
            .await
            .expect("echo: open a channel");
        channel
            .basic_qos(prefetch, BasicQosOptions::default())
            .await
            .expect("echo: basic.qos");
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .expect("echo: confirm.select");
        let mut consumer = channel
            .basic_consume(
                queue.as_str().into(),
                "bench-echo".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("echo: basic.consume");
        while let Some(delivery) = consumer.next().await {
            let delivery = delivery.expect("echo: consumer failed");
            let channel = channel.clone();
            tokio::spawn(async move {
                let properties = &delivery.properties;
                if let Some(reply_to) = properties.reply_to() {
                    let mut reply =
                        BasicProperties::default().with_content_type("application/json".into());
                    if let Some(id) = properties.correlation_id() {
                        reply = reply.with_correlation_id(id.clone());
                    }
                    let confirm = channel
                        .basic_publish(
                            "".into(),
                            reply_to.clone(),
                            BasicPublishOptions {
                                mandatory: true,
                                ..BasicPublishOptions::default()
                            },
                            ECHO_BODY,
                            reply,
                        )
                        .await
                        .expect("echo: publish the reply");
                    confirm.await.expect("echo: publisher confirm");
                }
                delivery
                    .acker
                    .ack(BasicAckOptions::default())
                    .await
                    .expect("echo: ack");
            });
        }
    });
    ExitCode::SUCCESS
}

// ---------------------------------------------------------------------------------------------
// Load generator: publish jobs, read replies, per correlation id
// ---------------------------------------------------------------------------------------------

/// The book of one scenario: who was sent when, who was answered when and how.
struct Book {
    n: usize,
    sent_ns: Vec<AtomicU64>,
    reply_ns: Vec<AtomicU64>,
    replies: Vec<AtomicU32>,
    exit: Vec<AtomicU8>,
    answered: AtomicUsize,
    last_reply_ns: AtomicU64,
    retried: AtomicUsize,
    qos_mismatch: AtomicUsize,
    expected_qos: Option<u8>,
    permits: Semaphore,
    first_error: Mutex<Option<String>>,
}

const NO_EXIT: u8 = u8::MAX;

impl Book {
    fn new(n: usize, expected_qos: Option<u8>) -> Book {
        let zeros = |_| AtomicU64::new(0);
        Book {
            n,
            sent_ns: (0..n).map(zeros).collect(),
            reply_ns: (0..n).map(zeros).collect(),
            replies: (0..n).map(|_| AtomicU32::new(0)).collect(),
            exit: (0..n).map(|_| AtomicU8::new(NO_EXIT)).collect(),
            answered: AtomicUsize::new(0),
            last_reply_ns: AtomicU64::new(0),
            retried: AtomicUsize::new(0),
            qos_mismatch: AtomicUsize::new(0),
            expected_qos,
            permits: Semaphore::new(0),
            first_error: Mutex::new(None),
        }
    }

    fn record(&self, seq: usize, at_ns: u64, body: &[u8]) {
        if self.replies[seq].fetch_add(1, Ordering::AcqRel) != 0 {
            return; // a duplicate: counted, nothing else
        }
        #[derive(serde::Deserialize)]
        struct ReplyBody {
            #[serde(rename = "exit-code")]
            exit_code: u8,
            message: String,
            #[serde(default)]
            attempts: u32,
        }
        let code = match serde_json::from_slice::<ReplyBody>(body) {
            Ok(reply) => {
                if reply.exit_code != 0 {
                    self.note_error(format!("exit-code {}: {}", reply.exit_code, reply.message));
                } else if let Some(qos) = self.expected_qos
                    && !reply.message.contains(&format!("(qos {qos})"))
                {
                    self.qos_mismatch.fetch_add(1, Ordering::Relaxed);
                    self.note_error(format!("acknowledged at another QoS: {}", reply.message));
                }
                if reply.attempts > 1 {
                    self.retried.fetch_add(1, Ordering::Relaxed);
                }
                reply.exit_code
            }
            Err(err) => {
                self.note_error(format!(
                    "reply not understood ({err}): {}",
                    String::from_utf8_lossy(body)
                ));
                NO_EXIT - 1
            }
        };
        self.exit[seq].store(code, Ordering::Release);
        self.reply_ns[seq].store(at_ns, Ordering::Release);
        self.last_reply_ns.fetch_max(at_ns, Ordering::AcqRel);
        self.answered.fetch_add(1, Ordering::AcqRel);
        self.permits.add_permits(1);
    }

    fn note_error(&self, message: String) {
        let mut first = self.first_error.lock().expect("book lock");
        if first.is_none() {
            *first = Some(message);
        }
    }
}

struct LoadGen {
    _connection: Connection,
    channel: Channel,
    reply_queue: String,
    books: Arc<RwLock<Vec<Arc<Book>>>>,
    stray: Arc<AtomicU64>,
    persistent: bool,
}

impl LoadGen {
    async fn connect(url: &str, persistent: bool) -> LoadGen {
        let connection = Connection::connect(url, ConnectionProperties::default())
            .await
            .unwrap_or_else(|e| panic!("connect to RabbitMQ at {url}: {e}"));
        let channel = connection
            .create_channel()
            .await
            .expect("open the publishing channel");
        let replies = connection
            .create_channel()
            .await
            .expect("open the reply channel");
        let reply_queue = format!("bench-reply-{}", uuid::Uuid::new_v4().simple());
        replies
            .queue_declare(
                reply_queue.as_str().into(),
                QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("declare the reply queue");
        let mut consumer = replies
            .basic_consume(
                reply_queue.as_str().into(),
                "bench-replies".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..BasicConsumeOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("consume the reply queue");
        let books: Arc<RwLock<Vec<Arc<Book>>>> = Arc::default();
        let stray = Arc::new(AtomicU64::new(0));
        let (task_books, task_stray) = (books.clone(), stray.clone());
        tokio::spawn(async move {
            let _replies = replies; // keep the channel open
            while let Some(delivery) = consumer.next().await {
                let delivery = match delivery {
                    Ok(delivery) => delivery,
                    Err(err) => {
                        eprintln!("reply consumer failed: {err}");
                        return;
                    }
                };
                let at = now_ns();
                let key = delivery
                    .properties
                    .correlation_id()
                    .as_ref()
                    .and_then(|id| parse_tag_seq(id.as_str()));
                let book = key.and_then(|(tag, seq)| {
                    let books = task_books.read().expect("books lock");
                    books
                        .get(tag as usize)
                        .filter(|book| seq < book.n)
                        .cloned()
                        .map(|book| (book, seq))
                });
                match book {
                    Some((book, seq)) => book.record(seq, at, &delivery.data),
                    None => {
                        task_stray.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        });
        LoadGen {
            _connection: connection,
            channel,
            reply_queue,
            books,
            stray,
            persistent,
        }
    }

    async fn declare_queue(&self, name: &str) {
        self.channel
            .queue_declare(
                name.into(),
                QueueDeclareOptions {
                    durable: self.persistent,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap_or_else(|e| panic!("declare queue {name}: {e}"));
    }

    async fn delete_queue(&self, name: &str) {
        let _ = self
            .channel
            .queue_delete(name.into(), QueueDeleteOptions::default())
            .await;
    }

    fn new_book(&self, n: usize, expected_qos: Option<u8>) -> (u32, Arc<Book>) {
        let book = Arc::new(Book::new(n, expected_qos));
        let mut books = self.books.write().expect("books lock");
        books.push(book.clone());
        (
            u32::try_from(books.len() - 1).expect("fewer than 2^32 scenarios"),
            book,
        )
    }

    /// Hands one job to lapin in its own task, so a slow write never holds the schedule back.
    fn publish(&self, queue: &str, tag: u32, seq: usize, book: &Arc<Book>, body: Vec<u8>) {
        let mut properties = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_reply_to(self.reply_queue.as_str().into())
            .with_correlation_id(format!("{tag}.{seq}").into());
        if self.persistent {
            properties = properties.with_delivery_mode(2);
        }
        let channel = self.channel.clone();
        let queue = queue.to_owned();
        let book = book.clone();
        book.sent_ns[seq].store(now_ns(), Ordering::Release);
        tokio::spawn(async move {
            let published = channel
                .basic_publish(
                    "".into(),
                    queue.as_str().into(),
                    BasicPublishOptions::default(),
                    &body,
                    properties,
                )
                .await;
            if let Err(err) = published {
                book.note_error(format!("could not publish a job to {queue}: {err}"));
            }
        });
    }
}

/// How jobs are offered.
#[derive(Clone, Copy, Debug)]
enum Load {
    /// Keep this many jobs outstanding.
    Closed(usize),
    /// This many jobs per second, whatever the replies do.
    Open(f64),
}

/// What each job's body looks like.
#[derive(Clone, Copy, Debug)]
enum Shape {
    /// The echo server does not read the body.
    Echo,
    Worker {
        qos: u8,
        /// Spread over this many client-ids (`client-id` set per job).
        clients: Option<usize>,
        /// Spread over this many connectors, one per broker listener.
        brokers: Option<usize>,
    },
}

fn job_body(shape: Shape, run: &str, tag: u32, seq: usize) -> Vec<u8> {
    match shape {
        Shape::Echo => format!(r#"{{"content":"{tag}.{seq}"}}"#).into_bytes(),
        Shape::Worker {
            qos,
            clients,
            brokers,
        } => {
            let connector = match brokers {
                Some(n) => format!("b{:02}", seq % n),
                None => "bench".to_owned(),
            };
            let client = clients
                .map(|n| format!(r#","client-id":"bench-c{}""#, seq % n))
                .unwrap_or_default();
            format!(
                r#"{{"connector":"{connector}","topic":"bench/{run}/{tag}","qos":{qos},"content":"{tag}.{seq}"{client}}}"#
            )
            .into_bytes()
        }
    }
}

/// What a scenario measured.
struct Measured {
    book: Arc<Book>,
    tag: u32,
    elapsed_s: f64,
    publish_lag_p99_ms: f64,
    rss_samples_kib: Vec<u64>,
}

/// Drives `n` jobs into `queue` and waits for their replies (or a stall).
#[allow(clippy::too_many_arguments)]
async fn drive(
    loadgen: &LoadGen,
    queue: &str,
    n: usize,
    load: Load,
    shape: Shape,
    run: &str,
    stall: Duration,
    sample_pid: Option<u32>,
) -> Measured {
    let expected_qos = match shape {
        Shape::Worker { qos, .. } => Some(qos),
        Shape::Echo => None,
    };
    let (tag, book) = loadgen.new_book(n, expected_qos);
    let bodies: Vec<Vec<u8>> = (0..n).map(|seq| job_body(shape, run, tag, seq)).collect();
    let rss_samples = Arc::new(Mutex::new(Vec::new()));
    let sampler = sample_pid.map(|pid| {
        let samples = rss_samples.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(500));
            loop {
                tick.tick().await;
                if let Some(s) = proc_sample(pid) {
                    samples.lock().expect("rss samples lock").push(s.rss_kib);
                }
            }
        })
    });
    let first_ns = now_ns();
    let mut lags_ns: Vec<u64> = Vec::new();
    match load {
        Load::Closed(outstanding) => {
            book.permits.add_permits(outstanding);
            for (seq, body) in bodies.into_iter().enumerate() {
                tokio::time::timeout(stall, book.permits.acquire())
                    .await
                    .unwrap_or_else(|_| {
                        panic!(
                            "no reply for {stall:?} with {outstanding} jobs outstanding \
                             ({} of {n} answered)",
                            book.answered.load(Ordering::Acquire)
                        )
                    })
                    .expect("the semaphore is never closed")
                    .forget();
                loadgen.publish(queue, tag, seq, &book, body);
            }
        }
        Load::Open(rate) => {
            let start = tokio::time::Instant::now();
            lags_ns.reserve(n);
            for (seq, body) in bodies.into_iter().enumerate() {
                let at = start + Duration::from_secs_f64(seq as f64 / rate);
                let now = tokio::time::Instant::now();
                if at > now {
                    tokio::time::sleep_until(at).await;
                }
                let lag = tokio::time::Instant::now().saturating_duration_since(at);
                lags_ns.push(u64::try_from(lag.as_nanos()).unwrap_or(u64::MAX));
                loadgen.publish(queue, tag, seq, &book, body);
            }
        }
    }
    // Wait for every reply; give up after `stall` without progress.
    let mut last_progress = Instant::now();
    let mut last_answered = 0;
    loop {
        let answered = book.answered.load(Ordering::Acquire);
        if answered >= n {
            break;
        }
        if answered != last_answered {
            last_answered = answered;
            last_progress = Instant::now();
        } else if last_progress.elapsed() > stall {
            eprintln!("gave up waiting: {answered} of {n} replies after {stall:?} without one");
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    if let Some(sampler) = sampler {
        sampler.abort();
    }
    let last_ns = book.last_reply_ns.load(Ordering::Acquire).max(first_ns);
    lags_ns.sort_unstable();
    let rss_samples_kib = rss_samples.lock().expect("rss samples lock").clone();
    Measured {
        book,
        tag,
        elapsed_s: (last_ns - first_ns) as f64 / 1e9,
        publish_lag_p99_ms: percentile(&lags_ns, 0.99) as f64 / 1e6,
        rss_samples_kib,
    }
}

/// Nearest-rank percentile of sorted values (0 when empty).
fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

// ---------------------------------------------------------------------------------------------
// Results
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Debug, Default)]
struct Row {
    name: String,
    jobs: usize,
    per_s: f64,
    ratio: Option<f64>,
    p50_ms: f64,
    p90_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    /// CPU µs per job of the process under test (worker or echo server; the bench for MQTT).
    cpu_us: Option<f64>,
    peak_rss_mib: Option<f64>,
    rabbitmq_us: Option<f64>,
    mosquitto_us: Option<f64>,
    bench_us: Option<f64>,
    check: String,
    ok: bool,
    notes: Vec<String>,
}

fn per_job_us(before: Option<f64>, after: Option<f64>, jobs: usize) -> Option<f64> {
    Some((after? - before?) * 1e6 / jobs as f64)
}

/// Evaluates a finished scenario: latencies, correctness, CPU.
#[allow(clippy::too_many_arguments)]
async fn evaluate(
    name: &str,
    measured: &Measured,
    arrivals: Option<&Arrivals>,
    qos0: bool,
    strict_mqtt: bool,
    before: CpuSnapshot,
    after: CpuSnapshot,
    peak_reset: bool,
) -> Row {
    let book = &measured.book;
    let n = book.n;
    let mut latencies: Vec<u64> = (0..n)
        .filter_map(|i| {
            let reply = book.reply_ns[i].load(Ordering::Acquire);
            let sent = book.sent_ns[i].load(Ordering::Acquire);
            (reply != 0 && sent != 0).then(|| reply.saturating_sub(sent))
        })
        .collect();
    latencies.sort_unstable();
    let ms = |p: f64| percentile(&latencies, p) as f64 / 1e6;
    let answered = book.answered.load(Ordering::Acquire);
    let missing = n - answered;
    let duplicates: u64 = book
        .replies
        .iter()
        .map(|c| u64::from(c.load(Ordering::Acquire).saturating_sub(1)))
        .sum();
    let failed = book
        .exit
        .iter()
        .filter(|e| !matches!(e.load(Ordering::Acquire), 0 | NO_EXIT))
        .count();
    let mut ok = missing == 0 && duplicates == 0 && failed == 0;
    let mut problems = Vec::new();
    if missing > 0 {
        problems.push(format!("{missing} unanswered"));
    }
    if duplicates > 0 {
        problems.push(format!("{duplicates} duplicate replies"));
    }
    if failed > 0 {
        problems.push(format!("{failed} exit-code != 0"));
    }
    let mismatched = book.qos_mismatch.load(Ordering::Relaxed);
    if mismatched > 0 {
        problems.push(format!("{mismatched} acked at another QoS"));
        ok = false;
    }
    let mut notes = Vec::new();
    if let Some(arrivals) = arrivals {
        let published: Vec<usize> = (0..n)
            .filter(|&i| book.exit[i].load(Ordering::Acquire) == 0)
            .collect();
        // The broker forwards to the subscriber around the time it acks: allow it to catch up.
        let deadline = Instant::now() + Duration::from_secs(if qos0 { 3 } else { 10 });
        let (mut lost, mut dups) = arrivals.check(measured.tag, &published);
        while lost > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
            (lost, dups) = arrivals.check(measured.tag, &published);
        }
        if lost > 0 {
            problems.push(format!("{lost} not received by the subscriber"));
            if !qos0 || strict_mqtt {
                ok = false;
            }
        }
        if dups > 0 {
            notes.push(format!("{dups} duplicate MQTT deliveries (at least once)"));
        }
    }
    let retried = book.retried.load(Ordering::Relaxed);
    if retried > 0 {
        notes.push(format!("{retried} jobs needed more than one attempt"));
    }
    if let Some(error) = book.first_error.lock().expect("book lock").clone() {
        notes.push(format!("first problem: {error}"));
    }
    if measured.publish_lag_p99_ms > 1.0 {
        notes.push(format!(
            "load generator fell behind its schedule: p99 lag {:.2} ms",
            measured.publish_lag_p99_ms
        ));
    }
    if !peak_reset {
        notes.push("peak RSS is the process-lifetime peak (clear_refs not allowed)".into());
    }
    let per_s = if measured.elapsed_s > 0.0 {
        answered as f64 / measured.elapsed_s
    } else {
        0.0
    };
    Row {
        name: name.to_owned(),
        jobs: n,
        per_s,
        ratio: None,
        p50_ms: ms(0.50),
        p90_ms: ms(0.90),
        p99_ms: ms(0.99),
        max_ms: ms(1.0),
        cpu_us: per_job_us(
            before.server.map(|s| s.cpu_s),
            after.server.map(|s| s.cpu_s),
            n,
        ),
        peak_rss_mib: after.server.map(|s| s.hwm_kib as f64 / 1024.0),
        rabbitmq_us: per_job_us(before.rabbitmq, after.rabbitmq, n),
        mosquitto_us: per_job_us(before.mosquitto, after.mosquitto, n),
        bench_us: per_job_us(before.bench, after.bench, n),
        check: if problems.is_empty() {
            "ok".to_owned()
        } else {
            problems.join(", ")
        },
        ok,
        notes,
    }
}

fn fmt_opt(value: Option<f64>, decimals: usize) -> String {
    value.map_or_else(|| "-".to_owned(), |v| format!("{v:.decimals$}"))
}

fn print_table(rows: &[Row]) {
    println!();
    println!(
        "{:<34} {:>7} {:>9} {:>6} {:>7} {:>7} {:>7} {:>8} {:>9} {:>8}  check",
        "scenario",
        "jobs",
        "jobs/s",
        "ratio",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "max ms",
        "CPU µs/job",
        "peak MiB"
    );
    println!("{}", "-".repeat(130));
    for row in rows {
        println!(
            "{:<34} {:>7} {:>9.0} {:>6} {:>7.2} {:>7.2} {:>7.2} {:>8.2} {:>10} {:>8}  {}",
            row.name,
            row.jobs,
            row.per_s,
            fmt_opt(row.ratio, 2),
            row.p50_ms,
            row.p90_ms,
            row.p99_ms,
            row.max_ms,
            fmt_opt(row.cpu_us, 1),
            fmt_opt(row.peak_rss_mib, 1),
            row.check
        );
    }
    println!();
    println!("CPU µs per job, by process (2 cores shared by all of them):");
    println!(
        "{:<34} {:>14} {:>10} {:>10} {:>22}",
        "scenario", "worker/echo", "rabbitmq", "mosquitto", "bench (load+sub+mqtt)"
    );
    for row in rows {
        println!(
            "{:<34} {:>14} {:>10} {:>10} {:>22}",
            row.name,
            fmt_opt(row.cpu_us, 1),
            fmt_opt(row.rabbitmq_us, 1),
            fmt_opt(row.mosquitto_us, 1),
            fmt_opt(row.bench_us, 1)
        );
    }
    let noted: Vec<&Row> = rows.iter().filter(|r| !r.notes.is_empty()).collect();
    if !noted.is_empty() {
        println!();
        for row in noted {
            for note in &row.notes {
                println!("  {}: {note}", row.name);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The MQTT ceiling: one rumqttc connection, QoS 1, many tracked publishes in flight
// ---------------------------------------------------------------------------------------------

async fn mqtt_ceiling(
    port: u16,
    n: usize,
    topic: String,
    tag: u32,
    window: usize,
) -> (f64, Vec<u64>, usize) {
    let mut options = MqttOptions::new(
        format!("bench-ceiling-{}", uuid::Uuid::new_v4().simple()),
        ("127.0.0.1", port),
    );
    options.set_keep_alive(30);
    options.set_clean_session(true);
    options.set_inflight(u16::try_from(window).unwrap_or(u16::MAX));
    options.set_request_channel_capacity(window * 2);
    let (client, mut eventloop) = AsyncClient::builder(options).build();
    let mut network = NetworkOptions::new();
    network.set_tcp_nodelay(true);
    eventloop.set_network_options(network);
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(_))) => break,
            Ok(_) => {}
            Err(err) => panic!("mqtt ceiling: cannot connect to mosquitto: {err}"),
        }
    }
    let poller = tokio::spawn(async move {
        loop {
            match eventloop.poll().await {
                Ok(_) => {}
                // Our own disconnect at the end.
                Err(rumqttc::ConnectionError::RequestsDone) => return,
                Err(err) => {
                    eprintln!("mqtt ceiling: connection ended: {err}");
                    return;
                }
            }
        }
    });
    let mut inflight = FuturesUnordered::new();
    let mut latencies = Vec::with_capacity(n);
    let mut failures = 0;
    let started = now_ns();
    for seq in 0..n {
        if inflight.len() >= window
            && let Some((result, sent)) = inflight.next().await
        {
            note_ack(result, sent, &mut latencies, &mut failures);
        }
        let sent = now_ns();
        let notice = client
            .publish_tracked(
                topic.clone(),
                format!("{tag}.{seq}").into_bytes(),
                PublishOptions::new(QoS::AtLeastOnce),
            )
            .await
            .expect("mqtt ceiling: queue a publish");
        inflight.push(async move { (notice.wait_async().await, sent) });
    }
    while let Some((result, sent)) = inflight.next().await {
        note_ack(result, sent, &mut latencies, &mut failures);
    }
    let elapsed = (now_ns() - started) as f64 / 1e9;
    let _ = client.try_disconnect();
    poller.abort();
    latencies.sort_unstable();
    (elapsed, latencies, failures)
}

fn note_ack<E>(
    result: Result<PublishResult, E>,
    sent: u64,
    latencies: &mut Vec<u64>,
    failures: &mut usize,
) {
    match result {
        Ok(_) => latencies.push(now_ns() - sent),
        Err(_) => *failures += 1,
    }
}

// ---------------------------------------------------------------------------------------------
// The worker under test
// ---------------------------------------------------------------------------------------------

struct Worker {
    process: ChildGuard,
    log: PathBuf,
    metrics_port: u16,
}

fn write_connector(dir: &Path, name: &str, json: serde_json::Value) {
    let path = dir.join(format!("{name}.json"));
    std::fs::write(&path, json.to_string())
        .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

fn start_worker(config: &Config, queue: &str, mosquitto: &Mosquitto, dir: &Path) -> Worker {
    let connectors = dir.join("connectors");
    std::fs::create_dir_all(&connectors).expect("create the connectors folder");
    write_connector(
        &connectors,
        "bench",
        serde_json::json!({
            "broker": format!("tcp://127.0.0.1:{}", mosquitto.ports[0]),
            "client-id": "bench-worker", "qos": 1, "topic": "bench/default"
        }),
    );
    // One connector per extra listener; distinct client-ids, since every listener is the same
    // broker (a second connection with one client-id would take the first one's session over).
    for (i, port) in mosquitto.ports[1..].iter().enumerate() {
        write_connector(
            &connectors,
            &format!("b{i:02}"),
            serde_json::json!({
                "broker": format!("tcp://127.0.0.1:{port}"),
                "client-id": format!("bench-b{i:02}"), "qos": 1, "topic": "bench/default"
            }),
        );
    }
    let log = dir.join("worker.log");
    let file = std::fs::File::create(&log).expect("create worker.log");
    let metrics_port = free_port();
    let child = Command::new(env!("CARGO_BIN_EXE_mqtt-connector"))
        .arg("worker")
        .env("MQTT_CONNECTOR_AMQP_URL", &config.amqp_url)
        .env("MQTT_CONNECTOR_QUEUE", queue)
        .env("MQTT_CONNECTOR_CONNECTORS", &connectors)
        .env("MQTT_CONNECTOR_PREFETCH", config.prefetch.to_string())
        .env(
            "MQTT_CONNECTOR_METRICS_ADDR",
            format!("127.0.0.1:{metrics_port}"),
        )
        .stdin(Stdio::null())
        .stdout(file.try_clone().expect("clone a file handle"))
        .stderr(file)
        .spawn()
        .expect("spawn the mqtt-connector worker");
    Worker {
        process: ChildGuard {
            name: "the worker",
            child,
        },
        log,
        metrics_port,
    }
}

/// Sum of `mqtt_connector_mqtt_connections` over brokers, from the worker's /metrics.
async fn open_mqtt_connections(port: u16) -> Option<f64> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .ok()?;
    let mut text = String::new();
    stream.read_to_string(&mut text).await.ok()?;
    let sum = text
        .lines()
        .filter(|l| l.starts_with("mqtt_connector_mqtt_connections{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    Some(sum)
}

fn spawn_echo_server(config: &Config, queue: &str) -> ChildGuard {
    let child = Command::new(std::env::current_exe().expect("path of this benchmark binary"))
        .arg("--echo-server")
        .arg(&config.amqp_url)
        .arg(queue)
        .arg(config.prefetch.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn the echo server");
    ChildGuard {
        name: "the echo server",
        child,
    }
}

// ---------------------------------------------------------------------------------------------
// The run
// ---------------------------------------------------------------------------------------------

struct Bench {
    config: Config,
    loadgen: LoadGen,
    arrivals: Arc<Arrivals>,
    run_id: String,
    rows: Vec<Row>,
    rabbitmq: Option<u32>,
    mosquitto_pid: u32,
}

impl Bench {
    /// The echo server as a child process on its own queue: closed loop (and optionally the
    /// open loop at `--rate`, RabbitMQ's share of the latency). Returns the closed-loop jobs/s.
    async fn echo_ceiling(&mut self, name: &str, warmup: usize, open_loop: bool) -> f64 {
        let config = self.config.clone();
        let echo_queue = format!("bench-echo-{}", self.run_id);
        self.loadgen.declare_queue(&echo_queue).await;
        let mut echo = spawn_echo_server(&config, &echo_queue);
        let closed = Load::Closed(config.outstanding);
        drive(
            &self.loadgen,
            &echo_queue,
            warmup,
            closed,
            Shape::Echo,
            &self.run_id,
            config.stall,
            None,
        )
        .await;
        if let Ok(Some(status)) = echo.child.try_wait() {
            panic!("the echo server exited with {status}");
        }
        let (row, _) = self
            .scenario(
                name,
                &echo_queue,
                echo.pid(),
                config.jobs,
                closed,
                Shape::Echo,
                false,
            )
            .await;
        let per_s = row.per_s;
        self.rows.push(row);
        if open_loop {
            let n = ((config.rate * config.open_seconds).round() as usize).max(1);
            let (row, _) = self
                .scenario(
                    &format!("echo open loop {:.0}/s", config.rate),
                    &echo_queue,
                    echo.pid(),
                    n,
                    Load::Open(config.rate),
                    Shape::Echo,
                    false,
                )
                .await;
            self.rows.push(row);
        }
        drop(echo);
        self.loadgen.delete_queue(&echo_queue).await;
        per_s
    }

    /// Warm-up (not reported), then one measured scenario against `server_pid`'s queue.
    #[allow(clippy::too_many_arguments)]
    async fn scenario(
        &mut self,
        name: &str,
        queue: &str,
        server_pid: u32,
        n: usize,
        load: Load,
        shape: Shape,
        sample_rss: bool,
    ) -> (Row, Measured) {
        let pids = Pids {
            server: Some(server_pid),
            rabbitmq: self.rabbitmq,
            mosquitto: self.mosquitto_pid,
        };
        let peak_reset = reset_peak_rss(server_pid);
        let before = snapshot(pids);
        let measured = drive(
            &self.loadgen,
            queue,
            n,
            load,
            shape,
            &self.run_id,
            self.config.stall,
            sample_rss.then_some(server_pid),
        )
        .await;
        let after = snapshot(pids);
        let qos0 = matches!(shape, Shape::Worker { qos: 0, .. });
        let arrivals = matches!(shape, Shape::Worker { .. }).then_some(&*self.arrivals);
        let row = evaluate(
            name,
            &measured,
            arrivals,
            qos0,
            self.config.mode == Mode::Smoke,
            before,
            after,
            peak_reset,
        )
        .await;
        (row, measured)
    }
}

async fn run(config: Config) -> bool {
    now_ns();
    let run_id = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
    println!(
        "throughput benchmark, {:?} mode: {} jobs per closed-loop scenario, prefetch {}, {} \
         outstanding, open loop {} jobs/s; {} CPUs; {}; {} queues; worker log: RUST_LOG={}",
        config.mode,
        config.jobs,
        config.prefetch,
        config.outstanding,
        config.rate,
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        Mosquitto::version(),
        if config.durable {
            "durable queues, persistent"
        } else {
            "transient"
        },
        std::env::var("RUST_LOG").unwrap_or_else(|_| "(unset: info, one line per job)".into()),
    );
    let mosquitto = Mosquitto::start(config.brokers, config.mosquitto_nodelay);
    let arrivals = Arc::new(Arrivals::default());
    let _subscriber = start_subscriber(
        mosquitto.ports[0],
        format!("bench/{run_id}/#"),
        arrivals.clone(),
    )
    .await;
    let loadgen = LoadGen::connect(&config.amqp_url, config.durable).await;
    let mut bench = Bench {
        config: config.clone(),
        loadgen,
        arrivals,
        run_id: run_id.clone(),
        rows: Vec::new(),
        rabbitmq: find_rabbitmq_pid(),
        mosquitto_pid: mosquitto.process.pid(),
    };
    let smoke = config.mode == Mode::Smoke;
    let warmup = (config.jobs / 10).clamp(1, 2_000);

    // ---- ceiling 1: MQTT publish with acks, one connection ----
    {
        let (tag, _book) = bench.loadgen.new_book(0, None);
        let pids = Pids {
            server: None,
            rabbitmq: bench.rabbitmq,
            mosquitto: bench.mosquitto_pid,
        };
        let topic = format!("bench/{run_id}/{tag}");
        // Warm-up on the same connection setup, then the measured run.
        mqtt_ceiling(mosquitto.ports[0], warmup, topic.clone(), tag, 1_000).await;
        let (tag, _book) = bench.loadgen.new_book(0, None);
        let topic = format!("bench/{run_id}/{tag}");
        let n = config.mqtt_ceiling_publishes;
        let before = snapshot(pids);
        let (elapsed, latencies, failures) =
            mqtt_ceiling(mosquitto.ports[0], n, topic, tag, 1_000).await;
        let after = snapshot(pids);
        let all: Vec<usize> = (0..n).collect();
        let deadline = Instant::now() + Duration::from_secs(10);
        let (mut lost, mut dups) = bench.arrivals.check(tag, &all);
        while lost > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
            (lost, dups) = bench.arrivals.check(tag, &all);
        }
        let ms = |p: f64| percentile(&latencies, p) as f64 / 1e6;
        let mut problems = Vec::new();
        if failures > 0 {
            problems.push(format!("{failures} not acknowledged"));
        }
        if lost > 0 {
            problems.push(format!("{lost} not received by the subscriber"));
        }
        let mut notes = vec!["latency = publish to PUBACK; CPU = the benchmark process".into()];
        if dups > 0 {
            notes.push(format!("{dups} duplicate MQTT deliveries"));
        }
        // The same without a subscriber (a topic nobody subscribed to): the broker's bare rate.
        let bare_before = snapshot(pids);
        let (bare_s, bare, bare_failures) = mqtt_ceiling(
            mosquitto.ports[0],
            n,
            format!("bench-unsubscribed/{run_id}"),
            tag,
            1_000,
        )
        .await;
        let bare_after = snapshot(pids);
        let bare_ms = |p: f64| percentile(&bare, p) as f64 / 1e6;
        bench.rows.push(Row {
            name: "mqtt ceiling, no subscriber".into(),
            jobs: n,
            per_s: (n - bare_failures) as f64 / bare_s,
            p50_ms: bare_ms(0.5),
            p90_ms: bare_ms(0.9),
            p99_ms: bare_ms(0.99),
            max_ms: bare_ms(1.0),
            cpu_us: per_job_us(bare_before.bench, bare_after.bench, n),
            rabbitmq_us: per_job_us(bare_before.rabbitmq, bare_after.rabbitmq, n),
            mosquitto_us: per_job_us(bare_before.mosquitto, bare_after.mosquitto, n),
            bench_us: per_job_us(bare_before.bench, bare_after.bench, n),
            check: if bare_failures == 0 {
                "ok".into()
            } else {
                format!("{bare_failures} not acknowledged")
            },
            ok: bare_failures == 0,
            ..Row::default()
        });
        bench.rows.push(Row {
            name: "mqtt ceiling (1 conn, QoS 1)".into(),
            jobs: n,
            per_s: (n - failures) as f64 / elapsed,
            ratio: None,
            p50_ms: ms(0.5),
            p90_ms: ms(0.9),
            p99_ms: ms(0.99),
            max_ms: ms(1.0),
            cpu_us: per_job_us(before.bench, after.bench, n),
            peak_rss_mib: None,
            rabbitmq_us: per_job_us(before.rabbitmq, after.rabbitmq, n),
            mosquitto_us: per_job_us(before.mosquitto, after.mosquitto, n),
            bench_us: per_job_us(before.bench, after.bench, n),
            check: if problems.is_empty() {
                "ok".into()
            } else {
                problems.join(", ")
            },
            ok: problems.is_empty(),
            notes,
        });
    }

    // ---- ceiling 2: RabbitMQ echo round trip (again at the end: the machine drifts) ----
    let echo_first = bench
        .echo_ceiling("echo ceiling (closed loop)", warmup, true)
        .await;

    // ---- the worker ----
    let queue = format!("bench-jobs-{run_id}");
    bench.loadgen.declare_queue(&queue).await;
    let dir = tempfile::Builder::new()
        .prefix("bench-worker-")
        .tempdir()
        .expect("create a temporary directory for the worker");
    let mut worker = start_worker(&config, &queue, &mosquitto, dir.path());
    let pid = worker.process.pid();
    let worker_start = Instant::now();
    // Ready when it answers one job; then a closed-loop warm-up (not reported).
    {
        let one = Shape::Worker {
            qos: 1,
            clients: None,
            brokers: None,
        };
        let measured = drive(
            &bench.loadgen,
            &queue,
            1,
            Load::Closed(1),
            one,
            &run_id,
            Duration::from_secs(30),
            None,
        )
        .await;
        worker.process.check_running(&worker.log);
        assert_eq!(
            measured.book.answered.load(Ordering::Acquire),
            1,
            "the worker did not answer its first job; its log:\n{}",
            tail(&worker.log, 4_000)
        );
        println!(
            "worker pid {pid} answered its first job {:.0} ms after it was started",
            worker_start.elapsed().as_secs_f64() * 1e3
        );
        drive(
            &bench.loadgen,
            &queue,
            warmup,
            Load::Closed(config.outstanding),
            one,
            &run_id,
            config.stall,
            None,
        )
        .await;
    }
    let closed = Load::Closed(config.outstanding);
    let mut capacity = 0.0;
    for qos in [1u8, 0, 2] {
        let shape = Shape::Worker {
            qos,
            clients: None,
            brokers: None,
        };
        let (row, _) = bench
            .scenario(
                &format!("worker closed loop, QoS {qos}"),
                &queue,
                pid,
                config.jobs,
                closed,
                shape,
                false,
            )
            .await;
        if qos == 1 {
            capacity = row.per_s;
        }
        bench.rows.push(row);
        worker.process.check_running(&worker.log);
    }

    // ---- open loop ----
    let qos1 = Shape::Worker {
        qos: 1,
        clients: None,
        brokers: None,
    };
    let open_rates = [
        (
            format!("worker open loop {:.0}/s, QoS 1", config.rate),
            config.rate,
            config.open_seconds,
        ),
        (
            format!("worker open loop 50% = {:.0}/s", capacity * 0.5),
            (capacity * 0.5).max(1.0),
            config.soak_seconds,
        ),
    ];
    let mut soak: Option<Vec<u64>> = None;
    for (i, (name, rate, seconds)) in open_rates.into_iter().enumerate() {
        let n = ((rate * seconds).round() as usize).max(1);
        let (row, measured) = bench
            .scenario(&name, &queue, pid, n, Load::Open(rate), qos1, i == 1)
            .await;
        if i == 1 {
            soak = Some(measured.rss_samples_kib);
        }
        bench.rows.push(row);
        worker.process.check_running(&worker.log);
    }

    // ---- many connectors: brokers, then client-ids (last: those connections stay open) ----
    let brokers = Shape::Worker {
        qos: 1,
        clients: None,
        brokers: Some(config.brokers),
    };
    let (mut row, _) = bench
        .scenario(
            &format!("worker {} brokers, QoS 1", config.brokers),
            &queue,
            pid,
            config.jobs,
            closed,
            brokers,
            false,
        )
        .await;
    row.notes.push(format!(
        "{} listeners of one mosquitto process, one connector each",
        config.brokers
    ));
    bench.rows.push(row);

    let connections_before = open_mqtt_connections(worker.metrics_port).await;
    let rss_before = proc_sample(pid).map(|s| s.rss_kib);
    let mosquitto_before = proc_sample(bench.mosquitto_pid).map(|s| s.rss_kib);
    let clients = Shape::Worker {
        qos: 1,
        clients: Some(config.clients),
        brokers: None,
    };
    let (row, _) = bench
        .scenario(
            &format!("worker {} client-ids, QoS 1", config.clients),
            &queue,
            pid,
            config.jobs.max(config.clients),
            closed,
            clients,
            false,
        )
        .await;
    bench.rows.push(row);
    worker.process.check_running(&worker.log);
    let connections_after = open_mqtt_connections(worker.metrics_port).await;
    let rss_after = proc_sample(pid).map(|s| s.rss_kib);
    let mosquitto_after = proc_sample(bench.mosquitto_pid).map(|s| s.rss_kib);
    let worker_final = proc_sample(pid);
    let log_bytes = std::fs::metadata(&worker.log).map_or(0, |m| m.len());
    drop(worker);
    bench.loadgen.delete_queue(&queue).await;
    let echo_last = bench
        .echo_ceiling("echo ceiling, again at the end", warmup, false)
        .await;
    // Every closed-loop throughput against the mean of the two echo ceilings.
    let echo_ceiling = (echo_first + echo_last) / 2.0;
    for row in &mut bench.rows {
        if row.name.starts_with("echo ceiling")
            || (row.name.starts_with("worker") && !row.name.contains("open loop"))
        {
            row.ratio = Some(row.per_s / echo_ceiling);
        }
    }
    println!(
        "\necho ceiling: {echo_first:.0} jobs/s at the start, {echo_last:.0} at the end; \
         ratios are to their mean, {echo_ceiling:.0} jobs/s"
    );

    // ---- report ----
    print_table(&bench.rows);
    println!();
    let opened = match (connections_before, connections_after) {
        (Some(b), Some(a)) if a > b => a - b,
        _ => config.clients as f64,
    };
    if let (Some(before), Some(after)) = (rss_before, rss_after) {
        println!(
            "memory per open MQTT connection: worker RSS {:.1} -> {:.1} MiB with {:.0} -> {:.0} \
             open connections = {:.1} KiB per connection (mosquitto: {:.1} KiB)",
            before as f64 / 1024.0,
            after as f64 / 1024.0,
            connections_before.unwrap_or(f64::NAN),
            connections_after.unwrap_or(f64::NAN),
            (after as f64 - before as f64) / opened,
            match (mosquitto_before, mosquitto_after) {
                (Some(b), Some(a)) => (a as f64 - b as f64) / opened,
                _ => f64::NAN,
            }
        );
    }
    if let Some(samples) = soak.filter(|s| s.len() >= 2) {
        let mib = |k: u64| k as f64 / 1024.0;
        let (first, last) = (samples[0], samples[samples.len() - 1]);
        let max = samples.iter().copied().max().unwrap_or(0);
        println!(
            "worker RSS over the 50% open-loop soak ({} samples, 0.5 s apart): first {:.1}, last \
             {:.1}, max {:.1} MiB (change {:+.1} MiB)",
            samples.len(),
            mib(first),
            mib(last),
            mib(max),
            mib(last) - mib(first)
        );
    }
    if let Some(s) = worker_final {
        println!(
            "worker at the end: RSS {:.1} MiB, lifetime peak (or since the last reset) {:.1} MiB, \
             {:.1} s CPU; its log: {:.0} bytes per job",
            s.rss_kib as f64 / 1024.0,
            s.hwm_kib as f64 / 1024.0,
            s.cpu_s,
            log_bytes as f64
                / bench
                    .rows
                    .iter()
                    .filter(|r| r.name.starts_with("worker"))
                    .map(|r| r.jobs)
                    .sum::<usize>()
                    .max(1) as f64
        );
    }
    let stray = bench.loadgen.stray.load(Ordering::Relaxed);
    let unparsed = bench.arrivals.unparsed.load(Ordering::Relaxed);
    if stray > 0 || unparsed > 0 {
        println!("{stray} replies and {unparsed} MQTT messages belonged to no scenario");
    }
    if let Some(err) = bench.arrivals.errors.lock().expect("arrivals lock").clone() {
        println!("the MQTT subscriber lost its connection at least once: {err}");
    }
    if !smoke {
        print_targets(&bench.rows, echo_ceiling);
    }
    let ok = bench.rows.iter().all(|r| r.ok) && stray == 0;
    drop(mosquitto);
    ok
}

/// The issue's targets next to the figures (information, never an assertion).
fn print_targets(rows: &[Row], echo: f64) {
    let find = |prefix: &str| rows.iter().find(|r| r.name.starts_with(prefix));
    let verdict = |met: bool| if met { "met" } else { "NOT met" };
    println!("\ntargets (one run on this machine; figures are noisy):");
    if let Some(q1) = find("worker closed loop, QoS 1") {
        let ratio = q1.per_s / echo;
        println!(
            "  QoS 1 closed loop >= 80% of the echo ceiling: {:.0}% -> {}",
            ratio * 100.0,
            verdict(ratio >= 0.8)
        );
        for qos in [0, 2] {
            if let Some(r) = find(&format!("worker closed loop, QoS {qos}")) {
                let diff = (r.per_s / q1.per_s - 1.0) * 100.0;
                println!(
                    "  QoS {qos} within 10% of QoS 1: {diff:+.0}% -> {}",
                    verdict(diff.abs() <= 10.0)
                );
            }
        }
        if let Some(cpu) = q1.cpu_us {
            println!(
                "  worker CPU per job < 50 µs (QoS 1 closed loop): {cpu:.1} µs -> {}",
                verdict(cpu < 50.0)
            );
        }
        for kind in ["brokers", "client-ids"] {
            if let Some(r) = rows
                .iter()
                .find(|r| r.name.starts_with("worker") && r.name.contains(kind))
            {
                let factor = q1.per_s / r.per_s.max(1e-9);
                println!(
                    "  {} within 2x of one connector: {factor:.2}x slower -> {}",
                    r.name,
                    verdict(factor <= 2.0)
                );
            }
        }
    }
    if let Some(r) = find("worker open loop") {
        println!(
            "  {}: p99 < 5 ms: {:.2} ms -> {}",
            r.name,
            r.p99_ms,
            verdict(r.p99_ms < 5.0)
        );
    }
    if let Some(r) = find("worker open loop 50%") {
        println!(
            "  {}: p99 < 20 ms: {:.2} ms -> {}",
            r.name,
            r.p99_ms,
            verdict(r.p99_ms < 20.0)
        );
    }
    let peak = rows
        .iter()
        .filter(|r| r.name.starts_with("worker") && !r.name.contains("client-ids"))
        .filter_map(|r| r.peak_rss_mib)
        .fold(0.0, f64::max);
    println!(
        "  worker peak RSS < 30 MiB (all scenarios but the 1,000 client-ids one): {peak:.1} MiB \
         -> {}",
        verdict(peak < 30.0)
    );
}
