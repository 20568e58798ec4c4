//! `mqtt-connector`: parse the command line, set up logging, run the command, map its outcome
//! to the process exit status.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use mqtt_connector::amqp::queue::{QueueSettings, QueueType};
use mqtt_connector::amqp::tls::TlsFiles;
use mqtt_connector::amqp::{DEFAULT_QUEUE, DEFAULT_URL};
use mqtt_connector::check;
use mqtt_connector::client::{Client, ClientError, ClientOptions, JobRequest};
use mqtt_connector::connectors::ConnectorStore;
use mqtt_connector::job::Limits;
use mqtt_connector::job_args;
use mqtt_connector::log_line::{LineFields, LineFormat};
use mqtt_connector::logging::{FlushGuard, LogBuffer};
use mqtt_connector::metrics::Metrics;
use mqtt_connector::mqtt::connection::ConnectionSettings;
use mqtt_connector::mqtt::pool::Pool;
use mqtt_connector::outcome::Reply;
use mqtt_connector::pipeline::Pipeline;
use mqtt_connector::policy::{AllowedBrokers, JobFiles, Policy, PolicyError};
use mqtt_connector::worker::{Worker, WorkerOptions};
use tokio_util::sync::CancellationToken;

/// mimalloc rather than glibc's malloc: every job allocates and frees small blocks on lapin's
/// I/O thread and tokio's workers, where glibc's malloc and free were a sixth of a job's
/// instructions (docs/benchmark.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Turns RabbitMQ "send" jobs into acknowledged MQTT publishes.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, env = "MQTT_CONNECTOR_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run a worker: consume jobs, publish them, reply.
    Worker(WorkerArgs),
    /// Run one job directly (no queue) and print its result; exits with its exit-code.
    Send(SendArgs),
    /// Put one job on the queue; with --wait, print the reply and exit with its exit-code.
    Submit(SubmitArgs),
    /// Load every connector and report what is wrong.
    Check(CheckArgs),
}

#[derive(Args)]
struct AmqpArgs {
    /// RabbitMQ URL, or a comma-separated list of the nodes of one cluster (tried in order).
    #[arg(long, env = "MQTT_CONNECTOR_AMQP_URL", default_value = DEFAULT_URL, hide_env_values = true)]
    amqp_url: String,
    /// The request queue.
    #[arg(long, env = "MQTT_CONNECTOR_QUEUE", default_value = DEFAULT_QUEUE)]
    queue: String,
    /// For amqps://: the CA certificate(s) to verify RabbitMQ against, instead of the system's.
    #[arg(long, env = "MQTT_CONNECTOR_AMQP_CA", value_name = "FILE")]
    amqp_ca: Option<PathBuf>,
    /// For amqps://: a client certificate (PEM) to present; with ?auth_mechanism=external in the
    /// URL it is the login.
    #[arg(
        long,
        env = "MQTT_CONNECTOR_AMQP_CERT",
        value_name = "FILE",
        requires = "amqp_key"
    )]
    amqp_cert: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    #[arg(
        long,
        env = "MQTT_CONNECTOR_AMQP_KEY",
        value_name = "FILE",
        requires = "amqp_cert"
    )]
    amqp_key: Option<PathBuf>,
}

impl AmqpArgs {
    fn tls(&self) -> TlsFiles {
        TlsFiles {
            ca: self.amqp_ca.clone(),
            cert: self.amqp_cert.clone(),
            key: self.amqp_key.clone(),
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum QueueTypeArg {
    Classic,
    Quorum,
}

#[derive(Args)]
struct ConnectorsArg {
    /// Folder of connector files (NAME.json).
    #[arg(
        long,
        env = "MQTT_CONNECTOR_CONNECTORS",
        default_value = "config/connectors"
    )]
    connectors: PathBuf,
}

#[derive(Args)]
struct JobArgs {
    /// Connector to start from.
    #[arg(long, env = "MQTT_CONNECTOR_CONNECTOR")]
    connector: Option<String>,
    /// A job key, e.g. --set topic=a/b --set content=hi (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    sets: Vec<String>,
}

#[derive(Args)]
struct WorkerArgs {
    #[command(flatten)]
    amqp: AmqpArgs,
    #[command(flatten)]
    connectors: ConnectorsArg,
    /// Jobs in flight at once (RabbitMQ prefetch), 1 to 65535.
    #[arg(long, env = "MQTT_CONNECTOR_PREFETCH", default_value_t = 256, value_name = "N", allow_negative_numbers = true, value_parser = bounded::<1, 65_535>)]
    prefetch: u64,
    /// Where to serve /metrics, /healthz and /readyz, e.g. 0.0.0.0:9090.
    #[arg(long, env = "MQTT_CONNECTOR_METRICS_ADDR")]
    metrics_addr: Option<SocketAddr>,
    /// Close MQTT connections unused for this many seconds, 1 to 604800 (a week).
    #[arg(long, env = "MQTT_CONNECTOR_IDLE_TIMEOUT", default_value_t = 300, value_name = "SECONDS", allow_negative_numbers = true, value_parser = bounded::<1, 604_800>)]
    idle_timeout: u64,
    /// Seconds the jobs in flight may take to finish after SIGTERM; those still running then
    /// are cancelled (no reply, not acked: RabbitMQ redelivers them). 0 to 3600.
    #[arg(long, env = "MQTT_CONNECTOR_GRACE_PERIOD", default_value_t = 30, value_name = "SECONDS", allow_negative_numbers = true, value_parser = bounded::<0, 3_600>)]
    grace_period: u64,
    /// Largest `content` accepted, in bytes: 1 to 268435456 (256 MiB, about MQTT's largest
    /// packet).
    #[arg(long, env = "MQTT_CONNECTOR_MAX_CONTENT_BYTES", default_value_t = MAX_CONTENT_BYTES, value_name = "BYTES", allow_negative_numbers = true, value_parser = bounded::<1, MAX_CONTENT_BYTES>)]
    max_content_bytes: u64,
    /// Appended to every MQTT client-id, so several workers can share a connector; `auto`
    /// means `-HOSTNAME-PID`. Empty (default): client-ids are used as written.
    #[arg(long, env = "MQTT_CONNECTOR_CLIENT_ID_SUFFIX", default_value = "")]
    client_id_suffix: String,
    /// Publishes in flight on one MQTT connection, 1 to 65535.
    #[arg(long, env = "MQTT_CONNECTOR_MQTT_INFLIGHT", default_value_t = 1000, value_name = "N", allow_negative_numbers = true, value_parser = bounded::<1, 65_535>)]
    mqtt_inflight: u64,
    #[command(flatten)]
    allow_broker: AllowBrokerArg,
    /// Folder whose files (certificates, keys) job bodies may name; without it, jobs name none.
    #[arg(long, env = "MQTT_CONNECTOR_JOB_FILES")]
    job_files: Option<PathBuf>,
    /// MQTT connections this worker holds open at most; at the bound the least recently used
    /// idle one is closed. 1 to 100000.
    #[arg(long, env = "MQTT_CONNECTOR_MAX_CONNECTIONS", default_value_t = 1000, value_name = "N", allow_negative_numbers = true, value_parser = bounded::<1, 100_000>)]
    max_connections: u64,
    /// Largest answer to a `request` kept, in bytes: 1 to 268435456; a larger answer is
    /// exit-code 10.
    #[arg(long, env = "MQTT_CONNECTOR_MAX_RESPONSE_BYTES", default_value_t = DEFAULT_MAX_RESPONSE_BYTES, value_name = "BYTES", allow_negative_numbers = true, value_parser = bounded::<1, MAX_CONTENT_BYTES>)]
    max_response_bytes: u64,
    #[command(flatten)]
    request_queue: RequestQueueArgs,
}

#[derive(Args)]
struct AllowBrokerArg {
    /// A broker jobs may reach: host or host:port, * within a host label or for the port
    /// (repeatable; the environment variable is comma-separated). None given: any broker.
    #[arg(
        long = "allow-broker",
        value_name = "PATTERN",
        env = "MQTT_CONNECTOR_ALLOW_BROKER",
        value_delimiter = ','
    )]
    patterns: Vec<String>,
}

#[derive(Args)]
struct RequestQueueArgs {
    /// The type with which a missing request queue is declared (an existing one is used as it is).
    #[arg(long, env = "MQTT_CONNECTOR_QUEUE_TYPE", value_enum, default_value_t = QueueTypeArg::Classic)]
    queue_type: QueueTypeArg,
    /// Quorum queue: a job whose worker died this many times is dead-lettered, not redelivered.
    /// 1 to 1000000.
    #[arg(long, env = "MQTT_CONNECTOR_DELIVERY_LIMIT", value_name = "N", allow_negative_numbers = true, value_parser = bounded::<1, 1_000_000>)]
    delivery_limit: Option<u64>,
    /// Declared with a missing request queue, which dead-letters into it (through the default
    /// exchange): jobs over the delivery limit and jobs that can never succeed.
    #[arg(long, env = "MQTT_CONNECTOR_DEAD_LETTER_QUEUE", value_name = "NAME")]
    dead_letter_queue: Option<String>,
}

#[derive(Args)]
struct SendArgs {
    #[command(flatten)]
    job: JobArgs,
    #[command(flatten)]
    connectors: ConnectorsArg,
}

#[derive(Args)]
struct SubmitArgs {
    #[command(flatten)]
    job: JobArgs,
    /// Wait for the reply, print it and exit with its exit-code.
    #[arg(long)]
    wait: bool,
    /// Seconds to wait for the reply, 1 to 86400.
    #[arg(long, env = "MQTT_CONNECTOR_WAIT_TIMEOUT", default_value_t = 60, value_name = "SECONDS", allow_negative_numbers = true, value_parser = bounded::<1, 86_400>)]
    wait_timeout: u64,
    #[command(flatten)]
    amqp: AmqpArgs,
}

#[derive(Args)]
struct CheckArgs {
    #[command(flatten)]
    connectors: ConnectorsArg,
    #[command(flatten)]
    allow_broker: AllowBrokerArg,
}

/// `--max-content-bytes` at most, also its default: 256 MiB, about MQTT's largest packet
/// (268,435,455 bytes); no larger content could be published.
const MAX_CONTENT_BYTES: u64 = 256 * 1024 * 1024;
const DEFAULT_MAX_RESPONSE_BYTES: u64 = 256 * 1024;
const _: () =
    assert!(DEFAULT_MAX_RESPONSE_BYTES == mqtt_connector::job::DEFAULT_MAX_RESPONSE_BYTES as u64);
const _: () = assert!(MAX_CONTENT_BYTES == mqtt_connector::job::DEFAULT_MAX_CONTENT_BYTES as u64);

/// A whole number from `MIN` to `MAX`, for clap: every duration and count is bounded where it
/// is parsed, so no later arithmetic on it (`Instant + Duration`, allocation sizes) can
/// overflow. clap's error names the option and the value; this says what is expected.
fn bounded<const MIN: u64, const MAX: u64>(value: &str) -> Result<u64, String> {
    let expected = || format!("expected a whole number from {MIN} to {MAX}");
    let digits = value.trim();
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(expected());
    }
    match digits.parse::<u64>() {
        Ok(number) if (MIN..=MAX).contains(&number) => Ok(number),
        _ => Err(expected()),
    }
}

/// A value [`bounded`] to fit in `T`, converted (saturating, which a bound makes unreachable).
fn fit<T: TryFrom<u64> + Bounded>(value: u64) -> T {
    T::try_from(value).unwrap_or(T::MAX)
}

/// The largest value of an integer type, for [`fit`].
trait Bounded {
    const MAX: Self;
}

impl Bounded for u16 {
    const MAX: Self = u16::MAX;
}

impl Bounded for u32 {
    const MAX: Self = u32::MAX;
}

impl Bounded for usize {
    const MAX: Self = usize::MAX;
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let _log_flush = match init_tracing(cli.log_format) {
        Ok(guard) => guard,
        Err(err) => {
            eprintln!("cannot start the log writer thread: {err}");
            return ExitCode::FAILURE;
        }
    };
    mqtt_connector::install_crypto_provider();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        match cli.command {
            Command::Worker(args) => worker(args).await,
            Command::Send(args) => send(args).await,
            Command::Submit(args) => submit(args).await,
            Command::Check(args) => check(args),
        }
    })
}

/// Logs go to stderr through a buffer written out every 50 ms, WARN and ERROR at once (see
/// `mqtt_connector::logging`): a job's line costs a copy under a lock, not a write(2) or a
/// thread woken, and a stderr that blocks never blocks a job. The guard writes what is
/// buffered when `main` returns.
fn init_tracing(format: LogFormat) -> std::io::Result<FlushGuard> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(
            "info,lapin=warn,lapin::returned_messages=error,rumqttc=warn",
        )
    });
    let (writer, guard) = LogBuffer::start()?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(writer);
    match format {
        LogFormat::Text => builder
            .event_format(LineFormat::default())
            .fmt_fields(LineFields)
            .init(),
        LogFormat::Json => builder.json().init(),
    }
    Ok(guard)
}

async fn worker(args: WorkerArgs) -> ExitCode {
    let mut options = WorkerOptions::new(
        args.amqp.amqp_url.clone(),
        args.amqp.queue.clone(),
        args.connectors.connectors,
    );
    options.amqp_tls = args.amqp.tls();
    options.queue_type = match args.request_queue.queue_type {
        QueueTypeArg::Classic => QueueType::Classic,
        QueueTypeArg::Quorum => QueueType::Quorum,
    };
    options.delivery_limit = args.request_queue.delivery_limit.map(fit::<u32>);
    options.dead_letter_queue = args.request_queue.dead_letter_queue;
    options.prefetch = fit::<u16>(args.prefetch);
    options.metrics_addr = args.metrics_addr;
    options.idle_timeout = Duration::from_secs(args.idle_timeout);
    options.grace_period = Duration::from_secs(args.grace_period);
    options.limits = Limits {
        max_content_bytes: fit::<usize>(args.max_content_bytes),
        max_response_bytes: fit::<usize>(args.max_response_bytes),
    };
    options.policy = match policy(&args.allow_broker, args.job_files.as_deref()) {
        Ok(policy) => policy,
        Err(err) => return fail(&err.to_string()),
    };
    options.max_connections = fit::<usize>(args.max_connections);
    options.mqtt = ConnectionSettings {
        inflight: fit::<u16>(args.mqtt_inflight),
        max_packet_bytes: fit::<usize>(args.max_content_bytes).saturating_add(64 * 1024),
        // An answer must fit in with its topic and properties.
        max_incoming_packet_bytes: fit::<usize>(args.max_response_bytes)
            .saturating_add(64 * 1024)
            .max(mqtt_connector::mqtt::connection::DEFAULT_MAX_INCOMING_PACKET_BYTES),
        client_id_suffix: client_id_suffix(&args.client_id_suffix),
        ..ConnectionSettings::default()
    };
    let shutdown = CancellationToken::new();
    let worker = match Worker::start(options, shutdown.clone()).await {
        Ok(worker) => worker,
        Err(err) => {
            tracing::error!("{}", mqtt_connector::amqp::error_chain(&err));
            return ExitCode::FAILURE;
        }
    };
    tokio::spawn(cancel_on_signal(shutdown));
    // A task of its own: on the runtime's worker threads rather than this one, so deliveries
    // and the jobs they spawn do not hop between threads.
    match tokio::spawn(worker.run()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!("the worker stopped abnormally: {err}");
            ExitCode::FAILURE
        }
    }
}

/// The trust boundary from the command line.
fn policy(allow_broker: &AllowBrokerArg, job_files: Option<&Path>) -> Result<Policy, PolicyError> {
    Ok(Policy {
        allowed_brokers: AllowedBrokers::parse(&allow_broker.patterns)?,
        job_files: match job_files {
            Some(dir) => JobFiles::inside(dir)?,
            None => JobFiles::Forbidden,
        },
    })
}

fn client_id_suffix(option: &str) -> String {
    if option != "auto" {
        return option.to_owned();
    }
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().to_owned())
        .unwrap_or_else(|_| "worker".into());
    format!("-{host}-{}", std::process::id())
}

/// SIGTERM or SIGINT: stop taking jobs and finish those in flight.
async fn cancel_on_signal(shutdown: CancellationToken) {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = terminate => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    tracing::info!("shutdown requested: finishing the jobs in flight");
    shutdown.cancel();
}

async fn send(args: SendArgs) -> ExitCode {
    let job = match job_args::job_object(args.job.connector.as_deref(), &args.job.sets) {
        Ok(job) => job,
        Err(err) => return fail(&err.to_string()),
    };
    // The connectors folder only matters when the job names a connector (`--connector` or
    // `--set connector=`): a job that says everything runs from any folder.
    let store = if job.contains_key("connector") {
        match ConnectorStore::load(&args.connectors.connectors) {
            Ok(store) => store,
            Err(err) => return fail(&err.to_string()),
        }
    } else {
        ConnectorStore::default()
    };
    let body = serde_json::Value::Object(job).to_string().into_bytes();
    let metrics = Metrics::new();
    let pool = Pool::new(
        ConnectionSettings::default(),
        Duration::from_secs(60),
        1,
        metrics.clone(),
    );
    let pipeline = Pipeline::new(
        Arc::new(store),
        pool.clone(),
        metrics,
        Limits::default(),
        Policy::for_send(),
    );
    let started = std::time::Instant::now();
    let finished = pipeline
        .run(&body, mqtt_connector::pipeline::Taken::now())
        .await;
    pool.close_all();
    println!(
        "{}",
        String::from_utf8_lossy(&Reply::new(&finished.outcome, started.elapsed()).to_json())
    );
    ExitCode::from(finished.outcome.exit_code.code())
}

async fn submit(args: SubmitArgs) -> ExitCode {
    let job = match JobRequest::from_args(args.job.connector.as_deref(), &args.job.sets) {
        Ok(job) => job,
        Err(err) => return fail(&err.to_string()),
    };
    let options = ClientOptions {
        tls: args.amqp.tls(),
        queue: QueueSettings::classic(args.amqp.queue.as_str()),
    };
    let client = match Client::connect_with(&args.amqp.amqp_url, options).await {
        Ok(client) => client,
        Err(err) => return fail(&mqtt_connector::amqp::error_chain(&err)),
    };
    let code = if args.wait {
        match client
            .call(&job, Duration::from_secs(args.wait_timeout))
            .await
        {
            Ok(reply) => {
                println!("{}", reply.to_json());
                ExitCode::from(reply.exit_code.code())
            }
            Err(err @ ClientError::NoReply(_)) => {
                println!(
                    "{}",
                    serde_json::json!({"exit-code": 6, "message": err.to_string()})
                );
                ExitCode::from(6)
            }
            Err(err) => fail(&mqtt_connector::amqp::error_chain(&err)),
        }
    } else {
        match client.submit(&job).await {
            Ok(correlation_id) => {
                println!("{correlation_id}");
                ExitCode::SUCCESS
            }
            Err(err) => fail(&mqtt_connector::amqp::error_chain(&err)),
        }
    };
    client.close().await;
    code
}

fn check(args: CheckArgs) -> ExitCode {
    let allowed = match AllowedBrokers::parse(&args.allow_broker.patterns) {
        Ok(allowed) => allowed,
        Err(err) => return fail(&err.to_string()),
    };
    match check::folder(&args.connectors.connectors, &allowed) {
        Ok(report) => {
            print!("{report}");
            if report.is_clean() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(err) => fail(&err.to_string()),
    }
}

fn fail(message: &str) -> ExitCode {
    eprintln!("error: {message}");
    ExitCode::FAILURE
}
