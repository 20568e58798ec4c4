//! A worker's logs never hold up its jobs: with its stderr a pipe nobody reads (a log collector
//! that stalled), every job is still answered; the lines that do not fit the worker's buffer
//! are dropped, and once stderr is read again a WARN line says how many.

mod common;

use std::io::{BufRead, BufReader};
use std::time::Duration;

use common::child::ChildWorker;
use common::worker::{connectors_dir, job, with};
use common::{Amqp, amqp_url, unique_name};
use serde_json::json;

/// Jobs whose log lines (~700 bytes each with their long correlation ids) are twice what the
/// pipe (64 KiB) and the worker's buffer (1 MiB) hold together.
const JOBS: usize = 3_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stderr_nobody_reads_holds_up_no_job_and_the_dropped_lines_are_counted() {
    let amqp = Amqp::connect().await;
    let queue = unique_name("unread-stderr");
    let connectors = connectors_dir();
    let mut worker = ChildWorker::command(&amqp_url(), &queue, connectors.path())
        .stderr_unread()
        .start()
        .await;
    let stderr = worker.take_stderr().expect("the worker's stderr pipe");
    let (reply_queue, mut replies) = amqp.reply_queue().await;
    let topic = unique_name("unread-stderr");
    let client_id = unique_name("unread-stderr");
    let padding = "c".repeat(200);
    for i in 0..JOBS {
        let body = with(
            job("mqtt://127.0.0.1:1883", &topic, "x"),
            json!({"client-id": client_id, "qos": 0}),
        );
        let correlation_id = format!("{i:05}-{padding}");
        amqp.send_job(
            &queue,
            body.to_string().as_bytes(),
            Some(&reply_queue),
            Some(&correlation_id),
        )
        .await;
    }
    let answered = replies.expect_replies(JOBS, Duration::from_secs(120)).await;
    let failed: Vec<_> = answered.iter().filter(|r| r.exit_code() != 0).collect();
    assert!(failed.is_empty(), "jobs not answered 0: {failed:?}");

    // stderr taken up again: the buffered lines come, then the count of those dropped.
    let reading = tokio::task::spawn_blocking(move || {
        BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
            .find(|line| line.contains("log lines dropped"))
    });
    let warning = tokio::time::timeout(Duration::from_secs(30), reading)
        .await
        .expect("no line about dropped log lines within 30 s of reading stderr")
        .expect("the reading thread")
        .expect("stderr ended without a line about dropped log lines");
    let dropped: u64 = warning
        .split("dropped=")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no count in {warning:?}"));
    assert!(warning.contains("WARN"), "{warning}");
    assert!(dropped > 0, "{warning}");
    worker.stop().await;
    amqp.delete_queue(&queue).await;
}
