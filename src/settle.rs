//! What to tell RabbitMQ about a delivery once its job is over. Pure, so every case is a
//! unit test. A job whose outcome is final is never put back on the queue: its publish may
//! have been acknowledged, and running it again would publish it again.

use crate::outcome::ExitCode;

/// How the reply went, once the replier is done with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyStatus {
    /// The job had no `reply_to`.
    NotRequested,
    /// RabbitMQ confirmed the reply.
    Confirmed,
    /// The reply did not get through within the reply window (refused, unroutable or never
    /// confirmed, retried for at most [`crate::amqp::replier::REPLY_WINDOW`]).
    Lost(LostReply),
}

/// Why a reply was given up on (the last answer RabbitMQ gave).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LostReply {
    /// RabbitMQ refused it (nack), e.g. a full reply queue with `x-overflow reject-publish`.
    Refused,
    /// It routed nowhere: the `reply_to` queue does not exist.
    Unroutable,
    /// No confirm arrived (none in time, or the channel failed).
    Unconfirmed,
}

/// Whether the worker knows where its request queue dead-letters (`--dead-letter-queue`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeadLetters {
    Known,
    Unknown,
}

/// The settlement of a delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settlement {
    Ack,
    /// Reject without requeue: dead-lettered when the queue has a dead-letter exchange, else
    /// dropped (like an ack).
    DeadLetter,
    /// The reply was lost: publish the job (confirmed) to the known dead-letter queue with its
    /// outcome in headers, then ack it; a reject cannot add headers.
    ForwardWithOutcome,
    /// Give the job back to the queue unanswered. Only for a hand-back whose republish failed:
    /// its job never published.
    Requeue,
}

/// Decides the settlement from the job's exit-code, the fate of its reply and whether the
/// worker knows the dead-letter queue. Never [`Settlement::Requeue`]: the outcome is final.
pub fn settle(exit_code: ExitCode, reply: ReplyStatus, dead_letters: DeadLetters) -> Settlement {
    match (reply, dead_letters) {
        (ReplyStatus::Lost(_), DeadLetters::Known) => Settlement::ForwardWithOutcome,
        // A dead-letter exchange the worker does not know still receives the job (without the
        // outcome headers); without one, a reject is an ack.
        (ReplyStatus::Lost(_), DeadLetters::Unknown) => Settlement::DeadLetter,
        (ReplyStatus::NotRequested | ReplyStatus::Confirmed, _) => {
            if exit_code.is_permanent() {
                Settlement::DeadLetter
            } else {
                Settlement::Ack
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOST: [LostReply; 3] = [
        LostReply::Refused,
        LostReply::Unroutable,
        LostReply::Unconfirmed,
    ];

    #[test]
    fn a_published_job_with_a_confirmed_reply_is_acked() {
        assert_eq!(
            settle(
                ExitCode::Published,
                ReplyStatus::Confirmed,
                DeadLetters::Unknown
            ),
            Settlement::Ack
        );
    }

    #[test]
    fn a_job_that_can_never_succeed_is_dead_lettered_not_requeued() {
        for code in [
            ExitCode::InvalidJob,
            ExitCode::UnknownConnector,
            ExitCode::NotAuthorized,
            ExitCode::Tls,
            ExitCode::MessageRefused,
        ] {
            for dead_letters in [DeadLetters::Known, DeadLetters::Unknown] {
                assert_eq!(
                    settle(code, ReplyStatus::Confirmed, dead_letters),
                    Settlement::DeadLetter,
                    "{code:?}"
                );
            }
        }
    }

    #[test]
    fn a_transient_failure_that_ran_out_of_time_is_final_and_acked() {
        for code in [
            ExitCode::ConnectFailed,
            ExitCode::Timeout,
            ExitCode::PublishFailed,
        ] {
            assert_eq!(
                settle(code, ReplyStatus::Confirmed, DeadLetters::Unknown),
                Settlement::Ack,
                "{code:?}"
            );
        }
    }

    #[test]
    fn no_outcome_and_no_reply_fate_ever_requeues_the_job() {
        let statuses = [ReplyStatus::NotRequested, ReplyStatus::Confirmed]
            .into_iter()
            .chain(LOST.map(ReplyStatus::Lost));
        for status in statuses {
            for code in ExitCode::ALL {
                for dead_letters in [DeadLetters::Known, DeadLetters::Unknown] {
                    assert_ne!(
                        settle(code, status, dead_letters),
                        Settlement::Requeue,
                        "{code:?} {status:?} {dead_letters:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn a_lost_reply_forwards_the_job_with_its_outcome_to_a_known_dead_letter_queue() {
        for lost in LOST {
            for code in ExitCode::ALL {
                assert_eq!(
                    settle(code, ReplyStatus::Lost(lost), DeadLetters::Known),
                    Settlement::ForwardWithOutcome,
                    "{code:?} {lost:?}"
                );
            }
        }
    }

    #[test]
    fn a_lost_reply_without_a_known_dead_letter_queue_is_rejected_without_requeue() {
        for lost in LOST {
            for code in ExitCode::ALL {
                assert_eq!(
                    settle(code, ReplyStatus::Lost(lost), DeadLetters::Unknown),
                    Settlement::DeadLetter,
                    "{code:?} {lost:?}"
                );
            }
        }
    }
}
