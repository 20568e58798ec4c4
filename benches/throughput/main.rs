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
//! broker), `--peer "CMD"` (another worker of the contract, e.g. `node /path/to/worker.js`, run
//! through the same closed and open loops after the worker). The RabbitMQ URL comes from
//! `MQTT_CONNECTOR_BENCH_AMQP_URL`, else `MQTT_CONNECTOR_TEST_AMQP_URL`, else
//! `amqp://guest:guest@127.0.0.1:5672/%2f`.
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
//!   driven closed loop (N jobs outstanding) at QoS 1, 0 and 2, over MQTT 5, with `"action":
//!   "request"` jobs answered by a device in this process, open loop at `--rate` jobs/s and at
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
//! duplicate reply or a non-zero exit-code. No speed assertion anywhere: the targets are printed.//!
//! The modules, by concern: [`loadgen`] publishes jobs and books their replies; [`ceilings`]
//! measures what the machine allows without the worker (one MQTT connection, a RabbitMQ echo
//! server); [`scenarios`] starts the worker and drives each scenario; [`mosquitto`] is the broker
//! process and the subscriber that counts what arrived; [`device`] answers request jobs;
//! [`peer`] runs another worker of the contract through the same loops; [`procfs`] samples
//! processes through /proc; [`report`] judges a scenario and prints the tables.

mod ceilings;
mod device;
// The worker as a child process: the test harness' wrapper, shared rather than copied.
#[allow(dead_code)]
#[path = "../../tests/common/child.rs"]
mod child;
#[allow(dead_code)]
#[path = "../../tests/common/http.rs"]
mod http;
mod loadgen;
mod mosquitto;
mod peer;
mod procfs;
mod report;
mod scenarios;

use std::net::TcpListener;
use std::process::ExitCode;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Mode {
    Smoke,
    Quick,
    Full,
}

#[derive(Clone, Debug)]
pub struct Config {
    pub mode: Mode,
    pub amqp_url: String,
    pub jobs: usize,
    pub prefetch: u16,
    pub outstanding: usize,
    pub rate: f64,
    pub open_seconds: f64,
    pub soak_seconds: f64,
    pub clients: usize,
    pub brokers: usize,
    pub mqtt_ceiling_publishes: usize,
    pub durable: bool,
    pub mosquitto_nodelay: bool,
    /// `--peer CMD`: another worker of the contract, run through the same loops.
    pub peer: Option<String>,
    /// How long without a new reply before a scenario gives up waiting.
    pub stall: Duration,
}

impl Config {
    pub fn from_args(args: &[String]) -> Config {
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
            "--peer",
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
            peer: args
                .iter()
                .position(|a| a == "--peer")
                .map(|at| args.get(at + 1).expect("--peer needs a command").clone()),
            stall: Duration::from_secs(if mode == Mode::Smoke { 20 } else { 30 }),
        }
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--echo-server") {
        return ceilings::echo_server_main(&args[1..]);
    }
    let config = Config::from_args(&args);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("build the tokio runtime");
    let started = Instant::now();
    // A panic (a stalled scenario, a worker that died) is a failed check like any other: the
    // hook has printed it; the summary and the result line below must still be printed.
    let ok = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        runtime.block_on(scenarios::run(config.clone()))
    }))
    .unwrap_or(false);
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
    if config.mode == Mode::Smoke {
        // Under `cargo test` the smoke run counts as one test, in libtest's words, so that
        // whoever sums cargo's "test result:" lines (scripts/test) counts it too.
        let (verdict, passed, failed) = if ok { ("ok", 1, 0) } else { ("FAILED", 0, 1) };
        println!(
            "\ntest result: {verdict}. {passed} passed; {failed} failed; 0 ignored; 0 measured; \
             0 filtered out; finished in {:.2}s\n",
            started.elapsed().as_secs_f64()
        );
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Nanoseconds since the benchmark started (never 0, so 0 can mean "not yet").
pub fn now_ns() -> u64 {
    static BASE: OnceLock<Instant> = OnceLock::new();
    let base = BASE.get_or_init(Instant::now);
    u64::try_from(base.elapsed().as_nanos()).unwrap_or(u64::MAX) + 1
}

pub fn free_port() -> u16 {
    TcpListener::bind(("127.0.0.1", 0))
        .expect("bind 127.0.0.1:0")
        .local_addr()
        .expect("local_addr of a bound socket")
        .port()
}
