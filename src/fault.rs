//! Fault switches of test builds (cargo feature `soak-faults`, never in a release): the soak's
//! self-test runs a worker that breaks the delivery contract on purpose, to prove the soak's
//! checker notices. `MQTT_CONNECTOR_FAULT_DROP_REPLY_EVERY=N`: every Nth reply is not sent but
//! reported as confirmed, so its job is settled unanswered.
//! `MQTT_CONNECTOR_FAULT_DOUBLE_PUBLISH_EVERY=N`: every Nth acknowledged MQTT publish is
//! published once more. Counts are per worker process.

use std::sync::LazyLock;
use std::sync::atomic::{AtomicU64, Ordering};

const DROP_REPLY_ENV: &str = "MQTT_CONNECTOR_FAULT_DROP_REPLY_EVERY";
const DOUBLE_PUBLISH_ENV: &str = "MQTT_CONNECTOR_FAULT_DOUBLE_PUBLISH_EVERY";

/// Fires on every Nth call (never when the variable is unset, 0 or not a number).
struct Every {
    n: Option<u64>,
    calls: AtomicU64,
}

impl Every {
    fn from_env(name: &str) -> Self {
        let n = std::env::var(name)
            .ok()
            .and_then(|value| value.trim().parse::<u64>().ok())
            .filter(|n| *n > 0);
        Self {
            n,
            calls: AtomicU64::new(0),
        }
    }

    fn fires(&self) -> bool {
        self.n
            .is_some_and(|n| (self.calls.fetch_add(1, Ordering::Relaxed) + 1).is_multiple_of(n))
    }
}

static DROP_REPLY: LazyLock<Every> = LazyLock::new(|| Every::from_env(DROP_REPLY_ENV));
static DOUBLE_PUBLISH: LazyLock<Every> = LazyLock::new(|| Every::from_env(DOUBLE_PUBLISH_ENV));

/// Logs a warning for each switch that is on (at worker start: such a worker loses replies or
/// publishes twice on purpose), and one for a value that is set but not a positive number.
pub fn announce() {
    for (name, every) in [
        (DROP_REPLY_ENV, &*DROP_REPLY),
        (DOUBLE_PUBLISH_ENV, &*DOUBLE_PUBLISH),
    ] {
        match (every.n, std::env::var_os(name)) {
            (Some(n), _) => tracing::warn!(
                switch = name,
                every = n,
                "soak fault switch on: this worker breaks its delivery contract on purpose"
            ),
            (None, Some(_)) => tracing::warn!(
                switch = name,
                "soak fault switch ignored: not a positive whole number"
            ),
            (None, None) => {}
        }
    }
}

/// Whether this reply is to be dropped (and reported as confirmed). Logs the job it drops.
pub fn drop_reply(correlation_id: Option<&str>) -> bool {
    let fires = DROP_REPLY.fires();
    if fires {
        tracing::warn!(
            fault_correlation_id = correlation_id.unwrap_or(""),
            "soak fault switch: reply dropped, the job is settled as if it was confirmed"
        );
    }
    fires
}

/// Whether this acknowledged publish is to be published once more. Logs when it fires.
pub fn double_publish() -> bool {
    let fires = DOUBLE_PUBLISH.fires();
    if fires {
        tracing::warn!("soak fault switch: this publish is published twice");
    }
    fires
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_nth_call_fires() {
        let every = Every {
            n: Some(3),
            calls: AtomicU64::new(0),
        };
        let fired: Vec<bool> = (0..6).map(|_| every.fires()).collect();
        assert_eq!(fired, [false, false, true, false, false, true]);
    }

    #[test]
    fn an_unset_switch_never_fires() {
        let every = Every {
            n: None,
            calls: AtomicU64::new(0),
        };
        assert!((0..1000).all(|_| !every.fires()));
    }
}
