//! Load generation: publishes jobs to a request queue (closed loop: N outstanding; open loop: a
//! fixed rate) and books each reply by its correlation id `TAG.SEQ` (one book per scenario).

use std::sync::atomic::{AtomicU8, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use tokio::sync::Semaphore;

use crate::mosquitto::parse_tag_seq;
use crate::now_ns;
use crate::procfs::proc_sample;

/// The book of one scenario: who was sent when, who was answered when and how.
pub struct Book {
    pub n: usize,
    pub sent_ns: Vec<AtomicU64>,
    pub reply_ns: Vec<AtomicU64>,
    pub replies: Vec<AtomicU32>,
    pub exit: Vec<AtomicU8>,
    pub answered: AtomicUsize,
    pub last_reply_ns: AtomicU64,
    pub retried: AtomicUsize,
    pub qos_mismatch: AtomicUsize,
    pub expected_qos: Option<u8>,
    pub permits: Semaphore,
    pub first_error: Mutex<Option<String>>,
}

pub const NO_EXIT: u8 = u8::MAX;

impl Book {
    pub fn new(n: usize, expected_qos: Option<u8>) -> Book {
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

    pub fn record(&self, seq: usize, at_ns: u64, body: &[u8]) {
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

    pub fn note_error(&self, message: String) {
        let mut first = self.first_error.lock().expect("book lock");
        if first.is_none() {
            *first = Some(message);
        }
    }
}

pub struct LoadGen {
    pub _connection: Connection,
    pub channel: Channel,
    pub reply_queue: String,
    pub books: Arc<RwLock<Vec<Arc<Book>>>>,
    pub stray: Arc<AtomicU64>,
    pub persistent: bool,
}

impl LoadGen {
    pub async fn connect(url: &str, persistent: bool) -> LoadGen {
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

    pub async fn declare_queue(&self, name: &str) {
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

    pub async fn delete_queue(&self, name: &str) {
        let _ = self
            .channel
            .queue_delete(name.into(), QueueDeleteOptions::default())
            .await;
    }

    pub fn new_book(&self, n: usize, expected_qos: Option<u8>) -> (u32, Arc<Book>) {
        let book = Arc::new(Book::new(n, expected_qos));
        let mut books = self.books.write().expect("books lock");
        books.push(book.clone());
        (
            u32::try_from(books.len() - 1).expect("fewer than 2^32 scenarios"),
            book,
        )
    }

    /// Hands one job to lapin in its own task, so a slow write never holds the schedule back.
    pub fn publish(&self, queue: &str, tag: u32, seq: usize, book: &Arc<Book>, body: Vec<u8>) {
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
pub enum Load {
    /// Keep this many jobs outstanding.
    Closed(usize),
    /// This many jobs per second, whatever the replies do.
    Open(f64),
}

/// What each job's body looks like.
#[derive(Clone, Copy, Debug)]
pub enum Shape {
    /// The echo server does not read the body.
    Echo,
    Worker {
        qos: u8,
        /// Spread over this many client-ids (`client-id` set per job).
        clients: Option<usize>,
        /// Spread over this many connectors, one per broker listener.
        brokers: Option<usize>,
        /// Through the `bench5` connector: MQTT 5 instead of 3.1.1.
        v5: bool,
    },
    /// `"action": "request"` through the `bench5` connector (MQTT 5, QoS 1): the bench's device
    /// answers each command on one shared response topic, matched by Correlation Data.
    Request,
}

pub fn job_body(shape: Shape, run: &str, tag: u32, seq: usize) -> Vec<u8> {
    match shape {
        Shape::Echo => format!(r#"{{"content":"{tag}.{seq}"}}"#).into_bytes(),
        Shape::Request => format!(
            r#"{{"action":"request","connector":"bench5","topic":"bench/{run}/{tag}","qos":1,"content":"{tag}.{seq}","response-topic":"bench-answers/{run}"}}"#
        )
        .into_bytes(),
        Shape::Worker {
            qos,
            clients,
            brokers,
            v5,
        } => {
            let connector = match (brokers, v5) {
                (Some(n), _) => format!("b{:02}", seq % n),
                (None, true) => "bench5".to_owned(),
                (None, false) => "bench".to_owned(),
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
pub struct Measured {
    pub book: Arc<Book>,
    pub tag: u32,
    pub elapsed_s: f64,
    pub publish_lag_p99_ms: f64,
    pub rss_samples_kib: Vec<u64>,
}

/// A plain QoS 1 job to one broker: what the worker and a peer first answer.
pub const QOS1: Shape = Shape::Worker {
    qos: 1,
    clients: None,
    brokers: None,
    v5: false,
};

/// Whether the process consuming `queue` answers one QoS 1 job within 30 s (its readiness).
pub async fn answers_one_job(loadgen: &LoadGen, queue: &str, run: &str) -> bool {
    let one = Duration::from_secs(30);
    let measured = drive(loadgen, queue, 1, Load::Closed(1), QOS1, run, one, None).await;
    measured.book.answered.load(Ordering::Acquire) == 1
}

/// Drives `n` jobs into `queue` and waits for their replies (or a stall).
#[allow(clippy::too_many_arguments)]
pub async fn drive(
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
        Shape::Echo | Shape::Request => None,
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
pub fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}
