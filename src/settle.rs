//! What to tell RabbitMQ about a delivery once its job is over. Pure, so every case is a
//! unit test.

use crate::outcome::ExitCode;

/// How the reply went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyStatus {
    /// The job had no `reply_to`.
    NotRequested,
    /// RabbitMQ confirmed the reply.
    Confirmed,
    /// RabbitMQ confirmed it but could not route it: the `reply_to` queue does not exist.
    Unroutable,
    /// RabbitMQ refused the reply (nack), even after a few tries.
    Refused,
    /// The channel failed before the confirm arrived.
    Failed,
}

/// The settlement of a delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settlement {
    Ack,
    /// Reject without requeue: dead-lettered when the queue has a dead-letter exchange.
    DeadLetter,
    /// Give the job back to the queue, to be tried again by this or another worker.
    Requeue,
}

/// Decides the settlement from the job's exit-code and the fate of its reply.
pub fn settle(exit_code: ExitCode, reply: ReplyStatus) -> Settlement {
    match reply {
        // The outcome never reached its client: run the job again rather than lose the answer.
        ReplyStatus::Refused | ReplyStatus::Failed => Settlement::Requeue,
        // Nobody can ever read this reply; running the job again would not change that.
        ReplyStatus::Unroutable | ReplyStatus::NotRequested | ReplyStatus::Confirmed => {
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

    #[test]
    fn a_published_job_with_a_confirmed_reply_is_acked() {
        assert_eq!(
            settle(ExitCode::Published, ReplyStatus::Confirmed),
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
            assert_eq!(
                settle(code, ReplyStatus::Confirmed),
                Settlement::DeadLetter,
                "{code:?}"
            );
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
                settle(code, ReplyStatus::Confirmed),
                Settlement::Ack,
                "{code:?}"
            );
        }
    }

    #[test]
    fn a_reply_rabbitmq_refused_requeues_the_job_whatever_its_exit_code() {
        for code in ExitCode::ALL {
            assert_eq!(
                settle(code, ReplyStatus::Refused),
                Settlement::Requeue,
                "{code:?}"
            );
        }
    }

    #[test]
    fn a_reply_whose_channel_failed_before_the_confirm_requeues_the_job() {
        for code in ExitCode::ALL {
            assert_eq!(
                settle(code, ReplyStatus::Failed),
                Settlement::Requeue,
                "{code:?}"
            );
        }
    }

    #[test]
    fn a_reply_to_a_missing_queue_does_not_loop() {
        assert_eq!(
            settle(ExitCode::Published, ReplyStatus::Unroutable),
            Settlement::Ack
        );
    }
}
