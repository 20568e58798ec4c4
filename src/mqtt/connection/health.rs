//! Whether a connection still works, judged from the protocol: what the event loop actually
//! wrote that the broker must answer (a QoS 1/2 PUBLISH, PUBREL, PINGREQ) and what came back.
//! Pure bookkeeping over (event, time); the connection's watchdog asks for a verdict.
//!
//! Time spent waiting for the broker's Receive Maximum or writing a large packet is not
//! silence: a publish the client has not written yet is owed nothing, and the clock starts when
//! the event loop reports the packet written.

use std::time::{Duration, Instant};

/// What the event loop reported, as health sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Seen {
    /// We wrote a packet the broker must answer.
    Owed,
    /// The broker answered one (PUBACK, PUBREC, PUBCOMP, PINGRESP).
    Answer,
    /// Any other packet from the broker.
    Incoming,
    /// Any other packet we wrote.
    Outgoing,
}

/// The bookkeeping of one connection.
#[derive(Debug)]
pub(super) struct Health {
    /// Packets written that await an answer (approximate under duplicates: never below 0).
    owed: usize,
    /// When the broker last sent anything, or the owed count last rose from 0.
    last_answer: Instant,
    /// When the event loop last reported anything at all.
    last_event: Instant,
    /// How long the broker may stay silent while it owes an answer (the keep-alive).
    answer_within: Duration,
}

impl Health {
    pub(super) fn new(now: Instant, answer_within: Duration) -> Self {
        Self {
            owed: 0,
            last_answer: now,
            last_event: now,
            answer_within,
        }
    }

    pub(super) fn seen(&mut self, seen: Seen, now: Instant) {
        self.last_event = now;
        match seen {
            Seen::Owed => {
                if self.owed == 0 {
                    self.last_answer = now;
                }
                self.owed += 1;
            }
            Seen::Answer => {
                self.owed = self.owed.saturating_sub(1);
                self.last_answer = now;
            }
            Seen::Incoming => self.last_answer = now,
            Seen::Outgoing => {}
        }
    }

    /// Why the connection is to be given up, if it is: the broker owes an answer and has sent
    /// nothing for the keep-alive; or publishes have waited since `busy_since` and the event
    /// loop has reported nothing for twice the keep-alive (a write the broker stopped reading).
    /// A connection idle for long and then given a publish is judged from that moment.
    pub(super) fn verdict(&self, now: Instant, busy_since: Option<Instant>) -> Option<String> {
        let silent = now.saturating_duration_since(self.last_answer);
        if self.owed > 0 && silent >= self.answer_within {
            return Some(format!(
                "the broker sent nothing for {} s while it owed an answer to {} packet(s) \
                 (keep-alive {} s); the connection was closed",
                silent.as_secs(),
                self.owed,
                self.answer_within.as_secs()
            ));
        }
        // Nothing waits: silence is idleness.
        let busy_since = busy_since?;
        let stalled = now.saturating_duration_since(self.last_event.max(busy_since));
        if stalled >= self.answer_within * 2 {
            return Some(format!(
                "nothing could be written or read for {} s while publishes waited \
                 (twice the keep-alive of {} s); the connection was closed",
                stalled.as_secs(),
                self.answer_within.as_secs()
            ));
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEEP_ALIVE: Duration = Duration::from_secs(30);

    fn at(start: Instant, secs: u64) -> Instant {
        start + Duration::from_secs(secs)
    }

    #[test]
    fn a_written_publish_unanswered_for_the_keep_alive_gives_the_connection_up() {
        let start = Instant::now();
        let mut health = Health::new(start, KEEP_ALIVE);
        health.seen(Seen::Owed, at(start, 100));
        assert_eq!(health.verdict(at(start, 129), Some(start)), None);
        let reason = health
            .verdict(at(start, 130), Some(start))
            .expect("given up");
        assert!(reason.contains("30 s"), "{reason}");
    }

    #[test]
    fn publishes_not_yet_written_are_owed_nothing_however_long_they_wait() {
        // Queued behind the broker's Receive Maximum: the client reports nothing written, while
        // the one in flight is answered now and then.
        let start = Instant::now();
        let mut health = Health::new(start, KEEP_ALIVE);
        for second in (0..600).step_by(20) {
            health.seen(Seen::Owed, at(start, second));
            assert_eq!(health.verdict(at(start, second + 19), Some(start)), None);
            health.seen(Seen::Answer, at(start, second + 19));
        }
    }

    #[test]
    fn any_packet_from_the_broker_restarts_the_clock() {
        let start = Instant::now();
        let mut health = Health::new(start, KEEP_ALIVE);
        health.seen(Seen::Owed, at(start, 0));
        health.seen(Seen::Owed, at(start, 1));
        health.seen(Seen::Answer, at(start, 25));
        assert_eq!(health.verdict(at(start, 50), Some(start)), None);
        assert!(health.verdict(at(start, 55), Some(start)).is_some());
    }

    #[test]
    fn an_idle_connection_that_owes_nothing_is_healthy() {
        let start = Instant::now();
        let health = Health::new(start, KEEP_ALIVE);
        assert_eq!(health.verdict(at(start, 3_600), None), None);
    }

    #[test]
    fn publishes_waiting_while_nothing_moves_for_twice_the_keep_alive_give_up() {
        let start = Instant::now();
        let mut health = Health::new(start, KEEP_ALIVE);
        health.seen(Seen::Outgoing, at(start, 10));
        assert_eq!(health.verdict(at(start, 69), Some(start)), None);
        assert!(health.verdict(at(start, 70), Some(start)).is_some());
        assert_eq!(health.verdict(at(start, 70), None), None);
    }

    #[test]
    fn a_connection_idle_for_an_hour_is_judged_from_when_a_publish_arrived() {
        let start = Instant::now();
        let health = Health::new(start, KEEP_ALIVE);
        let busy = at(start, 3_600);
        assert_eq!(health.verdict(at(start, 3_601), Some(busy)), None);
        assert_eq!(health.verdict(at(start, 3_659), Some(busy)), None);
        assert!(health.verdict(at(start, 3_660), Some(busy)).is_some());
    }

    #[test]
    fn answers_never_make_the_owed_count_negative() {
        let start = Instant::now();
        let mut health = Health::new(start, KEEP_ALIVE);
        health.seen(Seen::Answer, at(start, 1));
        health.seen(Seen::Owed, at(start, 2));
        assert!(health.verdict(at(start, 32), Some(start)).is_some());
    }
}
