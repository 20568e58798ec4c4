//! Judging and printing: a scenario's [`Row`] (latencies, correctness, CPU per job), the tables,
//! the figures about the worker's memory, and the targets next to the figures.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::loadgen::{Measured, NO_EXIT, percentile};
use crate::mosquitto::Arrivals;
use crate::procfs::{CpuSnapshot, ProcSample};

#[derive(Clone, Debug, Default)]
pub struct Row {
    pub name: String,
    pub jobs: usize,
    pub per_s: f64,
    pub ratio: Option<f64>,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// CPU µs per job of the process under test (worker or echo server; the bench for MQTT).
    pub cpu_us: Option<f64>,
    /// Its user and kernel parts.
    pub user_us: Option<f64>,
    pub sys_us: Option<f64>,
    /// Context switches per job, every thread of the process under test.
    pub switches: Option<f64>,
    pub peak_rss_mib: Option<f64>,
    pub rabbitmq_us: Option<f64>,
    pub mosquitto_us: Option<f64>,
    pub bench_us: Option<f64>,
    pub check: String,
    pub ok: bool,
    pub notes: Vec<String>,
}

pub fn per_job_us(before: Option<f64>, after: Option<f64>, jobs: usize) -> Option<f64> {
    Some((after? - before?) * 1e6 / jobs as f64)
}

/// Evaluates a finished scenario: latencies, correctness, CPU.
#[allow(clippy::too_many_arguments)]
pub async fn evaluate(
    name: &str,
    measured: &Measured,
    arrivals: Option<&Arrivals>,
    qos0: bool,
    strict_mqtt: bool,
    before: CpuSnapshot,
    after: CpuSnapshot,
    peak_reset: bool,
) -> Row {
    let book = &measured.book;
    let n = book.n;
    let mut latencies: Vec<u64> = (0..n)
        .filter_map(|i| {
            let reply = book.reply_ns[i].load(Ordering::Acquire);
            let sent = book.sent_ns[i].load(Ordering::Acquire);
            (reply != 0 && sent != 0).then(|| reply.saturating_sub(sent))
        })
        .collect();
    latencies.sort_unstable();
    let ms = |p: f64| percentile(&latencies, p) as f64 / 1e6;
    let answered = book.answered.load(Ordering::Acquire);
    let missing = n - answered;
    let duplicates: u64 = book
        .replies
        .iter()
        .map(|c| u64::from(c.load(Ordering::Acquire).saturating_sub(1)))
        .sum();
    let failed = book
        .exit
        .iter()
        .filter(|e| !matches!(e.load(Ordering::Acquire), 0 | NO_EXIT))
        .count();
    let mut ok = missing == 0 && duplicates == 0 && failed == 0;
    let mut problems = Vec::new();
    if missing > 0 {
        problems.push(format!("{missing} unanswered"));
    }
    if duplicates > 0 {
        problems.push(format!("{duplicates} duplicate replies"));
    }
    if failed > 0 {
        problems.push(format!("{failed} exit-code != 0"));
    }
    let mismatched = book.qos_mismatch.load(Ordering::Relaxed);
    if mismatched > 0 {
        problems.push(format!("{mismatched} acked at another QoS"));
        ok = false;
    }
    let mut notes = Vec::new();
    if let Some(arrivals) = arrivals {
        let published: Vec<usize> = (0..n)
            .filter(|&i| book.exit[i].load(Ordering::Acquire) == 0)
            .collect();
        // The broker forwards to the subscriber around the time it acks: allow it to catch up.
        let deadline = Instant::now() + Duration::from_secs(if qos0 { 3 } else { 10 });
        let (mut lost, mut dups) = arrivals.check(measured.tag, &published);
        while lost > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
            (lost, dups) = arrivals.check(measured.tag, &published);
        }
        if lost > 0 {
            problems.push(format!("{lost} not received by the subscriber"));
            if !qos0 || strict_mqtt {
                ok = false;
            }
        }
        if dups > 0 {
            notes.push(format!("{dups} duplicate MQTT deliveries (at least once)"));
        }
    }
    let retried = book.retried.load(Ordering::Relaxed);
    if retried > 0 {
        notes.push(format!("{retried} jobs needed more than one attempt"));
    }
    if let Some(error) = book.first_error.lock().expect("book lock").clone() {
        notes.push(format!("first problem: {error}"));
    }
    if measured.publish_lag_p99_ms > 1.0 {
        notes.push(format!(
            "load generator fell behind its schedule: p99 lag {:.2} ms",
            measured.publish_lag_p99_ms
        ));
    }
    if !peak_reset {
        notes.push("peak RSS is the process-lifetime peak (clear_refs not allowed)".into());
    }
    let per_s = if measured.elapsed_s > 0.0 {
        answered as f64 / measured.elapsed_s
    } else {
        0.0
    };
    Row {
        name: name.to_owned(),
        jobs: n,
        per_s,
        ratio: None,
        p50_ms: ms(0.50),
        p90_ms: ms(0.90),
        p99_ms: ms(0.99),
        max_ms: ms(1.0),
        cpu_us: per_job_us(
            before.server.map(|s| s.cpu_s),
            after.server.map(|s| s.cpu_s),
            n,
        ),
        user_us: per_job_us(
            before.server.map(|s| s.user_s),
            after.server.map(|s| s.user_s),
            n,
        ),
        sys_us: per_job_us(
            before.server.map(|s| s.sys_s),
            after.server.map(|s| s.sys_s),
            n,
        ),
        switches: per_job_us(
            before.server.map(|s| s.switches as f64),
            after.server.map(|s| s.switches as f64),
            n,
        )
        .map(|per_million| per_million / 1e6),
        peak_rss_mib: after.server.map(|s| s.hwm_kib as f64 / 1024.0),
        rabbitmq_us: per_job_us(before.rabbitmq, after.rabbitmq, n),
        mosquitto_us: per_job_us(before.mosquitto, after.mosquitto, n),
        bench_us: per_job_us(before.bench, after.bench, n),
        check: if problems.is_empty() {
            "ok".to_owned()
        } else {
            problems.join(", ")
        },
        ok,
        notes,
    }
}

pub fn fmt_opt(value: Option<f64>, decimals: usize) -> String {
    value.map_or_else(|| "-".to_owned(), |v| format!("{v:.decimals$}"))
}

pub fn print_table(rows: &[Row]) {
    println!();
    println!(
        "{:<34} {:>7} {:>9} {:>6} {:>7} {:>7} {:>7} {:>8} {:>9} {:>8}  check",
        "scenario",
        "jobs",
        "jobs/s",
        "ratio",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "max ms",
        "CPU µs/job",
        "peak MiB"
    );
    println!("{}", "-".repeat(130));
    for row in rows {
        println!(
            "{:<34} {:>7} {:>9.0} {:>6} {:>7.2} {:>7.2} {:>7.2} {:>8.2} {:>10} {:>8}  {}",
            row.name,
            row.jobs,
            row.per_s,
            fmt_opt(row.ratio, 2),
            row.p50_ms,
            row.p90_ms,
            row.p99_ms,
            row.max_ms,
            fmt_opt(row.cpu_us, 1),
            fmt_opt(row.peak_rss_mib, 1),
            row.check
        );
    }
    println!();
    println!("CPU µs per job, by process (2 cores shared by all of them):");
    println!(
        "{:<34} {:>14} {:>10} {:>10} {:>22}",
        "scenario", "worker/echo", "rabbitmq", "mosquitto", "bench (load+sub+mqtt)"
    );
    for row in rows {
        println!(
            "{:<34} {:>14} {:>10} {:>10} {:>22}",
            row.name,
            fmt_opt(row.cpu_us, 1),
            fmt_opt(row.rabbitmq_us, 1),
            fmt_opt(row.mosquitto_us, 1),
            fmt_opt(row.bench_us, 1)
        );
    }
    println!();
    println!("the process under test (worker, peer or echo server), per job:");
    println!(
        "{:<34} {:>10} {:>10} {:>18}",
        "scenario", "user µs", "kernel µs", "context switches"
    );
    for row in rows.iter().filter(|r| r.switches.is_some()) {
        println!(
            "{:<34} {:>10} {:>10} {:>18}",
            row.name,
            fmt_opt(row.user_us, 1),
            fmt_opt(row.sys_us, 1),
            fmt_opt(row.switches, 2)
        );
    }
    let noted: Vec<&Row> = rows.iter().filter(|r| !r.notes.is_empty()).collect();
    if !noted.is_empty() {
        println!();
        for row in noted {
            for note in &row.notes {
                println!("  {}: {note}", row.name);
            }
        }
    }
}
/// The targets next to the figures (information, never an assertion).
pub fn print_targets(rows: &[Row], echo: f64) {
    let find = |prefix: &str| rows.iter().find(|r| r.name.starts_with(prefix));
    let verdict = |met: bool| if met { "met" } else { "NOT met" };
    println!("\ntargets (one run on this machine; figures are noisy):");
    if let Some(q1) = find("worker closed loop, QoS 1") {
        let ratio = q1.per_s / echo;
        println!(
            "  QoS 1 closed loop >= 80% of the echo ceiling: {:.0}% -> {}",
            ratio * 100.0,
            verdict(ratio >= 0.8)
        );
        for qos in [0, 2] {
            if let Some(r) = find(&format!("worker closed loop, QoS {qos}")) {
                let diff = (r.per_s / q1.per_s - 1.0) * 100.0;
                println!(
                    "  QoS {qos} within 10% of QoS 1: {diff:+.0}% -> {}",
                    verdict(diff.abs() <= 10.0)
                );
            }
        }
        if let Some(cpu) = q1.cpu_us {
            println!(
                "  worker CPU per job < 50 µs (QoS 1 closed loop): {cpu:.1} µs -> {}",
                verdict(cpu < 50.0)
            );
        }
        for kind in ["brokers", "client-ids"] {
            if let Some(r) = rows
                .iter()
                .find(|r| r.name.starts_with("worker") && r.name.contains(kind))
            {
                let factor = q1.per_s / r.per_s.max(1e-9);
                println!(
                    "  {} within 2x of one connector: {factor:.2}x slower -> {}",
                    r.name,
                    verdict(factor <= 2.0)
                );
            }
        }
    }
    if let Some(r) = find("worker open loop") {
        println!(
            "  {}: p99 < 5 ms: {:.2} ms -> {}",
            r.name,
            r.p99_ms,
            verdict(r.p99_ms < 5.0)
        );
    }
    if let Some(r) = find("worker open loop 50%") {
        println!(
            "  {}: p99 < 20 ms: {:.2} ms -> {}",
            r.name,
            r.p99_ms,
            verdict(r.p99_ms < 20.0)
        );
    }
    for qos in [1, 0, 2] {
        let ours = find(&format!("worker closed loop, QoS {qos}"));
        let peer = find(&format!("peer closed loop, QoS {qos}"));
        if let (Some(ours), Some(peer)) = (ours, peer) {
            let cpu = match (ours.cpu_us, peer.cpu_us) {
                (Some(o), Some(p)) if p > 0.0 => o / p,
                _ => f64::NAN,
            };
            let speed = ours.per_s / peer.per_s.max(1e-9);
            println!(
                "  QoS {qos} against the peer: worker CPU per job {cpu:.2}x the peer's (goal <= \
                 0.75x) -> {}; jobs/s {speed:.2}x (goal >= 1.1x) -> {}",
                verdict(cpu <= 0.75),
                verdict(speed >= 1.1)
            );
        }
    }
    let peak = rows
        .iter()
        .filter(|r| r.name.starts_with("worker") && !r.name.contains("client-ids"))
        .filter_map(|r| r.peak_rss_mib)
        .fold(0.0, f64::max);
    println!(
        "  worker peak RSS < 30 MiB (all scenarios but the 1,000 client-ids one): {peak:.1} MiB \
         -> {}",
        verdict(peak < 30.0)
    );
}

/// What the scenarios saw of the worker's memory: around the many-client-ids scenario (which
/// leaves its connections open), over the soak, and at the end.
pub struct WorkerMemory {
    pub connections_before: Option<f64>,
    pub connections_after: Option<f64>,
    pub rss_before: Option<u64>,
    pub rss_after: Option<u64>,
    pub mosquitto_before: Option<u64>,
    pub mosquitto_after: Option<u64>,
    /// The client-ids of that scenario, if the worker's /metrics did not tell the connections.
    pub clients: usize,
    /// RSS samples (KiB) over the 50% open-loop soak.
    pub soak: Option<Vec<u64>>,
    pub worker_final: Option<ProcSample>,
    pub log_bytes: u64,
}

/// Memory per open MQTT connection, RSS over the soak, the worker at the end.
pub fn print_worker_memory(m: &WorkerMemory, rows: &[Row]) {
    let opened = match (m.connections_before, m.connections_after) {
        (Some(b), Some(a)) if a > b => a - b,
        _ => m.clients as f64,
    };
    if let (Some(before), Some(after)) = (m.rss_before, m.rss_after) {
        println!(
            "memory per open MQTT connection: worker RSS {:.1} -> {:.1} MiB with {:.0} -> {:.0} \
             open connections = {:.1} KiB per connection (mosquitto: {:.1} KiB)",
            before as f64 / 1024.0,
            after as f64 / 1024.0,
            m.connections_before.unwrap_or(f64::NAN),
            m.connections_after.unwrap_or(f64::NAN),
            (after as f64 - before as f64) / opened,
            match (m.mosquitto_before, m.mosquitto_after) {
                (Some(b), Some(a)) => (a as f64 - b as f64) / opened,
                _ => f64::NAN,
            }
        );
    }
    if let Some(samples) = m.soak.as_ref().filter(|s| s.len() >= 2) {
        let mib = |k: u64| k as f64 / 1024.0;
        let (first, last) = (samples[0], samples[samples.len() - 1]);
        let max = samples.iter().copied().max().unwrap_or(0);
        println!(
            "worker RSS over the 50% open-loop soak ({} samples, 0.5 s apart): first {:.1}, last \
             {:.1}, max {:.1} MiB (change {:+.1} MiB)",
            samples.len(),
            mib(first),
            mib(last),
            mib(max),
            mib(last) - mib(first)
        );
    }
    if let Some(s) = m.worker_final {
        println!(
            "worker at the end: RSS {:.1} MiB, lifetime peak (or since the last reset) {:.1} MiB, \
             {:.1} s CPU; its log: {:.0} bytes per job",
            s.rss_kib as f64 / 1024.0,
            s.hwm_kib as f64 / 1024.0,
            s.cpu_s,
            m.log_bytes as f64
                / rows
                    .iter()
                    .filter(|r| r.name.starts_with("worker"))
                    .map(|r| r.jobs)
                    .sum::<usize>()
                    .max(1) as f64
        );
    }
}
