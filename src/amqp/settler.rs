//! Settles deliveries with as few frames as is safe. Jobs finish out of order; a finished job
//! whose delivery tag is the lowest still outstanding is acked together with every finished job
//! right behind it, in one `basic.ack` with `multiple`. A finished job behind one still running
//! is acked on its own at once, so a slow job never holds back the prefetch window. Rejects
//! (dead-letter, requeue) are always sent on their own.

use std::collections::BTreeMap;

use futures_util::future::join_all;
use lapin::Channel;
use lapin::options::{BasicAckOptions, BasicRejectOptions};
use lapin::types::DeliveryTag;
use tokio::sync::mpsc;

use crate::settle::Settlement;

/// How long one batch of settlements may take to leave.
const SEND_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

enum Event {
    /// Hold the settlements (true) or send them again (false).
    Hold(bool),
    Taken(DeliveryTag),
    Settled(DeliveryTag, Settlement),
}

/// Cloneable handle to the settling task of one channel.
#[derive(Clone)]
pub struct Settler {
    events: mpsc::UnboundedSender<Event>,
}

/// The settling task itself: [`SettlerTask::finish`] waits until every settlement decided so
/// far has been sent, before the channel is closed.
pub struct SettlerTask(tokio::task::JoinHandle<()>);

impl SettlerTask {
    /// Drops the last handle and waits (at most `limit`) for the task to send what it holds.
    /// Every other handle must be gone already (the jobs are over).
    pub async fn finish(self, last: Settler, limit: std::time::Duration) {
        drop(last);
        if tokio::time::timeout(limit, self.0).await.is_err() {
            tracing::warn!("settlements still unsent at shutdown; RabbitMQ will redeliver them");
        }
    }
}

impl Settler {
    /// Starts the task; it ends once every handle is dropped and all it holds is sent.
    pub fn start(channel: Channel) -> (Settler, SettlerTask) {
        let (events, receiver) = mpsc::unbounded_channel();
        let task = tokio::spawn(run(channel, receiver));
        (Settler { events }, SettlerTask(task))
    }

    /// A delivery was taken: call in delivery order, before its job starts.
    pub fn taken(&self, tag: DeliveryTag) {
        let _ = self.events.send(Event::Taken(tag));
    }

    /// Holds every settlement (`true`) until released (`false`): while held, RabbitMQ does not
    /// refill this consumer's prefetch window.
    pub fn hold(&self, hold: bool) {
        let _ = self.events.send(Event::Hold(hold));
    }

    /// A delivery's job is over.
    pub fn settle(&self, tag: DeliveryTag, settlement: Settlement) {
        let _ = self.events.send(Event::Settled(tag, settlement));
    }
}

/// One frame to send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Frame {
    Ack { tag: DeliveryTag, multiple: bool },
    Reject { tag: DeliveryTag, requeue: bool },
}

/// Deliveries taken and not yet settled with RabbitMQ: `true` once their job is done (acked).
#[derive(Default)]
struct Outstanding(BTreeMap<DeliveryTag, bool>);

impl Outstanding {
    fn apply(&mut self, event: Event, frames: &mut Vec<Frame>) {
        match event {
            Event::Hold(_) => {}
            Event::Taken(tag) => {
                self.0.insert(tag, false);
            }
            Event::Settled(tag, Settlement::Ack) => {
                self.0.insert(tag, true);
            }
            // A forward is resolved by the job before it settles; a reject is the safe reading.
            Event::Settled(
                tag,
                Settlement::DeadLetter | Settlement::ForwardWithOutcome | Settlement::Requeue,
            ) => {
                let requeue = matches!(event, Event::Settled(_, Settlement::Requeue));
                self.0.remove(&tag);
                frames.push(Frame::Reject { tag, requeue });
            }
        }
    }

    /// The acks for every finished job: one `multiple` ack for the finished run at the head,
    /// single acks for finished jobs behind a running one.
    fn flush(&mut self, frames: &mut Vec<Frame>) {
        let mut head = None;
        while let Some((&tag, &true)) = self.0.first_key_value() {
            self.0.pop_first();
            head = Some(tag);
        }
        if let Some(tag) = head {
            frames.push(Frame::Ack {
                tag,
                multiple: true,
            });
        }
        self.0.retain(|&tag, done| {
            if *done {
                frames.push(Frame::Ack {
                    tag,
                    multiple: false,
                });
            }
            !*done
        });
    }
}

async fn run(channel: Channel, mut events: mpsc::UnboundedReceiver<Event>) {
    let mut outstanding = Outstanding::default();
    let mut frames = Vec::new();
    let mut held = false;
    while let Some(event) = events.recv().await {
        let mut apply = |event: Event, held: &mut bool| match event {
            Event::Hold(hold) => *held = hold,
            event => outstanding.apply(event, &mut frames),
        };
        apply(event, &mut held);
        while let Ok(event) = events.try_recv() {
            apply(event, &mut held);
        }
        if !held {
            outstanding.flush(&mut frames);
            send(&channel, &mut frames).await;
        }
    }
    // The last handle is gone: send what is still held.
    outstanding.flush(&mut frames);
    send(&channel, &mut frames).await;
}

async fn send(channel: &Channel, frames: &mut Vec<Frame>) {
    if frames.is_empty() {
        return;
    }
    // join_all polls in order: the frames leave in the order they were decided. Bounded: a
    // connection RabbitMQ blocks (an alarm) writes nothing, acks included; what was handed
    // to lapin still leaves once it is unblocked.
    let sent = tokio::time::timeout(
        SEND_TIMEOUT,
        join_all(frames.drain(..).map(|frame| async move {
            match frame {
                Frame::Ack { tag, multiple } => {
                    channel.basic_ack(tag, BasicAckOptions { multiple }).await
                }
                Frame::Reject { tag, requeue } => {
                    channel
                        .basic_reject(tag, BasicRejectOptions { requeue })
                        .await
                }
            }
        })),
    )
    .await;
    match sent {
        Ok(sent) => {
            if let Some(Err(err)) = sent.into_iter().find(Result::is_err) {
                tracing::warn!(error = %err, "could not settle deliveries; RabbitMQ will redeliver them");
            }
        }
        Err(_) => tracing::warn!(
            after = ?SEND_TIMEOUT,
            "RabbitMQ did not take the settlements in time (connection blocked or stalled)"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(events: Vec<Event>) -> Vec<Frame> {
        let mut outstanding = Outstanding::default();
        let mut frames = Vec::new();
        for event in events {
            outstanding.apply(event, &mut frames);
        }
        outstanding.flush(&mut frames);
        frames
    }

    #[test]
    fn finished_jobs_at_the_head_are_acked_in_one_multiple_ack() {
        let sent = frames(vec![
            Event::Taken(1),
            Event::Taken(2),
            Event::Taken(3),
            Event::Settled(2, Settlement::Ack),
            Event::Settled(1, Settlement::Ack),
            Event::Settled(3, Settlement::Ack),
        ]);
        assert_eq!(
            sent,
            vec![Frame::Ack {
                tag: 3,
                multiple: true
            }]
        );
    }

    #[test]
    fn a_running_job_is_never_covered_by_a_multiple_ack() {
        let sent = frames(vec![
            Event::Taken(1),
            Event::Taken(2),
            Event::Taken(3),
            Event::Settled(1, Settlement::Ack),
            Event::Settled(3, Settlement::Ack),
        ]);
        assert_eq!(
            sent,
            vec![
                Frame::Ack {
                    tag: 1,
                    multiple: true
                },
                Frame::Ack {
                    tag: 3,
                    multiple: false
                }
            ]
        );
    }

    #[test]
    fn rejects_go_alone_and_before_the_acks_that_follow() {
        let sent = frames(vec![
            Event::Taken(1),
            Event::Taken(2),
            Event::Settled(1, Settlement::DeadLetter),
            Event::Settled(2, Settlement::Ack),
        ]);
        assert_eq!(
            sent,
            vec![
                Frame::Reject {
                    tag: 1,
                    requeue: false
                },
                Frame::Ack {
                    tag: 2,
                    multiple: true
                }
            ]
        );
    }

    #[test]
    fn held_settlements_are_not_lost() {
        let sent = frames(vec![
            Event::Taken(1),
            Event::Hold(true),
            Event::Settled(1, Settlement::Ack),
            Event::Hold(false),
        ]);
        assert_eq!(
            sent,
            vec![Frame::Ack {
                tag: 1,
                multiple: true
            }]
        );
    }

    #[test]
    fn requeue_is_a_reject_with_requeue() {
        let sent = frames(vec![
            Event::Taken(7),
            Event::Settled(7, Settlement::Requeue),
        ]);
        assert_eq!(
            sent,
            vec![Frame::Reject {
                tag: 7,
                requeue: true
            }]
        );
    }
}
