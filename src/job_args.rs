//! A job body from the command line: `--connector NAME` and `--set KEY=VALUE`, for `send` and
//! `submit`. Values are typed by key: `qos`, `timeout`, `message-expiry` and a numeric
//! `mqtt-version` numbers, `retain` and `use-certificate` booleans, `alpn` a list when it holds
//! commas, `user-properties` JSON (an object or a list of pairs); everything else a string
//! (`not-after` too: an RFC 3339 moment, checked by the worker).

/// A `--set` that is not `KEY=VALUE`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("--set {0:?}: expected KEY=VALUE")]
pub struct JobArgsError(pub String);

/// The job as a JSON object: the connector, then every `--set` in order (a later one wins).
pub fn job_object(
    connector: Option<&str>,
    sets: &[String],
) -> Result<serde_json::Map<String, serde_json::Value>, JobArgsError> {
    let mut job = serde_json::Map::new();
    if let Some(name) = connector {
        job.insert("connector".into(), name.into());
    }
    for set in sets {
        let (key, value) = set
            .split_once('=')
            .ok_or_else(|| JobArgsError(set.clone()))?;
        job.insert(key.to_owned(), typed_value(key, value));
    }
    Ok(job)
}

/// The job body (JSON bytes) for `send`.
pub fn job_body(connector: Option<&str>, sets: &[String]) -> Result<Vec<u8>, JobArgsError> {
    let job = serde_json::Value::Object(job_object(connector, sets)?);
    Ok(job.to_string().into_bytes())
}

fn typed_value(key: &str, value: &str) -> serde_json::Value {
    let parsed = match key {
        "qos" | "timeout" | "message-expiry" | "mqtt-version" => {
            value.parse::<u64>().ok().map(serde_json::Value::from)
        }
        // An object or a list of [name, value] pairs, written as JSON; sent as pairs, because
        // the job's JSON object would not keep an object's order.
        "user-properties" => serde_json::from_str::<crate::job::UserProperties>(value)
            .ok()
            .map(|pairs| {
                let list: Vec<[String; 2]> = pairs.0.into_iter().map(|(n, v)| [n, v]).collect();
                serde_json::Value::from(list)
            }),
        "retain" | "use-certificate" => value.parse::<bool>().ok().map(serde_json::Value::from),
        "alpn" if value.contains(',') => {
            Some(value.split(',').map(str::trim).collect::<Vec<_>>().into())
        }
        _ => None,
    };
    // A value of the wrong shape is sent as a string: the worker's error will name the key.
    parsed.unwrap_or_else(|| value.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_values_are_typed_by_key() {
        let body = job_body(
            Some("local"),
            &[
                "qos=1".into(),
                "retain=true".into(),
                "content=123".into(),
                "alpn=a,b".into(),
            ],
        )
        .expect("body");
        let json: serde_json::Value = serde_json::from_slice(&body).expect("json");
        assert_eq!(json["connector"], "local");
        assert_eq!(json["qos"], 1);
        assert_eq!(json["retain"], true);
        assert_eq!(json["content"], "123");
        assert_eq!(json["alpn"], serde_json::json!(["a", "b"]));
    }

    #[test]
    fn mqtt_5_values_are_typed_by_key() {
        let body = job_body(
            None,
            &[
                "mqtt-version=5".into(),
                "message-expiry=60".into(),
                r#"user-properties={"z":"1","a":"2"}"#.into(),
                "correlation-data=42".into(),
            ],
        )
        .expect("body");
        let json: serde_json::Value = serde_json::from_slice(&body).expect("json");
        assert_eq!(json["mqtt-version"], 5);
        assert_eq!(json["message-expiry"], 60);
        assert_eq!(
            json["user-properties"],
            serde_json::json!([["z", "1"], ["a", "2"]])
        );
        assert_eq!(json["correlation-data"], "42");
        let body = job_body(None, &["mqtt-version=3.1.1".into()]).expect("body");
        let json: serde_json::Value = serde_json::from_slice(&body).expect("json");
        assert_eq!(json["mqtt-version"], "3.1.1");
    }

    #[test]
    fn not_after_is_sent_as_written_for_the_worker_to_check() {
        let body = job_body(
            None,
            &[
                "not-after=2026-12-05T13:00:00+01:00".into(),
                "timeout=2000".into(),
            ],
        )
        .expect("body");
        let json: serde_json::Value = serde_json::from_slice(&body).expect("json");
        assert_eq!(json["not-after"], "2026-12-05T13:00:00+01:00");
        let decoded = crate::job::Params::decode(&body).expect("a valid job body");
        assert_eq!(
            decoded.not_after.as_deref(),
            Some("2026-12-05T13:00:00+01:00")
        );
    }

    #[test]
    fn a_set_without_equals_is_refused() {
        assert_eq!(
            job_body(None, &["qos".into()]),
            Err(JobArgsError("qos".into()))
        );
    }
}
