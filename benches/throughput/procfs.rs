//! Processes from the benchmark's side: a child killed on drop, and CPU time and memory read
//! from /proc (the worker's, RabbitMQ's, Mosquitto's and the benchmark's own).

use std::path::Path;
use std::process::{Child, Command};
use std::sync::OnceLock;

/// A child process killed (SIGKILL) and reaped when dropped, also on a panic.
pub struct ChildGuard {
    pub child: Child,
}

impl ChildGuard {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn tail(path: &Path, bytes: usize) -> String {
    let text = std::fs::read(path).unwrap_or_default();
    let from = text.len().saturating_sub(bytes);
    String::from_utf8_lossy(&text[from..]).into_owned()
}

pub fn clock_ticks_per_second() -> f64 {
    static TICKS: OnceLock<f64> = OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|out| String::from_utf8(out.stdout).ok())
            .and_then(|text| text.trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// CPU time and memory of one process, from /proc.
#[derive(Clone, Copy, Debug, Default)]
pub struct ProcSample {
    pub cpu_s: f64,
    /// The user and kernel parts of `cpu_s`.
    pub user_s: f64,
    pub sys_s: f64,
    /// Voluntary + involuntary context switches of every thread (`/proc/PID/task/*/status`).
    pub switches: u64,
    pub rss_kib: u64,
    pub hwm_kib: u64,
}

pub fn proc_sample(pid: u32) -> Option<ProcSample> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after "(comm) ": state is field 3, utime 14, stime 15.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib = |key: &str| {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let tick = clock_ticks_per_second();
    Some(ProcSample {
        cpu_s: (utime + stime) as f64 / tick,
        user_s: utime as f64 / tick,
        sys_s: stime as f64 / tick,
        switches: context_switches(pid),
        rss_kib: kib("VmRSS:"),
        hwm_kib: kib("VmHWM:"),
    })
}

/// Context switches of every thread of `pid` so far (threads that already exited are not
/// counted: the worker's and the peers' threads live as long as the process).
pub fn context_switches(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .flatten()
        .filter_map(|task| std::fs::read_to_string(task.path().join("status")).ok())
        .flat_map(|status| {
            status
                .lines()
                .filter(|l| {
                    l.starts_with("voluntary_ctxt_switches:")
                        || l.starts_with("nonvoluntary_ctxt_switches:")
                })
                .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
                .collect::<Vec<_>>()
        })
        .sum()
}

/// Resets VmHWM to the current RSS (`echo 5 > /proc/PID/clear_refs`); false where not allowed.
pub fn reset_peak_rss(pid: u32) -> bool {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").is_ok()
}

/// The local RabbitMQ's Erlang VM, to show its CPU share (absent if RabbitMQ is elsewhere).
pub fn find_rabbitmq_pid() -> Option<u32> {
    let mut best: Option<(u64, u32)> = None;
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        if comm.trim() == "beam.smp" {
            let rss = proc_sample(pid).map_or(0, |s| s.rss_kib);
            if best.is_none_or(|(r, _)| rss > r) {
                best = Some((rss, pid));
            }
        }
    }
    best.map(|(_, pid)| pid)
}

/// CPU seconds of every process that matters, at one instant.
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuSnapshot {
    pub server: Option<ProcSample>,
    pub rabbitmq: Option<f64>,
    pub mosquitto: Option<f64>,
    pub bench: Option<f64>,
}

#[derive(Clone, Copy)]
pub struct Pids {
    pub server: Option<u32>,
    pub rabbitmq: Option<u32>,
    pub mosquitto: u32,
}

pub fn snapshot(pids: Pids) -> CpuSnapshot {
    CpuSnapshot {
        server: pids.server.and_then(proc_sample),
        rabbitmq: pids.rabbitmq.and_then(proc_sample).map(|s| s.cpu_s),
        mosquitto: proc_sample(pids.mosquitto).map(|s| s.cpu_s),
        bench: proc_sample(std::process::id()).map(|s| s.cpu_s),
    }
}
