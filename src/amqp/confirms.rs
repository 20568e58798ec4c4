//! Publishes on a session's one confirm-mode channel and tells each publish what became of it:
//! acked, returned (mandatory and routed nowhere), nacked, or failed.
//!
//! lapin does not match a `basic.return` to its publish: it hands the oldest waiting return to
//! whichever confirm it completes next (for a `multiple` ack, the first of the batch in hash
//! order), so `Confirmation::Ack(Some(_))` may belong to another publish, and a confirm dropped
//! unresolved takes its return with it; and two publishes racing in `basic_publish` can swap
//! delivery tags (CONTRIBUTING.md, "lapin: returns and confirms"). Here publishes are numbered
//! and queued under one lock, and a collector task per channel holds every pending confirm,
//! gathers the returns they carry and gives each to its owner by (routing key, correlation id),
//! oldest first on a tie.
//!
//! Why that is exact: lapin completes confirms in order in its I/O thread, and RabbitMQ sends a
//! return before the ack of its own publish, so publish Y's return rides on a confirm completed
//! at or before Y's. When the collector sees Y completed without a return, every such confirm
//! is completed already; Y is reported acked once every ticket taken before that sweep has been
//! registered and polled in a later sweep. A ticket is taken before `basic_publish`, so a
//! publish whose confirm is not yet registered cannot hide from that rule.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::pin::{Pin, pin};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use futures_util::stream::FuturesUnordered;
use futures_util::{FutureExt, StreamExt};
use lapin::message::BasicReturnMessage;
use lapin::options::BasicPublishOptions;
use lapin::types::ShortString;
use lapin::{BasicProperties, Channel, Confirmation};
use tokio::sync::{mpsc, oneshot};

/// Returns held for a publish not registered yet; more are dropped, oldest first.
const ORPHANS_MAX: usize = 1024;

/// What became of one publish.
#[derive(Debug)]
pub enum Published {
    /// RabbitMQ confirmed it and did not return it.
    Acked,
    /// RabbitMQ returned it: it was mandatory and no queue took it.
    Returned,
    /// RabbitMQ refused it (a nack).
    Nacked,
    /// No confirm will come: the channel failed (the error, when lapin gave one).
    Failed(Option<lapin::Error>),
}

/// Publishes on one channel in confirm mode; cheap to clone. The collector task ends when the
/// last clone is gone and every publish has been reported.
#[derive(Clone)]
pub struct Publisher {
    /// Behind an `Arc`: a lapin channel is a dozen `Arc`s, and a publisher is cloned per job.
    channel: Arc<Channel>,
    /// Held while lapin numbers a publish and queues its frames (see [`Publisher::publish`]).
    numbering: Arc<Mutex<()>>,
    issued: Arc<AtomicU64>,
    registrations: mpsc::UnboundedSender<Registration>,
}

impl Publisher {
    /// Starts the collector of `channel`'s confirms (a tokio task).
    pub fn start(channel: Channel) -> Self {
        let issued = Arc::new(AtomicU64::new(0));
        let (registrations, received) = mpsc::unbounded_channel();
        tokio::spawn(Collector::new(received, Arc::clone(&issued)));
        Self {
            channel: Arc::new(channel),
            numbering: Arc::new(Mutex::new(())),
            issued,
            registrations,
        }
    }

    /// Publishes `body` on the default exchange to `routing_key` and waits for what became of
    /// it. `mandatory`: a publish no queue takes comes back as [`Published::Returned`].
    /// Dropping the future is safe: a publish not yet handed to lapin goes on in a task of its
    /// own (see [`Sending`]).
    pub async fn publish(
        &self,
        routing_key: &str,
        mandatory: bool,
        body: &[u8],
        properties: BasicProperties,
    ) -> Published {
        self.publish_to("", routing_key, mandatory, body, properties)
            .await
    }

    /// [`Publisher::publish`] to `exchange`.
    pub async fn publish_to(
        &self,
        exchange: &str,
        routing_key: &str,
        mandatory: bool,
        body: &[u8],
        properties: BasicProperties,
    ) -> Published {
        let key = mandatory.then(|| Key::of(routing_key, &properties));
        let (report, reported) = oneshot::channel();
        let ticket = Ticket {
            number: self.issued.fetch_add(1, Ordering::SeqCst),
            registrations: Some(self.registrations.clone()),
        };
        let channel = Arc::clone(&self.channel);
        let numbering = Arc::clone(&self.numbering);
        let exchange = ShortString::from(exchange);
        let routing_key = ShortString::from(routing_key);
        let body = body.to_vec();
        let sending = Sending(Some(Box::pin(async move {
            let options = BasicPublishOptions {
                mandatory,
                ..BasicPublishOptions::default()
            };
            let mut publish =
                pin!(channel.basic_publish(exchange, routing_key, options, &body, properties));
            // lapin takes a publish's delivery tag, then queues its frames: two publishes
            // interleaving there go out in the other order than numbered, and each is confirmed
            // with the other's ack. Both steps run in the first poll, without I/O: only that
            // poll is done under the lock, the write and the confirm are not.
            let first = std::future::poll_fn(|cx| {
                let _numbering = numbering.lock().unwrap_or_else(PoisonError::into_inner);
                Poll::Ready(publish.as_mut().poll(cx))
            })
            .await;
            let published = match first {
                Poll::Ready(published) => published,
                Poll::Pending => publish.await,
            };
            match published {
                Ok(confirm) => ticket.register(Some(Pending {
                    key,
                    confirm: Box::pin(confirm.map(Completion::from)),
                    report,
                })),
                Err(err) => {
                    let _ = report.send(Published::Failed(Some(err)));
                    ticket.register(None);
                }
            }
        })));
        sending.await;
        reported.await.unwrap_or(Published::Failed(None))
    }
}

/// A publish on its way into lapin, run in its caller's task (no task of its own per publish:
/// that cost a wake-up per reply). If the caller goes away before lapin has the publish, the
/// rest runs in a task of its own: a publish cancelled half-way would drop its confirm inside
/// lapin, with any return it carries, and its ticket would never be accounted for right.
struct Sending(Option<Pin<Box<dyn Future<Output = ()> + Send>>>);

impl Future for Sending {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if let Some(sending) = self.0.as_mut() {
            if sending.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            self.0 = None;
        }
        Poll::Ready(())
    }
}

impl Drop for Sending {
    fn drop(&mut self) {
        if let (Some(sending), Ok(runtime)) = (self.0.take(), tokio::runtime::Handle::try_current())
        {
            runtime.spawn(sending);
        }
    }
}

/// What a return is matched on: where the publish went and its correlation id.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Key {
    routing_key: ShortString,
    correlation_id: Option<ShortString>,
}

impl Key {
    fn of(routing_key: &str, properties: &BasicProperties) -> Self {
        Self {
            routing_key: routing_key.into(),
            correlation_id: properties.correlation_id().clone(),
        }
    }

    fn returned(message: &BasicReturnMessage) -> Self {
        Self {
            routing_key: message.delivery.routing_key.clone(),
            correlation_id: message.delivery.properties.correlation_id().clone(),
        }
    }
}

/// A completed confirm: acked (`Ok(true)`), nacked (`Ok(false)`) or failed, and the key of the
/// return lapin attached to it, whoever's it is.
struct Completion {
    outcome: Result<bool, lapin::Error>,
    carried: Option<Key>,
}

impl From<lapin::Result<Confirmation>> for Completion {
    fn from(confirmation: lapin::Result<Confirmation>) -> Self {
        let (outcome, returned) = match confirmation {
            Ok(Confirmation::Ack(returned)) => (Ok(true), returned),
            Ok(Confirmation::Nack(returned)) => (Ok(false), returned),
            Ok(Confirmation::NotRequested) => (Ok(true), None),
            Err(err) => (Err(err), None),
        };
        Self {
            outcome,
            carried: returned.as_ref().map(Key::returned),
        }
    }
}

type Confirm = Pin<Box<dyn Future<Output = Completion> + Send>>;

/// A publish handed to the collector.
struct Pending {
    /// `None`: not mandatory, never returned.
    key: Option<Key>,
    confirm: Confirm,
    report: oneshot::Sender<Published>,
}

struct Registration {
    ticket: u64,
    /// `None`: the publish failed (or its task was dropped); only the ticket is accounted for.
    pending: Option<Pending>,
}

/// A ticket taken before `basic_publish`; registered as void if dropped unregistered.
struct Ticket {
    number: u64,
    registrations: Option<mpsc::UnboundedSender<Registration>>,
}

impl Ticket {
    fn register(mut self, pending: Option<Pending>) {
        if let Some(registrations) = self.registrations.take() {
            let _ = registrations.send(Registration {
                ticket: self.number,
                pending,
            });
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if let Some(registrations) = self.registrations.take() {
            let _ = registrations.send(Registration {
                ticket: self.number,
                pending: None,
            });
        }
    }
}

/// Which tickets were registered: all below `below`, and those in `above`.
#[derive(Default)]
struct Registered {
    below: u64,
    above: BTreeSet<u64>,
}

impl Registered {
    fn insert(&mut self, ticket: u64) {
        if ticket != self.below {
            self.above.insert(ticket);
            return;
        }
        self.below += 1;
        while self.above.remove(&self.below) {
            self.below += 1;
        }
    }
}

struct Entry {
    key: Option<Key>,
    completed: Option<Result<bool, lapin::Error>>,
    /// Its own return was found.
    returned: bool,
    /// Seen completed without a return by a sweep that had issued this many tickets.
    awaiting: Option<u64>,
    report: oneshot::Sender<Published>,
}

/// A return whose owner was not registered when it was found, and the tickets issued then (its
/// owner's is below: once all those are registered, it belongs to nobody waiting).
struct Orphan {
    key: Key,
    issued: u64,
}

/// A pending confirm and its publish's ticket.
struct Tagged {
    ticket: u64,
    confirm: Confirm,
}

impl Future for Tagged {
    type Output = (u64, Completion);

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<(u64, Completion)> {
        let ticket = self.ticket;
        self.confirm
            .as_mut()
            .poll(cx)
            .map(|completion| (ticket, completion))
    }
}

/// The task that holds every pending confirm of a channel (the only one polling them).
struct Collector {
    registrations: mpsc::UnboundedReceiver<Registration>,
    issued: Arc<AtomicU64>,
    registered: Registered,
    /// Every pending confirm. A sweep polls those woken since the last (lapin wakes a confirm
    /// as it completes it) and each newly registered one; polling all of them at every wake-up
    /// cost a tenth of a job's instructions with hundreds in flight.
    confirms: FuturesUnordered<Tagged>,
    /// By ticket: the oldest first, for ties.
    entries: BTreeMap<u64, Entry>,
    orphans: VecDeque<Orphan>,
    closed: bool,
}

impl Collector {
    fn new(registrations: mpsc::UnboundedReceiver<Registration>, issued: Arc<AtomicU64>) -> Self {
        Self {
            registrations,
            issued,
            registered: Registered::default(),
            confirms: FuturesUnordered::new(),
            entries: BTreeMap::new(),
            orphans: VecDeque::new(),
            closed: false,
        }
    }

    /// One pass: take registrations, poll every pending confirm, hand out the returns found,
    /// report what can be reported. `Ready` when no publisher is left and nothing is pending.
    fn sweep(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        while !self.closed {
            match self.registrations.poll_recv(cx) {
                Poll::Ready(Some(registration)) => self.register(registration),
                Poll::Ready(None) => self.closed = true,
                Poll::Pending => break,
            }
        }
        // Every ticket below this was registered before the polling below, so polled in it:
        // a confirm registered is polled in the next sweep, and one that lapin completed later
        // was woken, and so is polled, in the order lapin completed them.
        let polled_below = self.registered.below;
        let mut carried = Vec::new();
        while let Poll::Ready(Some((ticket, completion))) = self.confirms.poll_next_unpin(cx) {
            if let Some(entry) = self.entries.get_mut(&ticket) {
                entry.completed = Some(completion.outcome);
            }
            carried.extend(completion.carried);
        }
        // Read after the polling: every publish whose confirm completed before one seen above
        // took its ticket before this.
        let issued = self.issued.load(Ordering::SeqCst);
        for key in carried {
            self.give(key, issued);
        }
        self.orphans
            .retain(|orphan| orphan.issued > self.registered.below);
        let mut sweep_again = false;
        let mut done = Vec::new();
        for (ticket, entry) in &mut self.entries {
            let Some(outcome) = &entry.completed else {
                continue;
            };
            let published = match outcome {
                Err(_) => Published::Failed(None),
                _ if entry.returned => Published::Returned,
                Ok(acked)
                    if entry.key.is_none() || entry.awaiting.is_some_and(|t| t <= polled_below) =>
                {
                    if *acked {
                        Published::Acked
                    } else {
                        Published::Nacked
                    }
                }
                Ok(_) => {
                    if entry.awaiting.is_none() {
                        entry.awaiting = Some(issued);
                        sweep_again |= issued <= self.registered.below;
                    }
                    continue;
                }
            };
            done.push((*ticket, published));
        }
        for (ticket, published) in done {
            if let Some(mut entry) = self.entries.remove(&ticket) {
                let published = match (published, entry.completed.take()) {
                    (Published::Failed(_), Some(Err(err))) => Published::Failed(Some(err)),
                    (published, _) => published,
                };
                let _ = entry.report.send(published);
            }
        }
        if sweep_again {
            // What decides those now completed is already in lapin's hands: look again at once.
            cx.waker().wake_by_ref();
        }
        if self.closed && self.entries.is_empty() {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }

    fn register(&mut self, registration: Registration) {
        self.registered.insert(registration.ticket);
        let Some(pending) = registration.pending else {
            return;
        };
        // Only a publish numbered before the return was found can own it.
        let returned = pending.key.as_ref().is_some_and(|key| {
            let found = self
                .orphans
                .iter()
                .position(|orphan| orphan.key == *key && registration.ticket < orphan.issued);
            found.and_then(|at| self.orphans.remove(at)).is_some()
        });
        self.confirms.push(Tagged {
            ticket: registration.ticket,
            confirm: pending.confirm,
        });
        self.entries.insert(
            registration.ticket,
            Entry {
                key: pending.key,
                completed: None,
                returned,
                awaiting: None,
                report: pending.report,
            },
        );
    }

    /// Gives a return to the oldest registered publish with its key that has none yet; else
    /// keeps it for a publish not registered yet.
    fn give(&mut self, key: Key, issued: u64) {
        let owner = self
            .entries
            .values_mut()
            .find(|entry| !entry.returned && entry.key.as_ref() == Some(&key));
        match owner {
            Some(entry) => entry.returned = true,
            None => {
                if self.orphans.len() == ORPHANS_MAX {
                    self.orphans.pop_front();
                }
                self.orphans.push_back(Orphan { key, issued });
            }
        }
    }
}

impl Future for Collector {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        self.sweep(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::task::Waker;

    use super::*;

    /// A collector driven by hand, and publishes whose confirms the test completes.
    struct Bench {
        collector: Collector,
        registrations: mpsc::UnboundedSender<Registration>,
        issued: Arc<AtomicU64>,
    }

    /// One publish: its ticket, its confirm (completed by the test) and its report.
    struct Publish {
        ticket: Ticket,
        key: Option<Key>,
        complete: oneshot::Sender<Completion>,
        confirm: Option<Confirm>,
        reported: oneshot::Receiver<Published>,
        report: Option<oneshot::Sender<Published>>,
    }

    fn key(queue: &str, id: &str) -> Key {
        Key {
            routing_key: queue.into(),
            correlation_id: Some(id.into()),
        }
    }

    fn acked(carried: Option<Key>) -> Completion {
        Completion {
            outcome: Ok(true),
            carried,
        }
    }

    impl Bench {
        fn new() -> Self {
            let issued = Arc::new(AtomicU64::new(0));
            let (registrations, received) = mpsc::unbounded_channel();
            Self {
                collector: Collector::new(received, Arc::clone(&issued)),
                registrations,
                issued,
            }
        }

        /// Takes a ticket, as [`Publisher::publish`] does before `basic_publish`.
        fn publish(&self, key: Option<Key>) -> Publish {
            let ticket = Ticket {
                number: self.issued.fetch_add(1, Ordering::SeqCst),
                registrations: Some(self.registrations.clone()),
            };
            let (complete, completed) = oneshot::channel::<Completion>();
            let (report, reported) = oneshot::channel();
            let confirm: Confirm = Box::pin(async move {
                completed.await.unwrap_or(Completion {
                    outcome: Ok(false),
                    carried: None,
                })
            });
            Publish {
                ticket,
                key,
                complete,
                confirm: Some(confirm),
                reported,
                report: Some(report),
            }
        }

        fn sweep(&mut self) {
            let _ = self
                .collector
                .sweep(&mut Context::from_waker(Waker::noop()));
        }

        /// Sweeps twice: what one sweep saw completed is decided by the next.
        fn settle(&mut self) {
            self.sweep();
            self.sweep();
        }
    }

    impl Publish {
        /// Hands the confirm to the collector, as the publish task does after `basic_publish`.
        fn register(&mut self) -> &mut Self {
            let pending = Pending {
                key: self.key.clone(),
                confirm: self.confirm.take().expect("registered once"),
                report: self.report.take().expect("registered once"),
            };
            let ticket = std::mem::replace(
                &mut self.ticket,
                Ticket {
                    number: u64::MAX,
                    registrations: None,
                },
            );
            ticket.register(Some(pending));
            self
        }

        fn complete(self, completion: Completion) -> oneshot::Receiver<Published> {
            let _ = self.complete.send(completion);
            self.reported
        }
    }

    fn report(reported: &mut oneshot::Receiver<Published>) -> Option<Published> {
        reported.try_recv().ok()
    }

    #[test]
    fn a_return_carried_by_another_publishs_confirm_goes_to_its_owner() {
        let mut bench = Bench::new();
        let mut delivered = bench.publish(Some(key("exists", "a")));
        let mut lost = bench.publish(Some(key("deleted", "b")));
        delivered.register();
        lost.register();
        // lapin gives the deleted queue's return to the first confirm it completes.
        let mut delivered = delivered.complete(acked(Some(key("deleted", "b"))));
        let mut lost = lost.complete(acked(None));
        bench.settle();
        assert!(matches!(report(&mut delivered), Some(Published::Acked)));
        assert!(matches!(report(&mut lost), Some(Published::Returned)));
    }

    #[test]
    fn an_ack_waits_for_an_earlier_ticket_whose_confirm_may_hold_its_return() {
        let mut bench = Bench::new();
        let mut carrier = bench.publish(Some(key("exists", "a")));
        let mut lost = bench.publish(Some(key("deleted", "b")));
        lost.register();
        let mut lost_report = {
            let _ = lost.complete.send(acked(None));
            lost.reported
        };
        for _ in 0..3 {
            bench.sweep();
        }
        assert!(
            report(&mut lost_report).is_none(),
            "not acked while ticket 0 is unregistered"
        );
        carrier.register();
        let mut carrier = carrier.complete(acked(Some(key("deleted", "b"))));
        bench.settle();
        assert!(matches!(
            report(&mut lost_report),
            Some(Published::Returned)
        ));
        assert!(matches!(report(&mut carrier), Some(Published::Acked)));
    }

    #[test]
    fn a_return_found_before_its_owner_registers_waits_for_it() {
        let mut bench = Bench::new();
        let mut carrier = bench.publish(None);
        let mut lost = bench.publish(Some(key("deleted", "b")));
        carrier.register();
        let mut carrier = carrier.complete(acked(Some(key("deleted", "b"))));
        bench.settle();
        assert!(
            matches!(report(&mut carrier), Some(Published::Acked)),
            "not mandatory: never returned, reported at once"
        );
        lost.register();
        let mut lost = lost.complete(acked(None));
        bench.settle();
        assert!(matches!(report(&mut lost), Some(Published::Returned)));
    }

    #[test]
    fn a_return_found_before_a_publish_was_numbered_is_not_its() {
        let mut bench = Bench::new();
        let mut carrier = bench.publish(None);
        let blocker = bench.publish(Some(key("q", "other")));
        carrier.register();
        let _carrier = carrier.complete(acked(Some(key("gone", "b"))));
        bench.settle();
        // Numbered after the return was found: a later try of the same reply, say.
        let mut later = bench.publish(Some(key("gone", "b")));
        later.register();
        let mut later = later.complete(acked(None));
        drop(blocker);
        bench.settle();
        assert!(matches!(report(&mut later), Some(Published::Acked)));
    }

    #[test]
    fn on_a_tie_the_oldest_publish_gets_the_return() {
        let mut bench = Bench::new();
        let mut first = bench.publish(Some(key("q", "same")));
        let mut second = bench.publish(Some(key("q", "same")));
        first.register();
        second.register();
        let mut second = second.complete(acked(Some(key("q", "same"))));
        let mut first = first.complete(acked(None));
        bench.settle();
        assert!(matches!(report(&mut first), Some(Published::Returned)));
        assert!(matches!(report(&mut second), Some(Published::Acked)));
    }

    #[test]
    fn a_publish_that_failed_unblocks_the_acks_after_its_ticket() {
        let mut bench = Bench::new();
        let failed = bench.publish(Some(key("q", "f")));
        let mut ok = bench.publish(Some(key("q", "ok")));
        ok.register();
        let mut ok = ok.complete(acked(None));
        bench.settle();
        assert!(report(&mut ok).is_none());
        drop(failed);
        bench.sweep();
        assert!(matches!(report(&mut ok), Some(Published::Acked)));
    }

    #[test]
    fn a_nack_and_a_failure_are_reported_as_such() {
        let mut bench = Bench::new();
        let mut nacked = bench.publish(Some(key("q", "n")));
        let mut failed = bench.publish(Some(key("q", "f")));
        nacked.register();
        failed.register();
        let mut nacked = nacked.complete(Completion {
            outcome: Ok(false),
            carried: None,
        });
        let mut failed = failed.complete(Completion {
            outcome: Err(lapin::Error::from(std::io::Error::other("reset"))),
            carried: None,
        });
        bench.settle();
        assert!(matches!(report(&mut nacked), Some(Published::Nacked)));
        assert!(matches!(
            report(&mut failed),
            Some(Published::Failed(Some(_)))
        ));
    }

    #[test]
    fn the_collector_ends_when_no_publisher_is_left_and_nothing_is_pending() {
        let mut bench = Bench::new();
        let mut last = bench.publish(Some(key("q", "a")));
        last.register();
        drop(bench.registrations);
        let mut cx = Context::from_waker(Waker::noop());
        assert!(bench.collector.sweep(&mut cx).is_pending());
        let mut last = last.complete(acked(None));
        let _ = bench.collector.sweep(&mut cx);
        assert!(bench.collector.sweep(&mut cx).is_ready());
        assert!(matches!(report(&mut last), Some(Published::Acked)));
    }
}
