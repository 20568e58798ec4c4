//! Stale commands: until when a job may still be published (its `not-after`, its AMQP
//! `timestamp` + `expiration`), whether that moment has passed, and the MQTT 5 Message Expiry
//! Interval that carries the rest of it to the broker. Pure: the caller passes `now`.

use std::time::{Duration, SystemTime};

use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// Where a job's validity comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The job's (or its connector's) `not-after` key.
    NotAfter,
    /// The AMQP message's `timestamp` (seconds) + `expiration` (milliseconds).
    AmqpExpiration,
}

/// The moment after which a job must not be published, and where it comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validity {
    pub until: SystemTime,
    pub source: Source,
}

/// A job's validity at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    /// It may be published; this much of its validity is left (never zero).
    Valid { left: Duration },
    /// Its validity passed this long ago (zero: this very moment).
    Expired { ago: Duration },
}

impl Validity {
    /// The earlier of the job's `not-after` and its AMQP expiry; `None` when it has neither.
    pub fn of(not_after: Option<SystemTime>, amqp_expires_at: Option<SystemTime>) -> Option<Self> {
        let not_after = not_after.map(|until| Validity {
            until,
            source: Source::NotAfter,
        });
        let amqp = amqp_expires_at.map(|until| Validity {
            until,
            source: Source::AmqpExpiration,
        });
        match (not_after, amqp) {
            (Some(a), Some(b)) => Some(if b.until < a.until { b } else { a }),
            (a, b) => a.or(b),
        }
    }

    /// Valid while `now` is before `until`: at `until` itself no time is left to publish in.
    pub fn check(&self, now: SystemTime) -> Check {
        match self.until.duration_since(now) {
            Ok(left) if !left.is_zero() => Check::Valid { left },
            Ok(_) => Check::Expired {
                ago: Duration::ZERO,
            },
            Err(past) => Check::Expired {
                ago: past.duration(),
            },
        }
    }

    /// What expired, for the reply: "its not-after 2026-12-05T12:00:00Z".
    pub fn describe(&self) -> String {
        let at = rfc3339(self.until);
        match self.source {
            Source::NotAfter => format!("its not-after {at}"),
            Source::AmqpExpiration => {
                format!("its AMQP timestamp + expiration ({at})")
            }
        }
    }
}

/// Parses an RFC 3339 date-time that states its offset (`Z` or `+hh:mm`): a moment without
/// one would mean a different instant on every machine.
pub fn parse_rfc3339(text: &str) -> Result<SystemTime, time::error::Parse> {
    OffsetDateTime::parse(text, &Rfc3339).map(SystemTime::from)
}

/// A moment as RFC 3339 in UTC (whole milliseconds are enough for a person).
pub fn rfc3339(at: SystemTime) -> String {
    let at = OffsetDateTime::from(at);
    let at = at
        .replace_nanosecond(at.millisecond() as u32 * 1_000_000)
        .unwrap_or(at);
    at.format(&Rfc3339)
        .unwrap_or_else(|_| format!("{} s after 1970", at.unix_timestamp()))
}

/// When an AMQP message expires: `timestamp` (seconds since 1970) + `expiration`
/// (milliseconds, a decimal string), only when it has both. A value that cannot be read or
/// added (RabbitMQ refuses a malformed `expiration` at publish) sets no expiry.
pub fn amqp_expires_at(timestamp: Option<u64>, expiration: Option<&str>) -> Option<SystemTime> {
    let expiration = Duration::from_millis(expiration?.trim().parse::<u64>().ok()?);
    SystemTime::UNIX_EPOCH
        .checked_add(Duration::from_secs(timestamp?))?
        .checked_add(expiration)
}

/// [`amqp_expires_at`] of a delivery's properties.
pub fn amqp_expiry(properties: &lapin::BasicProperties) -> Option<SystemTime> {
    amqp_expires_at(
        *properties.timestamp(),
        properties.expiration().as_ref().map(|e| e.as_str()),
    )
}

/// The MQTT 5 Message Expiry Interval for a publish with `left` of its validity: whole seconds
/// rounded up (so never 0 while time is left), or the job's own `message-expiry` if smaller.
pub fn message_expiry(left: Duration, job_expiry: Option<u32>) -> u32 {
    let secs = left.as_secs() + u64::from(left.subsec_nanos() > 0);
    let secs = u32::try_from(secs).unwrap_or(u32::MAX);
    job_expiry.map_or(secs, |job| job.min(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECS: fn(u64) -> Duration = Duration::from_secs;

    fn at(unix: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + SECS(unix)
    }

    #[test]
    fn a_job_without_not_after_or_amqp_expiry_never_expires() {
        assert_eq!(Validity::of(None, None), None);
    }

    #[test]
    fn the_earlier_of_not_after_and_amqp_expiry_counts() {
        let earlier = Validity::of(Some(at(100)), Some(at(50))).expect("validity");
        assert_eq!(earlier.until, at(50));
        assert_eq!(earlier.source, Source::AmqpExpiration);
        let earlier = Validity::of(Some(at(100)), Some(at(150))).expect("validity");
        assert_eq!(earlier.source, Source::NotAfter);
        assert_eq!(
            Validity::of(None, Some(at(7))).map(|v| v.until),
            Some(at(7))
        );
    }

    #[test]
    fn a_job_is_valid_before_its_moment_and_expired_at_and_after_it() {
        let validity = Validity::of(Some(at(100)), None).expect("validity");
        assert_eq!(validity.check(at(98)), Check::Valid { left: SECS(2) });
        assert_eq!(
            validity.check(at(100)),
            Check::Expired {
                ago: Duration::ZERO
            }
        );
        assert_eq!(validity.check(at(103)), Check::Expired { ago: SECS(3) });
    }

    #[test]
    fn not_after_needs_an_offset() {
        assert_eq!(
            parse_rfc3339("2026-12-05T12:00:00Z").ok(),
            Some(at(1_796_472_000))
        );
        assert_eq!(
            parse_rfc3339("2026-12-05T13:00:00+01:00").ok(),
            Some(at(1_796_472_000))
        );
        assert_eq!(
            parse_rfc3339("2026-12-05T12:00:00.250Z").ok(),
            Some(at(1_796_472_000) + Duration::from_millis(250))
        );
        for bad in [
            "2026-12-05T12:00:00",
            "2026-12-05",
            "12:00:00Z",
            "tomorrow",
            "",
            "2026-13-05T12:00:00Z",
        ] {
            assert!(parse_rfc3339(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_moment_reads_back_as_rfc3339_in_utc() {
        let moment = at(1_796_472_000) + Duration::from_micros(250_400);
        assert_eq!(rfc3339(moment), "2026-12-05T12:00:00.25Z");
        assert_eq!(parse_rfc3339(&rfc3339(at(5))).ok(), Some(at(5)));
    }

    #[test]
    fn amqp_expiry_needs_both_timestamp_and_expiration() {
        assert_eq!(
            amqp_expires_at(Some(1_000), Some("2500")),
            Some(at(1_002) + Duration::from_millis(500))
        );
        assert_eq!(amqp_expires_at(None, Some("2500")), None);
        assert_eq!(amqp_expires_at(Some(1_000), None), None);
    }

    #[test]
    fn an_amqp_expiry_that_cannot_be_read_or_added_sets_none() {
        assert_eq!(amqp_expires_at(Some(1_000), Some("soon")), None);
        assert_eq!(amqp_expires_at(Some(1_000), Some("-5")), None);
        assert_eq!(amqp_expires_at(Some(u64::MAX), Some("1")), None);
    }

    #[test]
    fn amqp_expiry_is_read_from_a_deliverys_properties() {
        let properties = lapin::BasicProperties::default()
            .with_timestamp(1_000)
            .with_expiration("1500".into());
        assert_eq!(
            amqp_expiry(&properties),
            Some(at(1_001) + Duration::from_millis(500))
        );
        assert_eq!(amqp_expiry(&lapin::BasicProperties::default()), None);
    }

    #[test]
    fn the_message_expiry_is_the_validity_left_rounded_up_or_the_jobs_if_smaller() {
        assert_eq!(message_expiry(SECS(100), None), 100);
        assert_eq!(message_expiry(Duration::from_millis(99_001), None), 100);
        assert_eq!(message_expiry(Duration::from_millis(1), None), 1);
        assert_eq!(message_expiry(SECS(100), Some(30)), 30);
        assert_eq!(message_expiry(SECS(10), Some(30)), 10);
        assert_eq!(message_expiry(SECS(u64::MAX), None), u32::MAX);
    }

    #[test]
    fn what_expired_is_named_with_its_moment() {
        let not_after = Validity::of(Some(at(1_796_472_000)), None).expect("validity");
        assert_eq!(not_after.describe(), "its not-after 2026-12-05T12:00:00Z");
        let amqp = Validity::of(None, Some(at(1_796_472_000))).expect("validity");
        assert!(amqp.describe().contains("AMQP timestamp + expiration"));
    }
}
