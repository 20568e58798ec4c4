//! `--amqp-url` as SPEC.md "More than one machine" promises it: an IPv6 node written in brackets
//! is connected to at that address (never localhost instead), and a password holding a comma,
//! written `%2C`, logs in and appears in no log line, not even in part.
//!
//! The IPv6 node is a [`TcpProxy`] on `[::1]` forwarding to the machine's RabbitMQ, so the test
//! sees where the worker connected. Only loopback addresses are used.

mod common;

use common::proxy::TcpProxy;
use common::worker::{connectors_dir, job, with};
use common::*;
use serde_json::json;
use std::process::Command;
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(20);

/// The port of the machine's RabbitMQ (from [`amqp_url`]).
fn rabbit_port() -> u16 {
    let url = url::Url::parse(&amqp_url()).expect("the test AMQP URL parses");
    url.port().unwrap_or(5672)
}

/// Whether `[::1]` can be bound here (a machine without IPv6 on loopback cannot run the test).
fn ipv6_loopback() -> bool {
    std::net::TcpListener::bind(("::1", 0)).is_ok()
}

/// Sends one job for `broker` through `queue` and returns its reply's exit-code and message.
async fn one_job(amqp: &Amqp, queue: &str, broker: &Mosquitto) -> (i64, String) {
    let (reply_queue, mut replies) = amqp.reply_queue().await;
    let topic = unique_name("amqp-urls");
    let body = with(job(&broker.url(), &topic, "hi"), json!({"timeout": 10_000}));
    amqp.send_job(
        queue,
        body.to_string().as_bytes(),
        Some(&reply_queue),
        Some("one"),
    )
    .await;
    let reply = replies.expect_reply(T).await;
    (reply.exit_code(), reply.message().to_owned())
}

/// Waits until `pred(log)` holds for the worker's log; panics with the log after `within`.
async fn wait_log(worker: &mut ChildWorker, pred: impl Fn(&str) -> bool, within: Duration) {
    let deadline = Instant::now() + within;
    while !pred(&worker.stderr()) {
        assert!(
            Instant::now() < deadline,
            "log condition not met within {within:?}; log:\n{}",
            worker.tail(40)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn readyz(worker: &ChildWorker) -> u16 {
    match common::http::get(worker.metrics_addr, "/readyz").await {
        Ok((status, _)) => status,
        Err(_) => 0,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_given_an_ipv6_node_consumes_through_that_address() {
    if !ipv6_loopback() {
        panic!("this machine cannot bind [::1]: the IPv6 test needs it");
    }
    let broker = Mosquitto::plain();
    let proxy = TcpProxy::start_on("::1", 0, rabbit_port()).await;
    let queue = unique_name("jobs-ipv6");
    let amqp = Amqp::connect().await;
    amqp.declare_job_queue(&queue).await;
    let connectors = connectors_dir();
    let url = format!("amqp://guest:guest@[::1]:{}/%2f", proxy.port());
    let mut worker = ChildWorker::command(&url, &queue, connectors.path())
        .start()
        .await;
    assert!(
        proxy.stats().total >= 1,
        "the worker is ready but never connected through [::1]"
    );
    let (code, message) = one_job(&amqp, &queue, &broker).await;
    assert_eq!(code, 0, "{message}");
    let log = worker.stderr();
    assert!(log.contains(&format!("[::1]:{}", proxy.port())), "{log}");
    assert!(!log.contains("guest:guest"), "{log}");
    let exit = worker.terminate().await;
    assert!(exit.success(), "{exit}: {}", worker.tail(20));
    amqp.delete_queue(&queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ipv6_node_where_nothing_listens_is_never_replaced_by_localhost() {
    if !ipv6_loopback() {
        panic!("this machine cannot bind [::1]: the IPv6 test needs it");
    }
    // A RabbitMQ on 127.0.0.1:PORT (a proxy to the real one) and nothing on [::1]:PORT: a worker
    // that fell back to `localhost` would reach the proxy and become ready.
    let proxy = loop {
        let proxy = TcpProxy::start(rabbit_port()).await;
        if std::net::TcpListener::bind(("::1", proxy.port())).is_ok() {
            break proxy;
        }
    };
    let port = proxy.port();
    let queue = unique_name("jobs-ipv6-nothing");
    let connectors = connectors_dir();
    let url = format!("amqp://guest:guest@[::1]:{port}/%2f");
    let mut worker = ChildWorker::command(&url, &queue, connectors.path())
        .env("RUST_LOG", "debug,lapin=info")
        .spawn();
    let node = format!("[::1]:{port}");
    wait_log(
        &mut worker,
        |log| {
            log.lines()
                .filter(|l| l.contains(&node) && l.contains("refused"))
                .count()
                >= 2
        },
        T,
    )
    .await;
    worker.check_running();
    assert_eq!(readyz(&worker).await, 503, "{}", worker.tail(20));
    assert_eq!(
        proxy.stats().total,
        0,
        "the worker reached 127.0.0.1:{port}"
    );
    let log = worker.stderr();
    assert!(!log.contains("guest:guest"), "{log}");
    worker.terminate().await;
}

/// `rabbitmqctl ARGS` on the machine's RabbitMQ; panics (with its stderr) on failure.
fn rabbitmqctl(args: &[&str]) {
    let out = Command::new("rabbitmqctl")
        .args(args)
        .output()
        .expect("run rabbitmqctl");
    assert!(
        out.status.success(),
        "rabbitmqctl {:?}: {}",
        args.first(),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A user on the machine's RabbitMQ, deleted on drop.
struct TempUser(String);

impl Drop for TempUser {
    fn drop(&mut self) {
        let _ = Command::new("rabbitmqctl")
            .args(["delete_user", &self.0])
            .output();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_password_with_a_comma_written_percent_2c_logs_in_and_appears_in_no_log() {
    let broker = Mosquitto::plain();
    let user = unique_name("comma-user");
    // Halves distinctive enough that finding either in a log means a leak.
    let head = format!("hd{}", &uuid::Uuid::new_v4().simple().to_string()[..10]);
    let tail = format!("tl{}", &uuid::Uuid::new_v4().simple().to_string()[..10]);
    let password = format!("{head},{tail}");
    let password_arg = password.clone();
    let user_arg = user.clone();
    tokio::task::spawn_blocking(move || {
        rabbitmqctl(&["add_user", &user_arg, &password_arg]);
        rabbitmqctl(&["set_permissions", "-p", "/", &user_arg, ".*", ".*", ".*"]);
    })
    .await
    .expect("rabbitmqctl task");
    let _user = TempUser(user.clone());
    let port = rabbit_port();
    let queue = unique_name("jobs-comma");
    let amqp = Amqp::connect().await;
    amqp.declare_job_queue(&queue).await;
    let connectors = connectors_dir();
    let leaks = |text: &str| text.contains(&head) || text.contains(&tail);

    // Written as a list with %2C: logs in, and the job is answered.
    let url = format!(
        "amqp://{user}:{head}%2C{tail}@127.0.0.1:{port}/%2f,amqp://guest:x@127.0.0.1:1/%2f"
    );
    let mut worker = ChildWorker::command(&url, &queue, connectors.path())
        .env("RUST_LOG", "debug")
        .start()
        .await;
    let (code, message) = one_job(&amqp, &queue, &broker).await;
    assert_eq!(code, 0, "{message}");
    let exit = worker.terminate().await;
    assert!(exit.success(), "{exit}: {}", worker.tail(20));
    let log = worker.output();
    assert!(
        log.contains(&user),
        "the log names the user: {}",
        worker.tail(20)
    );
    assert!(!leaks(&log), "a part of the password is in the log:\n{log}");

    // Written with a raw comma: refused at start, naming %2C, printing no part of it.
    let raw = format!("amqp://{user}:{password}@127.0.0.1:{port}/%2f");
    let mut worker = ChildWorker::command(&raw, &queue, connectors.path())
        .env("RUST_LOG", "debug")
        .spawn();
    let exit = worker.wait_exit(T).await;
    assert!(!exit.success());
    let log = worker.output();
    assert!(log.contains("%2C"), "{log}");
    assert!(!leaks(&log), "a part of the password is in the log:\n{log}");
    amqp.delete_queue(&queue).await;
}
