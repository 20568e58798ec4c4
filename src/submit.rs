//! The client side of the queue, for `submit` and `send`: build a job body from
//! `--connector` and `--set KEY=VALUE`, put it on the request queue, optionally wait for the reply
//! on RabbitMQ's direct reply-to.

use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Confirmation, Connection, ConnectionProperties};

use crate::amqp::consumer::{SessionError, declare_queue};
use crate::amqp::replier::DIRECT_REPLY_TO;

/// Builds a job body. Values are typed by key: `qos` and `timeout` numbers, `retain` and
/// `use-certificate` booleans, `alpn` a list when it holds commas; everything else a string.
pub fn job_body(connector: Option<&str>, sets: &[String]) -> Result<Vec<u8>, String> {
    let mut job = serde_json::Map::new();
    if let Some(name) = connector {
        job.insert("connector".into(), name.into());
    }
    for set in sets {
        let (key, value) = set
            .split_once('=')
            .ok_or_else(|| format!("--set {set:?}: expected KEY=VALUE"))?;
        job.insert(key.to_owned(), typed_value(key, value));
    }
    serde_json::to_vec(&job).map_err(|err| err.to_string())
}

fn typed_value(key: &str, value: &str) -> serde_json::Value {
    let parsed = match key {
        "qos" | "timeout" | "message-expiry" => {
            value.parse::<u64>().ok().map(serde_json::Value::from)
        }
        "mqtt-version" => value.parse::<u64>().ok().map(serde_json::Value::from),
        // An object or a list of [name, value] pairs, written as JSON; sent as pairs, because
        // the job's JSON object would not keep an object's order.
        "user-properties" => serde_json::from_str::<crate::job::UserProperties>(value)
            .ok()
            .map(|pairs| {
                let list: Vec<[String; 2]> = pairs.0.into_iter().map(|(n, v)| [n, v]).collect();
                serde_json::Value::from(list)
            }),
        "retain" | "use-certificate" => value.parse::<bool>().ok().map(serde_json::Value::from),
        "alpn" if value.contains(',') => {
            Some(value.split(',').map(str::trim).collect::<Vec<_>>().into())
        }
        _ => None,
    };
    // A value of the wrong shape is sent as a string: the worker's error will name the key.
    parsed.unwrap_or_else(|| value.into())
}

/// Why a job could not be submitted or its reply not received.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error(transparent)]
    Session(#[from] SessionError),
    #[error("RabbitMQ: {0}")]
    Amqp(#[from] lapin::Error),
    #[error("RabbitMQ did not accept the job (nack or unroutable)")]
    NotAccepted,
    #[error("no reply within {0:?}: is a worker consuming the queue?")]
    NoReply(Duration),
}

/// Puts one job on `queue` (declared durable if missing), persistent, and returns its correlation
/// id. With `wait`, waits that long for the reply and returns its body too.
pub async fn submit(
    amqp_url: &str,
    queue: &str,
    body: &[u8],
    wait: Option<Duration>,
) -> Result<(String, Option<Vec<u8>>), SubmitError> {
    let connection = Connection::connect(amqp_url, ConnectionProperties::default()).await?;
    declare_queue(&connection, queue).await?;
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let correlation_id = uuid::Uuid::new_v4().to_string();
    let mut properties = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_correlation_id(correlation_id.as_str().into())
        .with_delivery_mode(2);
    // Direct reply-to: the consumer must exist before the job is published.
    let mut replies = match wait {
        Some(_) => {
            properties = properties.with_reply_to(DIRECT_REPLY_TO.into());
            let options = BasicConsumeOptions {
                no_ack: true,
                ..BasicConsumeOptions::default()
            };
            Some(
                channel
                    .basic_consume(
                        DIRECT_REPLY_TO.into(),
                        "".into(),
                        options,
                        FieldTable::default(),
                    )
                    .await?,
            )
        }
        None => None,
    };
    let options = BasicPublishOptions {
        mandatory: true,
        ..BasicPublishOptions::default()
    };
    let confirm = channel
        .basic_publish("".into(), queue.into(), options, body, properties)
        .await?
        .await?;
    if !matches!(confirm, Confirmation::Ack(None)) {
        return Err(SubmitError::NotAccepted);
    }
    let reply = match (wait, replies.as_mut()) {
        (Some(limit), Some(replies)) => {
            let waited = tokio::time::timeout(limit, async {
                while let Some(delivery) = replies.next().await {
                    let delivery = delivery?;
                    let id = delivery
                        .properties
                        .correlation_id()
                        .as_ref()
                        .map(|id| id.as_str());
                    if id == Some(correlation_id.as_str()) {
                        return Ok(Some(delivery.data));
                    }
                }
                Ok::<_, SubmitError>(None)
            })
            .await
            .map_err(|_| SubmitError::NoReply(limit))??;
            Some(waited.ok_or(SubmitError::NoReply(limit))?)
        }
        _ => None,
    };
    let _ = connection.close(200, "done".into()).await;
    Ok((correlation_id, reply))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_values_are_typed_by_key() {
        let body = job_body(
            Some("local"),
            &[
                "qos=1".into(),
                "retain=true".into(),
                "content=123".into(),
                "alpn=a,b".into(),
            ],
        )
        .expect("body");
        let json: serde_json::Value = serde_json::from_slice(&body).expect("json");
        assert_eq!(json["connector"], "local");
        assert_eq!(json["qos"], 1);
        assert_eq!(json["retain"], true);
        assert_eq!(json["content"], "123");
        assert_eq!(json["alpn"], serde_json::json!(["a", "b"]));
    }

    #[test]
    fn a_set_without_equals_is_refused() {
        assert!(job_body(None, &["qos".into()]).is_err());
    }
}
