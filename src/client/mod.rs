//! The Rust client API: put jobs on the request queue from a Rust service, and await their
//! replies or, for commands that answer, the device's answer ([`answer`]). The CLI's `submit` is
//! built on it.
//!
//! ```no_run
//! # async fn example() -> Result<(), mqtt_connector::client::ClientError> {
//! use std::time::Duration;
//! use mqtt_connector::client::{Client, JobRequest};
//! use mqtt_connector::outcome::ExitCode;
//!
//! let client = Client::connect("amqp://guest:guest@127.0.0.1:5672/%2f").await?;
//! let job = JobRequest::new().connector("local").topic("a/b").content("hi").qos(1);
//! let reply = client.call(&job, Duration::from_secs(30)).await?;
//! if reply.exit_code != ExitCode::Published {
//!     eprintln!("job failed: {}", reply.message);
//! }
//! let correlation_id = client.submit(&job).await?; // fire and forget
//! # let _ = correlation_id;
//! client.close().await;
//! # Ok(()) }
//! ```
//!
//! A command that answers: [`Client::request`] sends it as `"action": "request"` and returns the
//! device's [`Answer`] (an exit-code other than 0 is an error: [`ClientError::NoAnswer`] for 10,
//! [`ClientError::JobFailed`] for the others).
//!
//! ```no_run
//! # async fn example(client: &mqtt_connector::client::Client) -> Result<(), mqtt_connector::client::ClientError> {
//! use std::time::Duration;
//! use mqtt_connector::client::JobRequest;
//!
//! let job = JobRequest::new()
//!     .connector("local")
//!     .topic("meters/42/commands")
//!     .content(r#"{"read": "meter"}"#)
//!     .set("mqtt-version", 5)
//!     .response_topic("meters/42/answers/{correlation-id}")
//!     .timeout(Duration::from_secs(5));
//! let answer = client.request(&job, Duration::from_secs(15)).await?;
//! println!("the meter said {:?}", answer.payload.as_str());
//! # Ok(()) }
//! ```
//!
//! `connect` takes the same URL list and TLS options as the worker and uses the first node that
//! answers; a client whose connection is lost reports errors and does not reconnect (connect a
//! new one). Replies come over RabbitMQ's direct reply-to, so `call` needs no reply queue.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Confirmation, Connection};
use serde::ser::SerializeMap;
use tokio::sync::oneshot;

use crate::amqp::nodes::{AllNodesFailed, Nodes, NodesError};
use crate::amqp::queue::{self, QueueError, QueueSettings};
use crate::amqp::replier::DIRECT_REPLY_TO;
use crate::amqp::tls::TlsFiles;
use crate::amqp::{DEFAULT_QUEUE, consumer};
use crate::job_args::{self, JobArgsError};
use crate::outcome::ExitCode;

mod answer;

pub use answer::{Answer, Payload};

/// Why a job could not be submitted, or its reply not received.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(transparent)]
    Nodes(#[from] NodesError),
    #[error(transparent)]
    Connect(#[from] AllNodesFailed),
    #[error(transparent)]
    Queue(#[from] QueueError),
    #[error("RabbitMQ refused to {step}")]
    Amqp {
        step: &'static str,
        #[source]
        source: lapin::Error,
    },
    #[error("RabbitMQ did not {step} within {after:?}")]
    Timeout { step: &'static str, after: Duration },
    #[error("RabbitMQ did not accept the job (nack, or no queue {queue})")]
    NotAccepted { queue: String },
    #[error("no reply within {0:?}: is a worker consuming the queue?")]
    NoReply(Duration),
    #[error(
        "RabbitMQ did not confirm the job within {0:?} (a memory or disk alarm blocks publishers?)"
    )]
    NotConfirmed(Duration),
    #[error("the reply could not be read")]
    BadReply(#[from] ReplyError),
    #[error("the connection to RabbitMQ is gone; connect a new client")]
    Disconnected,
    /// A `request` published and acknowledged, but no usable answer in time (exit-code 10).
    #[error("no answer (exit-code 10): {}", .0.message)]
    NoAnswer(Box<Reply>),
    /// A `request` that ended with another exit-code than 0 or 10.
    #[error("the request failed with exit-code {}: {}", .0.exit_code.code(), .0.message)]
    JobFailed(Box<Reply>),
}

/// A reply body that does not keep to the contract.
#[derive(Debug, thiserror::Error)]
pub enum ReplyError {
    #[error("the reply is not a JSON object")]
    NotJson(#[source] serde_json::Error),
    #[error("the reply has no {0}")]
    Missing(&'static str),
    #[error("the reply's exit-code {0} is not one this client knows")]
    UnknownExitCode(u64),
    #[error("the reply's response is not an answer object")]
    BadResponse(#[source] serde_json::Error),
    #[error("the reply's response has a bad {0}")]
    BadContent(&'static str),
}

/// A job to submit: the job keys as a JSON object. Typed setters for the common keys, and
/// [`JobRequest::set`] for any key (new keys need no new client).
#[derive(Clone, Default, PartialEq)]
pub struct JobRequest(serde_json::Map<String, serde_json::Value>);

/// Keys whose values are never printed.
const SECRET_KEYS: [&str; 2] = ["password", "private-key"];

/// The password stays out of debug output.
impl std::fmt::Debug for JobRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut map = f.debug_map();
        for (key, value) in &self.0 {
            if SECRET_KEYS.contains(&key.as_str()) {
                map.entry(key, &"***");
            } else {
                map.entry(key, value);
            }
        }
        map.finish()
    }
}

impl JobRequest {
    pub fn new() -> Self {
        Self::default()
    }

    /// From `--connector` and `--set KEY=VALUE` arguments (values typed by key).
    pub fn from_args(connector: Option<&str>, sets: &[String]) -> Result<Self, JobArgsError> {
        job_args::job_object(connector, sets).map(Self)
    }

    /// Sets any job key; a later value replaces an earlier one.
    pub fn set(mut self, key: impl Into<String>, value: impl Into<serde_json::Value>) -> Self {
        self.0.insert(key.into(), value.into());
        self
    }

    /// The value of `key`, if set.
    pub fn get(&self, key: &str) -> Option<&serde_json::Value> {
        self.0.get(key)
    }

    pub fn connector(self, name: impl Into<String>) -> Self {
        self.set("connector", name.into())
    }

    pub fn broker(self, broker: impl Into<String>) -> Self {
        self.set("broker", broker.into())
    }

    pub fn client_id(self, client_id: impl Into<String>) -> Self {
        self.set("client-id", client_id.into())
    }

    pub fn topic(self, topic: impl Into<String>) -> Self {
        self.set("topic", topic.into())
    }

    pub fn content(self, content: impl Into<String>) -> Self {
        self.set("content", content.into())
    }

    pub fn qos(self, qos: u8) -> Self {
        self.set("qos", qos)
    }

    pub fn retain(self, retain: bool) -> Self {
        self.set("retain", retain)
    }

    pub fn username(self, username: impl Into<String>) -> Self {
        self.set("username", username.into())
    }

    pub fn password(self, password: impl Into<String>) -> Self {
        self.set("password", password.into())
    }

    /// The topic the device answers on (`{correlation-id}` stands for the job's id); needed by
    /// [`Client::request`].
    pub fn response_topic(self, topic: impl Into<String>) -> Self {
        self.set("response-topic", topic.into())
    }

    /// The job's whole timeout, retries included (sent in milliseconds).
    pub fn timeout(self, timeout: Duration) -> Self {
        let millis = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
        self.set("timeout", millis)
    }

    /// The job body.
    pub fn to_body(&self) -> Vec<u8> {
        serde_json::Value::Object(self.0.clone())
            .to_string()
            .into_bytes()
    }
}

/// A worker's reply: the exit-code as an enum, the message, and whatever else the worker added
/// (`attempts`, `duration-ms`, …).
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    pub exit_code: ExitCode,
    pub message: String,
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl Reply {
    /// Reads a reply body.
    pub fn parse(body: &[u8]) -> Result<Reply, ReplyError> {
        let mut object: serde_json::Map<String, serde_json::Value> =
            serde_json::from_slice(body).map_err(ReplyError::NotJson)?;
        let code = object
            .remove("exit-code")
            .and_then(|code| code.as_u64())
            .ok_or(ReplyError::Missing("exit-code"))?;
        let exit_code = u8::try_from(code)
            .ok()
            .and_then(ExitCode::from_code)
            .ok_or(ReplyError::UnknownExitCode(code))?;
        let message = match object.remove("message") {
            Some(serde_json::Value::String(message)) => message,
            _ => return Err(ReplyError::Missing("message")),
        };
        Ok(Reply {
            exit_code,
            message,
            extra: object,
        })
    }

    /// Published and acknowledged by the broker.
    pub fn is_success(&self) -> bool {
        self.exit_code == ExitCode::Published
    }

    /// The reply as JSON text, `exit-code` and `message` first.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

impl serde::Serialize for Reply {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(2 + self.extra.len()))?;
        map.serialize_entry("exit-code", &self.exit_code.code())?;
        map.serialize_entry("message", &self.message)?;
        for (key, value) in &self.extra {
            map.serialize_entry(key, value)?;
        }
        map.end()
    }
}

/// How a client connects and which queue it submits to.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// TLS files for `amqps://` URLs.
    pub tls: TlsFiles,
    /// The request queue, declared with these settings if it is missing (as the worker would).
    pub queue: QueueSettings,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            tls: TlsFiles::default(),
            queue: QueueSettings::classic(DEFAULT_QUEUE),
        }
    }
}

/// Bounds each setup step, so a RabbitMQ that never answers cannot hang a client.
const SETUP_TIMEOUT: Duration = Duration::from_secs(10);

async fn bounded<T>(
    step: &'static str,
    future: impl Future<Output = lapin::Result<T>>,
) -> Result<T, ClientError> {
    match tokio::time::timeout(SETUP_TIMEOUT, future).await {
        Ok(result) => result.map_err(|source| ClientError::Amqp { step, source }),
        Err(_) => Err(ClientError::Timeout {
            step,
            after: SETUP_TIMEOUT,
        }),
    }
}

/// How long [`Client::submit`] waits for RabbitMQ's confirm.
pub const SUBMIT_TIMEOUT: Duration = Duration::from_secs(30);

type Waiting = Arc<Mutex<HashMap<String, oneshot::Sender<Result<Reply, ReplyError>>>>>;

/// A connection to RabbitMQ for submitting jobs. Cheap to share (`&self` methods, usable from
/// many tasks at once); [`Client::close`] it when done.
pub struct Client {
    connection: Connection,
    channel: Channel,
    queue: String,
    waiting: Waiting,
    replies: tokio::task::JoinHandle<()>,
}

impl Client {
    /// Connects to the first node of `urls` (one URL or a comma-separated list) that answers,
    /// with the default queue.
    pub async fn connect(urls: &str) -> Result<Client, ClientError> {
        Self::connect_with(urls, ClientOptions::default()).await
    }

    /// [`Client::connect`] with TLS files and a queue of your own.
    pub async fn connect_with(urls: &str, options: ClientOptions) -> Result<Client, ClientError> {
        options.queue.validate()?;
        let (urls, tls) = (urls.to_owned(), options.tls.clone());
        // Certificate files are read off the runtime threads.
        let nodes = match tokio::task::spawn_blocking(move || Nodes::parse(&urls, &tls)).await {
            Ok(parsed) => parsed?,
            Err(join) => std::panic::resume_unwind(join.into_panic()),
        };
        let (connection, _) = nodes
            .with_connection_name("mqtt-connector client")
            .connect(0)
            .await?;
        match Self::open(&connection, &options.queue).await {
            Ok((channel, waiting, replies)) => Ok(Client {
                connection,
                channel,
                queue: options.queue.name,
                waiting,
                replies,
            }),
            Err(err) => {
                consumer::close(&connection, "client setup failed").await;
                Err(err)
            }
        }
    }

    async fn open(
        connection: &Connection,
        queue: &QueueSettings,
    ) -> Result<(Channel, Waiting, tokio::task::JoinHandle<()>), ClientError> {
        queue::ensure(connection, queue).await?;
        let channel = bounded("open a channel", connection.create_channel()).await?;
        bounded(
            "enable publisher confirms",
            channel.confirm_select(ConfirmSelectOptions::default()),
        )
        .await?;
        // Direct reply-to: the consumer must exist, on the publishing channel, before a job
        // asking for a reply is published.
        let options = BasicConsumeOptions {
            no_ack: true,
            ..BasicConsumeOptions::default()
        };
        let mut replies = bounded(
            "consume direct reply-to",
            channel.basic_consume(
                DIRECT_REPLY_TO.into(),
                "".into(),
                options,
                FieldTable::default(),
            ),
        )
        .await?;
        let waiting: Waiting = Arc::default();
        let dispatch = Arc::clone(&waiting);
        let task = tokio::spawn(async move {
            while let Some(Ok(delivery)) = replies.next().await {
                let Some(id) = delivery.properties.correlation_id().as_ref() else {
                    continue;
                };
                let waiter = lock(&dispatch).remove(id.as_str());
                if let Some(waiter) = waiter {
                    let _ = waiter.send(Reply::parse(&delivery.data));
                }
            }
            // The consumer is gone: every caller still waiting learns it now.
            lock(&dispatch).clear();
        });
        Ok((channel, waiting, task))
    }

    /// Puts `job` on the queue (persistent, confirmed by RabbitMQ) without asking for a reply;
    /// returns its correlation id.
    /// Waits at most [`SUBMIT_TIMEOUT`] for RabbitMQ's confirm.
    pub async fn submit(&self, job: &JobRequest) -> Result<String, ClientError> {
        let correlation_id = uuid::Uuid::new_v4().to_string();
        tokio::time::timeout(SUBMIT_TIMEOUT, self.publish(job, &correlation_id, None))
            .await
            .map_err(|_| ClientError::NotConfirmed(SUBMIT_TIMEOUT))??;
        Ok(correlation_id)
    }

    /// Puts `job` on the queue and waits up to `timeout` for its reply: `timeout` bounds the
    /// whole call, publishing included (a RabbitMQ alarm that blocks the connection holds the
    /// publish; the call still returns [`ClientError::NoReply`] in time).
    pub async fn call(&self, job: &JobRequest, timeout: Duration) -> Result<Reply, ClientError> {
        let correlation_id = uuid::Uuid::new_v4().to_string();
        let (sender, receiver) = oneshot::channel();
        if self.replies.is_finished() {
            return Err(ClientError::Disconnected);
        }
        lock(&self.waiting).insert(correlation_id.clone(), sender);
        let called = async {
            self.publish(job, &correlation_id, Some(DIRECT_REPLY_TO))
                .await?;
            match receiver.await {
                Ok(reply) => Ok(reply?),
                Err(_) => Err(ClientError::Disconnected),
            }
        };
        let result = tokio::time::timeout(timeout, called)
            .await
            .unwrap_or(Err(ClientError::NoReply(timeout)));
        if result.is_err() {
            lock(&self.waiting).remove(&correlation_id);
        }
        result
    }

    /// Sends `job` as a `request` (`"action": "request"`; it needs a `response-topic`, from the
    /// job or its connector) and returns the device's answer. `timeout` bounds the whole call as
    /// in [`Client::call`]; make it longer than the job's own `timeout`, which covers the wait
    /// for the answer. A reply with another exit-code than 0 is an error:
    /// [`ClientError::NoAnswer`] (10) or [`ClientError::JobFailed`], which hold the reply.
    pub async fn request(
        &self,
        job: &JobRequest,
        timeout: Duration,
    ) -> Result<Answer, ClientError> {
        let job = job.clone().set("action", "request");
        let reply = self.call(&job, timeout).await?;
        match reply.exit_code {
            ExitCode::Published => Ok(Answer::from_reply(reply)?),
            ExitCode::NoResponse => Err(ClientError::NoAnswer(Box::new(reply))),
            _ => Err(ClientError::JobFailed(Box::new(reply))),
        }
    }

    async fn publish(
        &self,
        job: &JobRequest,
        correlation_id: &str,
        reply_to: Option<&str>,
    ) -> Result<(), ClientError> {
        let mut properties = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_correlation_id(correlation_id.into())
            .with_delivery_mode(2);
        if let Some(reply_to) = reply_to {
            properties = properties.with_reply_to(reply_to.into());
        }
        // mandatory: a job for a queue that does not exist comes back instead of vanishing.
        let options = BasicPublishOptions {
            mandatory: true,
            ..BasicPublishOptions::default()
        };
        let amqp = |source| ClientError::Amqp {
            step: "publish the job",
            source,
        };
        let confirm = self
            .channel
            .basic_publish(
                "".into(),
                self.queue.as_str().into(),
                options,
                &job.to_body(),
                properties,
            )
            .await
            .map_err(amqp)?
            .await
            .map_err(amqp)?;
        match confirm {
            Confirmation::Ack(None) | Confirmation::NotRequested => Ok(()),
            Confirmation::Ack(Some(_)) | Confirmation::Nack(_) => Err(ClientError::NotAccepted {
                queue: self.queue.clone(),
            }),
        }
    }

    /// Closes the connection.
    pub async fn close(self) {
        // The channel first: lapin closing it by itself during the connection's close logs an
        // ERROR.
        consumer::close_channel(&self.channel).await;
        consumer::close(&self.connection, "client done").await;
        self.replies.abort();
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding the map leaves it usable: entries are only inserted and removed.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_builder_writes_the_job_keys() {
        let job = JobRequest::new()
            .connector("local")
            .topic("a/b")
            .content("hi")
            .qos(1)
            .timeout(Duration::from_secs(2))
            .set("mqtt-version", "5")
            .set("user-properties", serde_json::json!({"a": "b"}));
        let body: serde_json::Value = serde_json::from_slice(&job.to_body()).expect("json");
        assert_eq!(
            body,
            serde_json::json!({"connector": "local", "topic": "a/b", "content": "hi", "qos": 1,
                "timeout": 2000, "mqtt-version": "5", "user-properties": {"a": "b"}})
        );
    }

    #[test]
    fn debug_hides_the_password() {
        let job = JobRequest::new().username("u").password("hunter2");
        let text = format!("{job:?}");
        assert!(!text.contains("hunter2") && text.contains("***"), "{text}");
    }

    #[test]
    fn a_reply_is_typed_and_keeps_its_extra_keys() {
        let reply = Reply::parse(
            br#"{"exit-code": 6, "message": "timeout", "attempts": 3, "duration-ms": 10}"#,
        )
        .expect("reply");
        assert_eq!(reply.exit_code, ExitCode::Timeout);
        assert_eq!(reply.message, "timeout");
        assert_eq!(reply.extra["attempts"], 3);
        assert!(
            reply
                .to_json()
                .starts_with(r#"{"exit-code":6,"message":"timeout""#)
        );
    }

    #[test]
    fn a_reply_without_the_contract_keys_is_an_error() {
        assert!(matches!(
            Reply::parse(br#"{"message": "x"}"#),
            Err(ReplyError::Missing("exit-code"))
        ));
        assert!(matches!(
            Reply::parse(br#"{"exit-code": 200, "message": "x"}"#),
            Err(ReplyError::UnknownExitCode(200))
        ));
        assert!(matches!(
            Reply::parse(b"not json"),
            Err(ReplyError::NotJson(_))
        ));
    }
}
