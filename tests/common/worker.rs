//! A worker running inside the test process, through the same code path as `main`
//! ([`Worker::start`] then [`Worker::run`]), plus helpers to build jobs and await their replies.

use mqtt_connector::worker::{Worker, WorkerOptions};
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// A worker consuming `queue`; cancelled when dropped, or drained with [`stop`](Self::stop).
pub struct RunningWorker {
    /// The request queue it consumes.
    pub queue: String,
    shutdown: CancellationToken,
    handle: Option<JoinHandle<()>>,
    metrics_addr: Option<SocketAddr>,
}

/// Starts a worker on `queue` with the connectors of `connectors_dir` and `/metrics` on a free
/// port of 127.0.0.1. Returns once it is started (connectors loaded, HTTP bound); use
/// [`RunningWorker::wait_ready`] to await its consumer.
pub async fn spawn_worker(queue: &str, connectors_dir: &Path) -> RunningWorker {
    let mut options =
        WorkerOptions::new(super::amqp::amqp_url(), queue.to_string(), connectors_dir);
    options.metrics_addr = Some("127.0.0.1:0".parse().expect("socket address"));
    spawn_worker_with(options).await
}

/// Like [`spawn_worker`] with options of your own.
pub async fn spawn_worker_with(options: WorkerOptions) -> RunningWorker {
    mqtt_connector::install_crypto_provider();
    let queue = options.queue.clone();
    let shutdown = CancellationToken::new();
    let worker = Worker::start(options, shutdown.clone())
        .await
        .expect("worker start");
    let metrics_addr = worker.metrics_addr();
    let handle = tokio::spawn(worker.run());
    let running = RunningWorker {
        queue,
        shutdown,
        handle: Some(handle),
        metrics_addr,
    };
    if running.metrics_addr.is_some() {
        running.wait_ready(Duration::from_secs(20)).await;
    }
    running
}

impl RunningWorker {
    /// Where `/metrics`, `/healthz` and `/readyz` are served.
    pub fn metrics_addr(&self) -> SocketAddr {
        self.metrics_addr.expect("worker started without metrics")
    }

    /// Waits until `/readyz` answers 200 (the worker consumes); panics after `within`.
    pub async fn wait_ready(&self, within: Duration) {
        super::http::wait_for_status(self.metrics_addr(), "/readyz", 200, within).await;
    }

    /// The `/metrics` text.
    pub async fn metrics(&self) -> String {
        let (status, body) = super::http::get(self.metrics_addr(), "/metrics")
            .await
            .expect("GET /metrics");
        assert_eq!(status, 200, "GET /metrics: {body}");
        body
    }

    /// Cancels the worker and waits (30 s at most) until it has drained and returned.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(handle) = self.handle.take() {
            tokio::time::timeout(Duration::from_secs(30), handle)
                .await
                .expect("worker did not stop within 30 s")
                .expect("worker task panicked");
        }
    }
}

impl Drop for RunningWorker {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// `--job-files /`: job bodies may name any file (tests about TLS, not the trust boundary).
pub fn job_files_anywhere(options: &mut WorkerOptions) {
    options.policy.job_files =
        mqtt_connector::policy::JobFiles::inside(Path::new("/")).expect("the root folder");
}

/// The sum of every sample of metric `name` (all label sets) in a Prometheus text exposition;
/// 0 when absent.
pub fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter(|line| {
            line.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// What most worker tests need: a connectors folder, a RabbitMQ connection, a fresh request
/// queue, a worker consuming it, and a reply queue being consumed.
pub struct TestBed {
    /// The connectors folder (a temporary directory; write files before [`TestBed::start`]).
    pub connectors: tempfile::TempDir,
    /// The test's own RabbitMQ connection.
    pub amqp: super::Amqp,
    /// The request queue.
    pub queue: String,
    /// The reply queue (exclusive to `amqp`'s connection).
    pub reply_queue: String,
    /// The replies arriving on `reply_queue`.
    pub replies: super::ReplyStream,
    /// The worker.
    pub worker: RunningWorker,
}

/// An empty connectors folder, to write connector files into before [`TestBed::start`].
pub fn connectors_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("connectors-")
        .tempdir()
        .expect("create connectors dir")
}

impl TestBed {
    /// A bed with no connectors.
    pub async fn new() -> TestBed {
        TestBed::start(connectors_dir()).await
    }

    /// A bed whose worker loads `connectors` (already written).
    pub async fn start(connectors: tempfile::TempDir) -> TestBed {
        TestBed::start_with(connectors, |_| {}).await
    }

    /// A bed with no connectors whose worker accepts any file path in a job body
    /// (`--job-files /`), for tests about TLS rather than the trust boundary.
    pub async fn with_job_files_anywhere() -> TestBed {
        TestBed::start_with(connectors_dir(), job_files_anywhere).await
    }

    /// [`start`](Self::start) with worker options changed by `configure`.
    pub async fn start_with(
        connectors: tempfile::TempDir,
        configure: impl FnOnce(&mut WorkerOptions),
    ) -> TestBed {
        super::install_crypto_provider();
        let amqp = super::Amqp::connect().await;
        let queue = super::unique_name("jobs");
        let (reply_queue, replies) = amqp.reply_queue().await;
        let mut options =
            WorkerOptions::new(super::amqp::amqp_url(), queue.clone(), connectors.path());
        options.metrics_addr = Some("127.0.0.1:0".parse().expect("socket address"));
        configure(&mut options);
        let worker = spawn_worker_with(options).await;
        TestBed {
            connectors,
            amqp,
            queue,
            reply_queue,
            replies,
            worker,
        }
    }

    /// Sends `body` (raw bytes) with this bed's reply queue and a fresh correlation id, and
    /// returns the reply (panics after `within`), having checked the correlation id was copied
    /// and the content type is `application/json`.
    pub async fn run_raw(&mut self, body: &[u8], within: Duration) -> super::Reply {
        let correlation_id = super::unique_name("corr");
        self.amqp
            .send_job(
                &self.queue,
                body,
                Some(&self.reply_queue),
                Some(&correlation_id),
            )
            .await;
        let reply = self.replies.expect_reply(within).await;
        assert_eq!(
            reply.correlation_id.as_deref(),
            Some(correlation_id.as_str()),
            "correlation id not copied: {}",
            reply.body
        );
        assert_eq!(
            reply.content_type.as_deref(),
            Some("application/json"),
            "content type of {}",
            reply.body
        );
        reply
    }

    /// [`run_raw`](Self::run_raw) with a JSON job.
    pub async fn run(&mut self, job: serde_json::Value, within: Duration) -> super::Reply {
        self.run_raw(job.to_string().as_bytes(), within).await
    }

    /// Waits until the request queue holds no ready message (nothing requeued); panics after
    /// `within` with the count.
    pub async fn wait_queue_empty(&self, within: Duration) {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let count = self.amqp.queue_message_count(&self.queue).await;
            if count == Some(0) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "request queue {} still holds {count:?} messages after {within:?}",
                self.queue
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stops the worker (draining its jobs) and deletes the request queue.
    pub async fn finish(self) {
        self.worker.stop().await;
        self.amqp.delete_queue(&self.queue).await;
    }
}

/// A job for `broker` with a fresh client id, on `topic`, with `content`, at QoS 1, with a
/// 5 s timeout; add or override keys with [`with`].
pub fn job(broker: &str, topic: &str, content: &str) -> serde_json::Value {
    serde_json::json!({
        "broker": broker,
        "client-id": super::unique_name("worker"),
        "topic": topic,
        "content": content,
        "qos": 1,
        "timeout": 5000,
    })
}

/// `job` with `extra`'s keys set (overriding); a `null` value removes the key.
pub fn with(mut job: serde_json::Value, extra: serde_json::Value) -> serde_json::Value {
    let object = job.as_object_mut().expect("job is an object");
    for (key, value) in extra.as_object().expect("extra is an object") {
        if value.is_null() {
            object.remove(key);
        } else {
            object.insert(key.clone(), value.clone());
        }
    }
    job
}
