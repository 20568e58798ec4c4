//! The ceilings: what the machine allows without the worker. One rumqttc connection publishing
//! QoS 1 with many tracked publishes in flight (the MQTT ceiling), and an echo server (this
//! binary re-run as a child with `--echo-server`) that consumes, replies with a confirm and acks
//! like the worker, driven by the same load generator (the RabbitMQ ceiling).

use std::io::Read;
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use rumqttc::{
    AsyncClient, Event, MqttOptions, NetworkOptions, Packet, PublishOptions, PublishResult, QoS,
};

use crate::loadgen::{Load, Shape, drive, percentile};
use crate::procfs::{ChildGuard, Pids, snapshot};
use crate::report::{Row, per_job_us};
use crate::scenarios::Bench;
use crate::{Config, now_ns};

pub const ECHO_BODY: &[u8] = br#"{"exit-code":0,"message":"echo"}"#;

pub fn echo_server_main(args: &[String]) -> ExitCode {
    let [url, queue, prefetch] = args else {
        eprintln!("usage: throughput --echo-server AMQP_URL QUEUE PREFETCH");
        return ExitCode::FAILURE;
    };
    let prefetch: u16 = prefetch.parse().expect("prefetch is a number");
    // Exit when the benchmark goes away (our stdin is its pipe).
    std::thread::spawn(|| {
        let mut sink = Vec::new();
        let _ = std::io::stdin().read_to_end(&mut sink);
        std::process::exit(0);
    });
    // Same runtime as the worker's main: the default multi-thread runtime.
    let runtime = tokio::runtime::Runtime::new().expect("build the echo runtime");
    runtime.block_on(async move {
        let connection = Connection::connect(url, ConnectionProperties::default())
            .await
            .expect("echo: connect to RabbitMQ");
        let channel = connection
            .create_channel()
            .await
            .expect("echo: open a channel");
        channel
            .basic_qos(prefetch, BasicQosOptions::default())
            .await
            .expect("echo: basic.qos");
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .expect("echo: confirm.select");
        let mut consumer = channel
            .basic_consume(
                queue.as_str().into(),
                "bench-echo".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("echo: basic.consume");
        while let Some(delivery) = consumer.next().await {
            let delivery = delivery.expect("echo: consumer failed");
            let channel = channel.clone();
            tokio::spawn(async move {
                let properties = &delivery.properties;
                if let Some(reply_to) = properties.reply_to() {
                    let mut reply =
                        BasicProperties::default().with_content_type("application/json".into());
                    if let Some(id) = properties.correlation_id() {
                        reply = reply.with_correlation_id(id.clone());
                    }
                    let confirm = channel
                        .basic_publish(
                            "".into(),
                            reply_to.clone(),
                            BasicPublishOptions {
                                mandatory: true,
                                ..BasicPublishOptions::default()
                            },
                            ECHO_BODY,
                            reply,
                        )
                        .await
                        .expect("echo: publish the reply");
                    confirm.await.expect("echo: publisher confirm");
                }
                delivery
                    .acker
                    .ack(BasicAckOptions::default())
                    .await
                    .expect("echo: ack");
            });
        }
    });
    ExitCode::SUCCESS
}

pub fn spawn_echo_server(config: &Config, queue: &str) -> ChildGuard {
    let child = Command::new(std::env::current_exe().expect("path of this benchmark binary"))
        .arg("--echo-server")
        .arg(&config.amqp_url)
        .arg(queue)
        .arg(config.prefetch.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn the echo server");
    ChildGuard { child }
}

impl Bench {
    /// The echo server as a child process on its own queue: closed loop (and optionally the
    /// open loop at `--rate`, RabbitMQ's share of the latency). Returns the closed-loop jobs/s.
    pub async fn echo_ceiling(&mut self, name: &str, warmup: usize, open_loop: bool) -> f64 {
        let config = self.config.clone();
        let echo_queue = format!("bench-echo-{}", self.run_id);
        self.loadgen.declare_queue(&echo_queue).await;
        let mut echo = spawn_echo_server(&config, &echo_queue);
        let closed = Load::Closed(config.outstanding);
        drive(
            &self.loadgen,
            &echo_queue,
            warmup,
            closed,
            Shape::Echo,
            &self.run_id,
            config.stall,
            None,
        )
        .await;
        if let Ok(Some(status)) = echo.child.try_wait() {
            panic!("the echo server exited with {status}");
        }
        let (row, _) = self
            .scenario(
                name,
                &echo_queue,
                echo.pid(),
                config.jobs,
                closed,
                Shape::Echo,
                false,
            )
            .await;
        let per_s = row.per_s;
        self.rows.push(row);
        if open_loop {
            let n = ((config.rate * config.open_seconds).round() as usize).max(1);
            let (row, _) = self
                .scenario(
                    &format!("echo open loop {:.0}/s", config.rate),
                    &echo_queue,
                    echo.pid(),
                    n,
                    Load::Open(config.rate),
                    Shape::Echo,
                    false,
                )
                .await;
            self.rows.push(row);
        }
        drop(echo);
        self.loadgen.delete_queue(&echo_queue).await;
        per_s
    }

    /// The MQTT ceiling, one connection at QoS 1: to the subscribed topic (publish to PUBACK,
    /// every message counted by the subscriber), then to a topic nobody subscribed to (the
    /// broker's bare rate). Pushes both rows.
    pub async fn mqtt_ceilings(&mut self, port: u16, warmup: usize) {
        let run_id = self.run_id.clone();
        let config = self.config.clone();
        let (tag, _book) = self.loadgen.new_book(0, None);
        let pids = Pids {
            server: None,
            rabbitmq: self.rabbitmq,
            mosquitto: self.mosquitto_pid,
        };
        let topic = format!("bench/{run_id}/{tag}");
        // Warm-up on the same connection setup, then the measured run.
        mqtt_ceiling(port, warmup, topic.clone(), tag, 1_000).await;
        let (tag, _book) = self.loadgen.new_book(0, None);
        let topic = format!("bench/{run_id}/{tag}");
        let n = config.mqtt_ceiling_publishes;
        let before = snapshot(pids);
        let (elapsed, latencies, failures) = mqtt_ceiling(port, n, topic, tag, 1_000).await;
        let after = snapshot(pids);
        let all: Vec<usize> = (0..n).collect();
        let deadline = Instant::now() + Duration::from_secs(10);
        let (mut lost, mut dups) = self.arrivals.check(tag, &all);
        while lost > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
            (lost, dups) = self.arrivals.check(tag, &all);
        }
        let ms = |p: f64| percentile(&latencies, p) as f64 / 1e6;
        let mut problems = Vec::new();
        if failures > 0 {
            problems.push(format!("{failures} not acknowledged"));
        }
        if lost > 0 {
            problems.push(format!("{lost} not received by the subscriber"));
        }
        let mut notes = vec!["latency = publish to PUBACK; CPU = the benchmark process".into()];
        if dups > 0 {
            notes.push(format!("{dups} duplicate MQTT deliveries"));
        }
        // The same without a subscriber (a topic nobody subscribed to): the broker's bare rate.
        let bare_before = snapshot(pids);
        let (bare_s, bare, bare_failures) =
            mqtt_ceiling(port, n, format!("bench-unsubscribed/{run_id}"), tag, 1_000).await;
        let bare_after = snapshot(pids);
        let bare_ms = |p: f64| percentile(&bare, p) as f64 / 1e6;
        self.rows.push(Row {
            name: "mqtt ceiling, no subscriber".into(),
            jobs: n,
            per_s: (n - bare_failures) as f64 / bare_s,
            p50_ms: bare_ms(0.5),
            p90_ms: bare_ms(0.9),
            p99_ms: bare_ms(0.99),
            max_ms: bare_ms(1.0),
            cpu_us: per_job_us(bare_before.bench, bare_after.bench, n),
            rabbitmq_us: per_job_us(bare_before.rabbitmq, bare_after.rabbitmq, n),
            mosquitto_us: per_job_us(bare_before.mosquitto, bare_after.mosquitto, n),
            bench_us: per_job_us(bare_before.bench, bare_after.bench, n),
            check: if bare_failures == 0 {
                "ok".into()
            } else {
                format!("{bare_failures} not acknowledged")
            },
            ok: bare_failures == 0,
            ..Row::default()
        });
        self.rows.push(Row {
            name: "mqtt ceiling (1 conn, QoS 1)".into(),
            jobs: n,
            per_s: (n - failures) as f64 / elapsed,
            ratio: None,
            p50_ms: ms(0.5),
            p90_ms: ms(0.9),
            p99_ms: ms(0.99),
            max_ms: ms(1.0),
            cpu_us: per_job_us(before.bench, after.bench, n),
            peak_rss_mib: None,
            rabbitmq_us: per_job_us(before.rabbitmq, after.rabbitmq, n),
            mosquitto_us: per_job_us(before.mosquitto, after.mosquitto, n),
            bench_us: per_job_us(before.bench, after.bench, n),
            check: if problems.is_empty() {
                "ok".into()
            } else {
                problems.join(", ")
            },
            ok: problems.is_empty(),
            notes,
            ..Row::default()
        });
    }
}

pub async fn mqtt_ceiling(
    port: u16,
    n: usize,
    topic: String,
    tag: u32,
    window: usize,
) -> (f64, Vec<u64>, usize) {
    let mut options = MqttOptions::new(
        format!("bench-ceiling-{}", uuid::Uuid::new_v4().simple()),
        ("127.0.0.1", port),
    );
    options.set_keep_alive(30);
    options.set_clean_session(true);
    options.set_inflight(u16::try_from(window).unwrap_or(u16::MAX));
    options.set_request_channel_capacity(window * 2);
    let (client, mut eventloop) = AsyncClient::builder(options).build();
    let mut network = NetworkOptions::new();
    network.set_tcp_nodelay(true);
    eventloop.set_network_options(network);
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(_))) => break,
            Ok(_) => {}
            Err(err) => panic!("mqtt ceiling: cannot connect to mosquitto: {err}"),
        }
    }
    let poller = tokio::spawn(async move {
        loop {
            match eventloop.poll().await {
                Ok(_) => {}
                // Our own disconnect at the end.
                Err(rumqttc::ConnectionError::RequestsDone) => return,
                Err(err) => {
                    eprintln!("mqtt ceiling: connection ended: {err}");
                    return;
                }
            }
        }
    });
    let mut inflight = FuturesUnordered::new();
    let mut latencies = Vec::with_capacity(n);
    let mut failures = 0;
    let started = now_ns();
    for seq in 0..n {
        if inflight.len() >= window
            && let Some((result, sent)) = inflight.next().await
        {
            note_ack(result, sent, &mut latencies, &mut failures);
        }
        let sent = now_ns();
        let notice = client
            .publish_tracked(
                topic.clone(),
                format!("{tag}.{seq}").into_bytes(),
                PublishOptions::new(QoS::AtLeastOnce),
            )
            .await
            .expect("mqtt ceiling: queue a publish");
        inflight.push(async move { (notice.wait_async().await, sent) });
    }
    while let Some((result, sent)) = inflight.next().await {
        note_ack(result, sent, &mut latencies, &mut failures);
    }
    let elapsed = (now_ns() - started) as f64 / 1e9;
    let _ = client.try_disconnect();
    poller.abort();
    latencies.sort_unstable();
    (elapsed, latencies, failures)
}

pub fn note_ack<E>(
    result: Result<PublishResult, E>,
    sent: u64,
    latencies: &mut Vec<u64>,
    failures: &mut usize,
) {
    match result {
        Ok(_) => latencies.push(now_ns() - sent),
        Err(_) => *failures += 1,
    }
}
