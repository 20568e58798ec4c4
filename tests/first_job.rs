//! The README's first job, as a newcomer runs it: one worker with a `local` connector (a fixed
//! client-id) on a private Mosquitto, then `mqtt-connector send` (straight to MQTT, the same
//! connector, so the same client-id: it takes the worker's session over) and `submit --wait`
//! alternately, 20 times each. Every `submit --wait` is answered 0 within 10 s and its message
//! arrives; a yield of the client-id, if the worker makes one, is logged at WARN naming it.
//! A lone worker has no sibling on its queue, so it never yields: it takes its session back
//! after a pause (this rests on the worker's watch of its queue's consumers, `Siblings`).

mod common;

use common::child::BIN;
use common::worker::connectors_dir;
use common::*;
use rumqttc::QoS;
use serde_json::json;
use std::process::Command;
use std::process::Output;
use std::time::Duration;
use tokio::time::Instant;

/// Runs the CLI with `args`; panics if it does not exit within `within`.
async fn cli(args: &[&str], within: Duration) -> (Output, Duration) {
    let started = Instant::now();
    let owned: Vec<String> = args.iter().map(|arg| (*arg).to_owned()).collect();
    // Each command bounds itself too (`--wait-timeout`, the job's timeout).
    let run = tokio::task::spawn_blocking(move || {
        Command::new(BIN)
            .args(&owned)
            .env_remove("RUST_LOG")
            .output()
    });
    let output = tokio::time::timeout(within, run)
        .await
        .unwrap_or_else(|_| panic!("mqtt-connector {args:?} did not exit within {within:?}"))
        .expect("the command's thread")
        .expect("run mqtt-connector");
    (output, started.elapsed())
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_and_submit_wait_alternating_on_the_local_connector_are_each_answered_within_seconds()
{
    let broker = Mosquitto::plain();
    let topic = unique_name("first");
    let mut subscriber =
        Subscriber::start(broker.port(), &format!("{topic}/#"), QoS::AtLeastOnce).await;
    let connectors = connectors_dir();
    let client_id = unique_name("mqtt-connector-local");
    write_connector(
        connectors.path(),
        "local",
        json!({"broker": broker.url(), "client-id": client_id, "topic": format!("{topic}/x"),
               "qos": 1}),
    );
    let amqp = Amqp::connect().await;
    let queue = unique_name("first-jobs");
    amqp.declare_job_queue(&queue).await;
    let mut worker = ChildWorker::command(&amqp_url(), &queue, connectors.path())
        .start()
        .await;
    let dir = connectors.path().to_str().expect("utf-8 path").to_owned();
    let url = amqp_url();
    let mut slowest = Duration::ZERO;
    let mut submit_times = Vec::new();
    for round in 0..20 {
        let content = format!("send-{round}");
        let (sent, _) = cli(
            &[
                "send",
                "--connectors",
                &dir,
                "--connector",
                "local",
                "--set",
                &format!("content={content}"),
            ],
            Duration::from_secs(20),
        )
        .await;
        assert!(
            sent.status.success(),
            "send, round {round}: {}",
            text(&sent)
        );
        assert_eq!(
            subscriber
                .expect(Duration::from_secs(10))
                .await
                .payload_str(),
            content
        );

        let content = format!("submit-{round}");
        let (submitted, took) = cli(
            &[
                "submit",
                "--amqp-url",
                &url,
                "--queue",
                &queue,
                "--connector",
                "local",
                "--set",
                &format!("content={content}"),
                "--wait",
                "--wait-timeout",
                "15",
            ],
            Duration::from_secs(30),
        )
        .await;
        let reply = text(&submitted);
        assert!(
            submitted.status.success() && reply.contains("\"exit-code\":0"),
            "submit --wait, round {round}, after {took:?}: {reply}\nworker:\n{}",
            worker.tail(30)
        );
        assert!(
            reply.contains(&format!("as {client_id} ")),
            "the reply names the client-id used: {reply}"
        );
        assert_eq!(
            subscriber
                .expect(Duration::from_secs(10))
                .await
                .payload_str(),
            content
        );
        assert!(
            took < Duration::from_secs(10),
            "submit --wait, round {round}, answered after {took:?}\nworker:\n{}",
            worker.tail(30)
        );
        slowest = slowest.max(took);
        submit_times.push(took.as_millis());
        worker.check_running();
    }
    let log = worker.stderr();
    let yields: Vec<&str> = log
        .lines()
        .filter(|line| line.contains("holds this client-id"))
        .collect();
    let takeovers = broker
        .log()
        .lines()
        .filter(|line| line.contains("already connected, closing old connection"))
        .count();
    println!(
        "20 rounds of send + submit --wait on one client-id: submit times (ms) {submit_times:?}, \
         slowest {slowest:?}; the worker yielded {} times; {takeovers} takeovers in the broker's log",
        yields.len()
    );
    for line in &yields {
        assert!(line.contains("WARN") && line.contains(&client_id), "{line}");
    }
    // The worker's session was taken over: send and the worker both used the client-id.
    assert!(takeovers >= 1, "no takeover: the sequence tested nothing");
    worker.stop().await;
    amqp.delete_queue(&queue).await;
}
