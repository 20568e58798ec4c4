//! Answers to requests on one connection, without IO: which jobs wait on which response topic,
//! which incoming message is whose answer (MQTT 5 Correlation Data, or for 3.1.1 the first
//! message on the topic), never a retained message, never one answer for two jobs, and when the
//! topic must be subscribed (first job waiting on it) or unsubscribed (last one gone).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::{OnceCell, oneshot};

/// A message that came in on a subscribed topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Incoming {
    pub topic: String,
    pub payload: Bytes,
    /// Delivered because of the subscription from the broker's retained store: never an answer.
    pub retain: bool,
    /// MQTT 5 Correlation Data.
    pub correlation: Option<Bytes>,
    /// MQTT 5 Content Type.
    pub content_type: Option<String>,
    /// MQTT 5 user properties, in order, repeats kept.
    pub user_properties: Vec<(String, String)>,
}

/// Which message answers a job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Matching {
    /// MQTT 5: the message that carries this Correlation Data.
    Correlation(Bytes),
    /// MQTT 3.1.1: the first message on the topic.
    First,
}

impl Matching {
    fn accepts(&self, incoming: &Incoming) -> bool {
        match self {
            Matching::Correlation(data) => incoming.correlation.as_ref() == Some(data),
            Matching::First => true,
        }
    }
}

/// How a topic's subscription went: shared by every job waiting on the topic, so one SUBSCRIBE
/// serves them all and each has its SUBACK before it publishes.
pub type Suback<E> = Arc<OnceCell<Result<(), E>>>;

/// What became of an incoming message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivered {
    /// Handed to the job it answers.
    Answered,
    /// A retained message: not an answer to anyone.
    Retained,
    /// No job waits for it (late, a stranger's, or a second answer).
    Unclaimed,
}

/// What a job's leaving means for its topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Released {
    /// The last job on the topic left: UNSUBSCRIBE it.
    Unsubscribe,
    /// Others still wait on it.
    Kept,
}

/// One job's place among those waiting on a topic.
pub struct Registered<E> {
    pub id: u64,
    /// Resolves with the job's answer; fails when the room is cleared (connection ended).
    pub answer: oneshot::Receiver<Incoming>,
    pub suback: Suback<E>,
}

struct Waiter {
    id: u64,
    matching: Matching,
    answer: oneshot::Sender<Incoming>,
}

struct Topic<E> {
    /// Jobs registered and not yet released (answered or not): the subscription's references.
    holders: usize,
    /// Jobs not yet answered, oldest first.
    waiters: Vec<Waiter>,
    suback: Suback<E>,
}

struct State<E> {
    topics: HashMap<String, Topic<E>>,
    next_id: u64,
}

/// The jobs waiting for answers on one connection. `E` is the subscribe error.
pub struct Responses<E> {
    state: Mutex<State<E>>,
}

impl<E> Default for Responses<E> {
    fn default() -> Self {
        Self {
            state: Mutex::new(State {
                topics: HashMap::new(),
                next_id: 0,
            }),
        }
    }
}

impl<E> Responses<E> {
    /// A job starts waiting on `topic`; the topic's subscription is shared (its `suback` cell
    /// is empty until someone subscribes).
    pub fn register(&self, topic: &str, matching: Matching) -> Registered<E> {
        let (tx, rx) = oneshot::channel();
        let mut state = self.lock();
        state.next_id += 1;
        let id = state.next_id;
        let entry = state
            .topics
            .entry(topic.to_owned())
            .or_insert_with(|| Topic {
                holders: 0,
                waiters: Vec::new(),
                suback: Arc::new(OnceCell::new()),
            });
        entry.holders += 1;
        entry.waiters.push(Waiter {
            id,
            matching,
            answer: tx,
        });
        Registered {
            id,
            answer: rx,
            suback: Arc::clone(&entry.suback),
        }
    }

    /// Hands an incoming message to the oldest job on its topic that it answers, at most one.
    pub fn deliver(&self, incoming: Incoming) -> Delivered {
        if incoming.retain {
            return Delivered::Retained;
        }
        let mut state = self.lock();
        let Some(topic) = state.topics.get_mut(&incoming.topic) else {
            return Delivered::Unclaimed;
        };
        let mut incoming = incoming;
        // A job that gave up may not have released yet: its closed channel passes the answer on.
        while let Some(at) = topic
            .waiters
            .iter()
            .position(|w| w.matching.accepts(&incoming))
        {
            let waiter = topic.waiters.remove(at);
            match waiter.answer.send(incoming) {
                Ok(()) => return Delivered::Answered,
                Err(back) => incoming = back,
            }
        }
        Delivered::Unclaimed
    }

    /// A job leaves (answered, timed out or dropped).
    pub fn release(&self, topic: &str, id: u64) -> Released {
        let mut state = self.lock();
        let Some(entry) = state.topics.get_mut(topic) else {
            return Released::Kept;
        };
        entry.waiters.retain(|w| w.id != id);
        // A job answered is no longer among the waiters but still holds the subscription.
        entry.holders = entry.holders.saturating_sub(1);
        if entry.holders == 0 {
            state.topics.remove(topic);
            Released::Unsubscribe
        } else {
            Released::Kept
        }
    }

    /// The connection ended: every job still waiting learns it (its answer channel closes);
    /// the subscriptions went with the connection.
    pub fn clear(&self) {
        let mut state = self.lock();
        for topic in state.topics.values_mut() {
            topic.waiters.clear();
        }
    }

    /// Jobs registered and not yet released.
    pub fn holders(&self) -> usize {
        self.lock().topics.values().map(|t| t.holders).sum()
    }

    /// Distinct topics with jobs on them (what is subscribed).
    pub fn topics(&self) -> usize {
        self.lock().topics.len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State<E>> {
        // A panic while holding this lock leaves consistent data (no half-done update).
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Room = Responses<u8>;

    fn message(topic: &str, payload: &'static str, correlation: Option<&'static str>) -> Incoming {
        Incoming {
            topic: topic.into(),
            payload: Bytes::from_static(payload.as_bytes()),
            retain: false,
            correlation: correlation.map(|c| Bytes::from_static(c.as_bytes())),
            content_type: None,
            user_properties: Vec::new(),
        }
    }

    fn by(correlation: &'static str) -> Matching {
        Matching::Correlation(Bytes::from_static(correlation.as_bytes()))
    }

    #[test]
    fn a_message_with_the_jobs_correlation_data_is_its_answer() {
        let room = Room::default();
        let mut job = room.register("r/1", by("a"));
        assert_eq!(
            room.deliver(message("r/1", "yes", Some("a"))),
            Delivered::Answered
        );
        assert_eq!(job.answer.try_recv().expect("answer").payload, "yes");
    }

    #[test]
    fn a_message_with_other_correlation_data_is_not_the_jobs_answer() {
        let room = Room::default();
        let mut job = room.register("r/1", by("a"));
        assert_eq!(
            room.deliver(message("r/1", "wrong", Some("b"))),
            Delivered::Unclaimed
        );
        assert_eq!(
            room.deliver(message("r/1", "none", None)),
            Delivered::Unclaimed
        );
        assert!(job.answer.try_recv().is_err());
        room.deliver(message("r/1", "right", Some("a")));
        assert_eq!(job.answer.try_recv().expect("answer").payload, "right");
    }

    #[test]
    fn two_jobs_on_one_topic_answered_in_reverse_order_each_get_their_own() {
        let room = Room::default();
        let mut first = room.register("r/1", by("a"));
        let mut second = room.register("r/1", by("b"));
        room.deliver(message("r/1", "for b", Some("b")));
        room.deliver(message("r/1", "for a", Some("a")));
        assert_eq!(first.answer.try_recv().expect("a").payload, "for a");
        assert_eq!(second.answer.try_recv().expect("b").payload, "for b");
    }

    #[test]
    fn without_correlation_the_first_message_goes_to_the_oldest_job_and_only_to_it() {
        let room = Room::default();
        let mut first = room.register("r/1", Matching::First);
        let mut second = room.register("r/1", Matching::First);
        assert_eq!(
            room.deliver(message("r/1", "one", None)),
            Delivered::Answered
        );
        assert_eq!(first.answer.try_recv().expect("first").payload, "one");
        assert!(second.answer.try_recv().is_err());
        room.deliver(message("r/1", "two", None));
        assert_eq!(second.answer.try_recv().expect("second").payload, "two");
        assert_eq!(
            room.deliver(message("r/1", "three", None)),
            Delivered::Unclaimed
        );
    }

    #[test]
    fn a_retained_message_is_never_an_answer() {
        let room = Room::default();
        let mut job = room.register("r/1", Matching::First);
        let mut retained = message("r/1", "old", None);
        retained.retain = true;
        assert_eq!(room.deliver(retained), Delivered::Retained);
        assert!(job.answer.try_recv().is_err());
    }

    #[test]
    fn a_message_on_another_topic_is_not_the_jobs_answer() {
        let room = Room::default();
        let mut job = room.register("r/1", Matching::First);
        assert_eq!(
            room.deliver(message("r/2", "x", None)),
            Delivered::Unclaimed
        );
        assert!(job.answer.try_recv().is_err());
    }

    #[test]
    fn one_subscription_serves_every_job_on_a_topic_and_goes_with_the_last() {
        let room = Room::default();
        let a = room.register("r/1", Matching::First);
        let b = room.register("r/1", Matching::First);
        let other = room.register("r/2", Matching::First);
        assert!(Arc::ptr_eq(&a.suback, &b.suback));
        assert!(!Arc::ptr_eq(&a.suback, &other.suback));
        assert_eq!(room.topics(), 2);
        assert_eq!(room.release("r/1", a.id), Released::Kept);
        assert_eq!(room.release("r/1", b.id), Released::Unsubscribe);
        assert_eq!(room.release("r/2", other.id), Released::Unsubscribe);
        assert_eq!((room.topics(), room.holders()), (0, 0));
    }

    #[test]
    fn an_answered_job_holds_the_subscription_until_it_leaves() {
        let room = Room::default();
        let a = room.register("r/1", Matching::First);
        room.deliver(message("r/1", "x", None));
        assert_eq!(room.holders(), 1);
        assert_eq!(room.release("r/1", a.id), Released::Unsubscribe);
    }

    #[test]
    fn a_job_that_timed_out_releases_its_place_and_its_answer_goes_to_no_one_else() {
        let room = Room::default();
        let gone = room.register("r/1", by("a"));
        let mut stays = room.register("r/1", by("b"));
        assert_eq!(room.release("r/1", gone.id), Released::Kept);
        assert_eq!(
            room.deliver(message("r/1", "late", Some("a"))),
            Delivered::Unclaimed
        );
        assert!(stays.answer.try_recv().is_err());
    }

    #[test]
    fn an_answer_to_a_job_that_dropped_its_channel_goes_to_the_next_waiting_one() {
        let room = Room::default();
        let gone = room.register("r/1", Matching::First);
        let mut stays = room.register("r/1", Matching::First);
        drop(gone.answer);
        assert_eq!(room.deliver(message("r/1", "x", None)), Delivered::Answered);
        assert_eq!(stays.answer.try_recv().expect("answer").payload, "x");
    }

    #[test]
    fn a_new_job_after_the_last_left_subscribes_again() {
        let room = Room::default();
        let a = room.register("r/1", Matching::First);
        let _ = a.suback.set(Ok(()));
        room.release("r/1", a.id);
        let b = room.register("r/1", Matching::First);
        assert!(b.suback.get().is_none());
    }

    #[test]
    fn clearing_the_room_tells_every_waiting_job_its_connection_ended() {
        let room = Room::default();
        let mut a = room.register("r/1", Matching::First);
        room.clear();
        assert!(matches!(
            a.answer.try_recv(),
            Err(oneshot::error::TryRecvError::Closed)
        ));
        assert_eq!(room.release("r/1", a.id), Released::Unsubscribe);
    }
}
