//! The PromQL of the Grafana dashboard and of the alert rules, read from the repository, for the
//! tests that check it statically (`tests/deployment.rs`) and against a real Prometheus
//! (`tests/observability.rs`).
//!
//! - [`dashboard_exprs`]: every `panels[].targets[].expr` (rows' nested panels included) with
//!   Grafana's interval variables replaced by `1m` ([`substitute_grafana_variables`]).
//! - [`alert_rules`]: every rule of `config/alerts.yml` as (name, expression).
//! - [`alert_probes`]: the parts of an alert expression that must return data on a *healthy*
//!   system (an alert expression itself is empty unless it fires).

use std::path::PathBuf;

use serde_json::Value as Json;
use serde_yaml_ng::Value as Yaml;

/// The dashboard, relative to the repository.
pub const DASHBOARD: &str = "grafana/dashboards/mqtt-connector.json";
/// The alert rules, relative to the repository.
pub const ALERTS: &str = "config/alerts.yml";

fn repo_file(rel: &str) -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// Replaces Grafana's interval variables (`$__rate_interval`, `$__interval`, `$__range`, also
/// in the `${...}` form) by `1m`, so that the expression is plain PromQL.
pub fn substitute_grafana_variables(expr: &str) -> String {
    let mut out = expr.to_string();
    for var in ["__rate_interval", "__interval", "__range"] {
        out = out
            .replace(&format!("${{{var}}}"), "1m")
            .replace(&format!("${var}"), "1m");
    }
    out
}

/// Every panel of a dashboard, rows' nested panels included (rows themselves excluded).
pub fn dashboard_panels(dash: &Json) -> Vec<&Json> {
    fn walk<'a>(panels: &'a Json, out: &mut Vec<&'a Json>) {
        for p in panels.as_array().into_iter().flatten() {
            if p["type"] != "row" {
                out.push(p);
            }
            walk(&p["panels"], out);
        }
    }
    let mut out = Vec::new();
    walk(&dash["panels"], &mut out);
    out
}

/// The dashboard JSON.
pub fn dashboard() -> Json {
    serde_json::from_str(&repo_file(DASHBOARD))
        .unwrap_or_else(|e| panic!("{DASHBOARD} is not valid JSON: {e}"))
}

/// Every PromQL expression of the dashboard, as (panel title, expression with the Grafana
/// variables substituted).
pub fn dashboard_exprs() -> Vec<(String, String)> {
    let dash = dashboard();
    let mut exprs = Vec::new();
    for panel in dashboard_panels(&dash) {
        let title = panel["title"].as_str().unwrap_or("?").to_string();
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"]
                .as_str()
                .unwrap_or_else(|| panic!("panel {title:?}: target without expr"));
            exprs.push((title.clone(), substitute_grafana_variables(expr)));
        }
    }
    exprs
}

/// Every alerting or recording rule, as (name, expression).
pub fn alert_rules() -> Vec<(String, String)> {
    let rules: Yaml = serde_yaml_ng::from_str(&repo_file(ALERTS))
        .unwrap_or_else(|e| panic!("{ALERTS} is not valid YAML: {e}"));
    let mut out = Vec::new();
    for group in rules["groups"]
        .as_sequence()
        .expect("alerts.yml: no groups")
    {
        for rule in group["rules"]
            .as_sequence()
            .expect("alerts.yml: group without rules")
        {
            let name = rule["alert"]
                .as_str()
                .or(rule["record"].as_str())
                .expect("rule without alert/record");
            let expr = rule["expr"]
                .as_str()
                .unwrap_or_else(|| panic!("rule {name}: expr is not a string"));
            out.push((name.to_string(), expr.trim().to_string()));
        }
    }
    out
}

/// `expr`'s bytes with everything inside parentheses, brackets, braces and string literals
/// replaced by spaces: what is left is the expression's top level, at the same offsets.
fn top_level(expr: &str) -> Vec<u8> {
    let mut masked = expr.as_bytes().to_vec();
    let mut depth = 0i32;
    let mut quote: Option<u8> = None;
    let mut escaped = false;
    for byte in masked.iter_mut() {
        let b = *byte;
        if let Some(q) = quote {
            if escaped {
                escaped = false;
            } else if b == b'\\' && q != b'`' {
                escaped = true;
            } else if b == q {
                quote = None;
            }
            *byte = b' ';
            continue;
        }
        match b {
            b'"' | b'\'' | b'`' => quote = Some(b),
            b'(' | b'[' | b'{' => depth += 1,
            b')' | b']' | b'}' => {
                depth -= 1;
                *byte = b' ';
                continue;
            }
            _ => {}
        }
        if depth > 0 || quote.is_some() {
            *byte = b' ';
        }
    }
    masked
}

/// `expr` split at its top-level set operators (`and`, `or`, `unless`), their `on (...)`,
/// `ignoring (...)`, `group_left (...)` and `group_right (...)` modifiers dropped.
fn split_set_operators(expr: &str) -> Vec<String> {
    let masked = top_level(expr);
    let is_ident = |b: u8| b.is_ascii_alphanumeric() || b == b'_' || b == b':';
    let mut parts = Vec::new();
    let (mut from, mut i) = (0, 0);
    while i < masked.len() {
        if !is_ident(masked[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < masked.len() && is_ident(masked[i]) {
            i += 1;
        }
        if matches!(&masked[start..i], b"and" | b"or" | b"unless") {
            parts.push(&expr[from..start]);
            from = i;
        }
    }
    parts.push(&expr[from..]);
    parts
        .into_iter()
        .map(|part| strip_modifiers(part.trim()).to_string())
        .collect()
}

/// Drops leading `on (...)`, `ignoring (...)`, `group_left [(...)]`, `group_right [(...)]`.
fn strip_modifiers(mut part: &str) -> &str {
    loop {
        let Some(keyword) = ["on", "ignoring", "group_left", "group_right"]
            .into_iter()
            .find(|k| {
                part.strip_prefix(k)
                    .is_some_and(|rest| rest.trim_start().starts_with('(') || rest.is_empty())
            })
        else {
            return part;
        };
        let rest = part[keyword.len()..].trim_start();
        part = match rest.find(')') {
            Some(close) if rest.starts_with('(') => rest[close + 1..].trim_start(),
            _ => rest,
        };
    }
}

/// `operand` without a final top-level comparison against a number (`> 0.05`, `== bool 0`).
fn strip_threshold(operand: &str) -> &str {
    let masked = top_level(operand);
    // The first byte of the last top-level `==`, `!=`, `>=`, `<=`, `>` or `<`.
    let at = (0..masked.len())
        .rev()
        .find(|&i| b"<>=!".contains(&masked[i]) && (i == 0 || !b"<>=!".contains(&masked[i - 1])));
    let Some(at) = at else { return operand };
    let rhs = operand[at..]
        .trim_start_matches(['>', '<', '=', '!'])
        .trim();
    let rhs = rhs.strip_prefix("bool").map(str::trim).unwrap_or(rhs);
    if rhs.parse::<f64>().is_ok() {
        operand[..at].trim()
    } else {
        operand
    }
}

/// The queries that must return data for alert `expr` on a healthy, busy system: an alert's
/// expression is empty unless it fires, so each top-level operand of `and`/`or`/`unless` is
/// taken on its own, its final comparison against a threshold dropped (`X > 0.05` → `X`), and
/// `absent(X)` (empty exactly while `X` has data) replaced by `X`.
///
/// Example: `sum(up) == 0 or absent(up)` → `["sum(up)", "up"]`.
pub fn alert_probes(expr: &str) -> Vec<String> {
    split_set_operators(expr)
        .iter()
        .map(|operand| {
            let operand = strip_threshold(operand);
            match operand
                .strip_prefix("absent(")
                .and_then(|rest| rest.strip_suffix(')'))
            {
                Some(inner) => inner.trim().to_string(),
                None => operand.to_string(),
            }
        })
        .collect()
}
