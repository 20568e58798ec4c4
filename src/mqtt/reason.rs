//! MQTT 5 reason codes in words, and what each one means for a job: the contract's exit-code
//! and whether trying again can help. Pure: numbers in, decisions out.

use crate::outcome::ExitCode;

/// The reason code's name as the MQTT 5 specification words it, lower case.
pub fn name(code: u8) -> &'static str {
    match code {
        0x00 => "success",
        0x04 => "disconnect with will message",
        0x10 => "no matching subscribers",
        0x11 => "no subscription existed",
        0x80 => "unspecified error",
        0x81 => "malformed packet",
        0x82 => "protocol error",
        0x83 => "implementation specific error",
        0x84 => "unsupported protocol version",
        0x85 => "client identifier not valid",
        0x86 => "bad user name or password",
        0x87 => "not authorized",
        0x88 => "server unavailable",
        0x89 => "server busy",
        0x8A => "banned",
        0x8B => "server shutting down",
        0x8C => "bad authentication method",
        0x8D => "keep alive timeout",
        0x8E => "session taken over",
        0x8F => "topic filter invalid",
        0x90 => "topic name invalid",
        0x91 => "packet identifier in use",
        0x92 => "packet identifier not found",
        0x93 => "receive maximum exceeded",
        0x94 => "topic alias invalid",
        0x95 => "packet too large",
        0x96 => "message rate too high",
        0x97 => "quota exceeded",
        0x98 => "administrative action",
        0x99 => "payload format invalid",
        0x9A => "retain not supported",
        0x9B => "QoS not supported",
        0x9C => "use another server",
        0x9D => "server moved",
        0x9E => "shared subscriptions not supported",
        0x9F => "connection rate exceeded",
        0xA0 => "maximum connect time",
        0xA1 => "subscription identifiers not supported",
        0xA2 => "wildcard subscriptions not supported",
        _ => "unknown reason code",
    }
}

/// "not authorized (0x87)": the name and the number, as replies quote a reason code.
pub fn describe(code: u8) -> String {
    format!("{} (0x{code:02X})", name(code))
}

/// What a PUBACK or PUBREC reason code means for the publish it answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckVerdict {
    /// Accepted (0x00).
    Accepted,
    /// Accepted, but nobody subscribes to the topic (0x10): a success whose message says so.
    NoSubscribers,
    /// Refused for now (0x97 quota exceeded): retried within the job's timeout.
    RefusedForNow,
    /// Refused (any other code of 0x80 or more): exit-code 8, not retried, not requeued.
    Refused,
}

/// Classifies a PUBACK/PUBREC (or PUBCOMP) reason code.
pub fn ack(code: u8) -> AckVerdict {
    match code {
        0x10 => AckVerdict::NoSubscribers,
        0x97 => AckVerdict::RefusedForNow,
        code if code >= 0x80 => AckVerdict::Refused,
        // Codes below 0x80 are successes (0x00 is the only other one a broker sends).
        _ => AckVerdict::Accepted,
    }
}

/// What a CONNACK refusal means for the job: exit-code 4 (credentials, identity or anything
/// else the broker will refuse again) or 3 (the server is unavailable or busy: retried).
pub fn connack(code: u8) -> ExitCode {
    match code {
        0x88 | 0x89 | 0x9F => ExitCode::ConnectFailed,
        _ => ExitCode::NotAuthorized,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reason_is_described_by_name_and_number() {
        assert_eq!(describe(0x87), "not authorized (0x87)");
        assert_eq!(describe(0x10), "no matching subscribers (0x10)");
        assert_eq!(describe(0x9F), "connection rate exceeded (0x9F)");
        assert_eq!(describe(0x7F), "unknown reason code (0x7F)");
    }

    #[test]
    fn puback_success_and_no_subscribers_are_accepted() {
        assert_eq!(ack(0x00), AckVerdict::Accepted);
        assert_eq!(ack(0x10), AckVerdict::NoSubscribers);
    }

    #[test]
    fn puback_quota_exceeded_is_retried() {
        assert_eq!(ack(0x97), AckVerdict::RefusedForNow);
    }

    #[test]
    fn every_other_puback_refusal_is_final() {
        for code in [0x80, 0x83, 0x87, 0x90, 0x91, 0x92, 0x99] {
            assert_eq!(ack(code), AckVerdict::Refused, "0x{code:02X}");
        }
    }

    #[test]
    fn connack_credential_and_identity_refusals_are_exit_code_4() {
        for code in [0x84, 0x85, 0x86, 0x87, 0x8A, 0x8C] {
            assert_eq!(connack(code), ExitCode::NotAuthorized, "0x{code:02X}");
        }
    }

    #[test]
    fn connack_unavailable_busy_and_rate_are_exit_code_3() {
        for code in [0x88, 0x89, 0x9F] {
            assert_eq!(connack(code), ExitCode::ConnectFailed, "0x{code:02X}");
            assert!(!connack(code).is_permanent());
        }
    }
}
