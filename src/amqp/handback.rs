//! A job handed back to its queue for another worker: published again as a new message (same
//! body and properties) and confirmed by RabbitMQ before the original delivery is acked. Unlike
//! a nack with requeue, this does not count as a delivery against a quorum queue's delivery
//! limit, so a job passed between workers is never dead-lettered for it. The job carries when
//! a worker first took it and how often it was handed back ([`FIRST_TAKEN_HEADER`],
//! [`HANDBACKS_HEADER`]), so its timeout counts from the first taking, whoever takes it next.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use lapin::BasicProperties;
use lapin::message::Delivery;
use lapin::types::{AMQPValue, FieldTable, ShortString};

use super::confirms::{Published, Publisher};
use crate::pipeline::Taken;

/// When a worker first took the job, in milliseconds since the Unix epoch.
pub const FIRST_TAKEN_HEADER: &str = "x-mqtt-connector-first-taken";
/// How often the job was handed back so far.
pub const HANDBACKS_HEADER: &str = "x-mqtt-connector-handbacks";

/// How long RabbitMQ may take to confirm a job handed back.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(10);

/// What a delivery's headers say about its first taking; a job without them (or with values
/// that make no sense: negative, in the future) is taken for the first time `now`.
pub fn taken(headers: Option<&FieldTable>, now: SystemTime) -> Taken {
    let field = |key: &str| {
        headers
            .and_then(|headers| headers.inner().get(key))
            .and_then(integer)
    };
    let first_taken = field(FIRST_TAKEN_HEADER)
        .and_then(|millis| u64::try_from(millis).ok())
        .and_then(|millis| UNIX_EPOCH.checked_add(Duration::from_millis(millis)))
        .filter(|first| *first <= now);
    match first_taken {
        Some(first_taken) => Taken {
            first_taken,
            handbacks: field(HANDBACKS_HEADER)
                .and_then(|count| u32::try_from(count).ok())
                .unwrap_or(0),
            expires_at: None,
            orphaned: false,
        },
        None => Taken {
            first_taken: now,
            handbacks: 0,
            expires_at: None,
            orphaned: false,
        },
    }
}

/// An AMQP integer of any width (clients and RabbitMQ differ in which they write).
fn integer(value: &AMQPValue) -> Option<i64> {
    match *value {
        AMQPValue::ShortShortInt(v) => Some(i64::from(v)),
        AMQPValue::ShortShortUInt(v) => Some(i64::from(v)),
        AMQPValue::ShortInt(v) => Some(i64::from(v)),
        AMQPValue::ShortUInt(v) => Some(i64::from(v)),
        AMQPValue::LongInt(v) => Some(i64::from(v)),
        AMQPValue::LongUInt(v) => Some(i64::from(v)),
        AMQPValue::LongLongInt(v) => Some(v),
        AMQPValue::Timestamp(v) => i64::try_from(v).ok(),
        _ => None,
    }
}

/// The headers of a job handed back: its own, plus its first taking and one more hand-back.
pub fn handed_back_headers(own: Option<&FieldTable>, taken: Taken) -> FieldTable {
    let mut headers = own.cloned().unwrap_or_default();
    let millis = taken
        .first_taken
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| {
            i64::try_from(since.as_millis()).unwrap_or(i64::MAX)
        });
    headers.insert(
        ShortString::from(FIRST_TAKEN_HEADER),
        AMQPValue::LongLongInt(millis),
    );
    headers.insert(
        ShortString::from(HANDBACKS_HEADER),
        AMQPValue::LongLongInt(i64::from(taken.handbacks.saturating_add(1))),
    );
    headers
}

/// Where a job handed back goes.
#[derive(Debug, Clone, Copy)]
pub enum HandBackTo<'a> {
    /// The request queue, for whichever worker takes it next.
    Queue(&'a str),
    /// The worker holding its client-id, through `exchange` (see [`super::held`]).
    Holder { exchange: &'a str, key: &'a str },
}

/// The properties of a job handed back: its own, with [`handed_back_headers`]. A job routed
/// to a holder is also made persistent: it waits in a client-id's classic queue, which keeps
/// only persistent messages over a RabbitMQ node's restart, while the request queue it came
/// from may be a quorum queue, which keeps every message (a client's job without
/// `delivery_mode` would be lost there and not in the request queue).
fn handed_back_properties(
    own: &BasicProperties,
    to: HandBackTo<'_>,
    taken: Taken,
) -> BasicProperties {
    let headers = handed_back_headers(own.headers().as_ref(), taken);
    match to {
        HandBackTo::Queue(_) => own.clone().with_headers(headers),
        HandBackTo::Holder { key, .. } => own
            .clone()
            .with_headers(super::held::routed_headers(headers, key))
            .with_delivery_mode(PERSISTENT),
    }
}

/// AMQP's delivery mode of a persistent message.
const PERSISTENT: u8 = 2;

/// Publishes `delivery` again with [`handed_back_headers`] and waits (bounded) for the
/// confirm; `false` when RabbitMQ did not take it (the caller then requeues the original).
pub async fn hand_back(
    publisher: &Publisher,
    to: HandBackTo<'_>,
    delivery: &Delivery,
    taken: Taken,
) -> bool {
    let (exchange, routing_key) = match to {
        HandBackTo::Queue(queue) => ("", queue),
        HandBackTo::Holder { exchange, key } => (exchange, key),
    };
    let properties = handed_back_properties(&delivery.properties, to, taken);
    let published = publisher.publish_to(exchange, routing_key, true, &delivery.data, properties);
    match tokio::time::timeout(CONFIRM_TIMEOUT, published).await {
        Ok(Published::Acked) => true,
        Ok(Published::Returned | Published::Nacked) => false,
        Ok(Published::Failed(err)) => {
            tracing::debug!(error = ?err, "could not hand the job back to the queue");
            false
        }
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(millis: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(millis)
    }

    #[test]
    fn a_job_without_headers_is_taken_now_for_the_first_time() {
        let now = at(1_000_000);
        assert_eq!(
            taken(None, now),
            Taken {
                first_taken: now,
                handbacks: 0,
                expires_at: None,
                orphaned: false,
            }
        );
        assert_eq!(taken(Some(&FieldTable::default()), now).first_taken, now);
    }

    #[test]
    fn a_handed_back_job_keeps_its_first_taking_and_counts_one_more() {
        let first = Taken {
            first_taken: at(1_000_000),
            handbacks: 0,
            expires_at: None,
            orphaned: false,
        };
        let once = handed_back_headers(None, first);
        let read = taken(Some(&once), at(1_005_000));
        assert_eq!(
            read,
            Taken {
                first_taken: at(1_000_000),
                handbacks: 1,
                expires_at: None,
                orphaned: false,
            }
        );
        let twice = handed_back_headers(Some(&once), read);
        assert_eq!(taken(Some(&twice), at(1_009_000)).handbacks, 2);
        assert_eq!(
            taken(Some(&twice), at(1_009_000)).first_taken,
            at(1_000_000)
        );
    }

    #[test]
    fn headers_that_make_no_sense_count_as_a_first_taking() {
        let now = at(1_000_000);
        for value in [
            AMQPValue::LongLongInt(-5),
            AMQPValue::LongLongInt(2_000_000),
            AMQPValue::LongString("yesterday".into()),
            AMQPValue::LongLongInt(i64::MAX),
        ] {
            let mut headers = FieldTable::default();
            headers.insert(ShortString::from(FIRST_TAKEN_HEADER), value.clone());
            headers.insert(ShortString::from(HANDBACKS_HEADER), AMQPValue::LongInt(7));
            assert_eq!(
                taken(Some(&headers), now),
                Taken {
                    first_taken: now,
                    handbacks: 0,
                    expires_at: None,
                    orphaned: false,
                },
                "{value:?}"
            );
        }
    }

    #[test]
    fn a_job_routed_to_a_holder_is_persistent_and_one_for_the_queue_keeps_its_mode() {
        let holder = HandBackTo::Holder {
            exchange: "jobs.held",
            key: "k",
        };
        for own in [
            BasicProperties::default(),
            BasicProperties::default().with_delivery_mode(1),
            BasicProperties::default().with_delivery_mode(2),
        ] {
            let routed = handed_back_properties(&own, holder, Taken::now());
            assert_eq!(routed.delivery_mode(), &Some(PERSISTENT), "{own:?}");
            assert!(super::super::held::was_routed(routed.headers().as_ref()));
            let queued = handed_back_properties(&own, HandBackTo::Queue("jobs"), Taken::now());
            assert_eq!(queued.delivery_mode(), own.delivery_mode());
            assert!(!super::super::held::was_routed(queued.headers().as_ref()));
        }
    }

    #[test]
    fn a_job_keeps_its_own_headers_when_handed_back() {
        let mut own = FieldTable::default();
        own.insert(
            ShortString::from("trace"),
            AMQPValue::LongString("t1".into()),
        );
        let headers = handed_back_headers(Some(&own), Taken::now());
        assert!(headers.inner().contains_key("trace"));
        assert!(headers.inner().contains_key(FIRST_TAKEN_HEADER));
    }
}
