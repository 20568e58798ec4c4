//! The trust boundary, through a real worker consuming RabbitMQ and real Mosquitto brokers:
//! what a job submitter may and may not make a worker do with the operator's connectors,
//! brokers, disk, sockets and metrics.
//!
//! - a job that points a connector holding a password at another broker: exit 1, and a
//!   listener recording every byte on that broker's port receives nothing; without secrets in
//!   the connector the same redirection is allowed;
//! - `job-may-set` and `--allow-broker` accept and refuse what they say (keys, wildcards, ports);
//! - job file paths: inside `--job-files` a real TLS publish; outside, `..`, a symlink out, a
//!   missing and an unreadable file: one and the same exit-1 message;
//! - bodies that are not exactly one JSON object: exit 1, nothing published;
//! - 1,000 jobs to a server that never answers: every one 6, the worker's descriptors back near
//!   the baseline 2 s after the last reply (abandoned connects close their sockets);
//! - 5,000 jobs with 5,000 client-ids under `--max-connections 100`: all 0, never more than
//!   ~100 MQTT sockets, RSS bounded;
//! - 1,000 distinct brokers: the `broker` label of the connection metrics stays bounded.

mod common;
mod mqtt_support;

use common::worker::{TestBed, connectors_dir, job, with};
use common::*;
use mqtt_connector::policy::{AllowedBrokers, JobFiles};
use mqtt_support::{ChildWorker, Replies, job_and_reply_queues, reconfigure, send_burst};
use rumqttc::QoS;
use serde_json::json;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::AsyncReadExt;
use tokio::net::TcpListener;
use tokio::time::Instant;

const T: Duration = Duration::from_secs(20);

/// A TCP listener that accepts every connection, never answers, and records every byte and
/// connection it receives.
struct Recorder {
    port: u16,
    connections: Arc<Mutex<usize>>,
    bytes: Arc<Mutex<Vec<u8>>>,
}

impl Recorder {
    async fn start() -> Recorder {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let connections = Arc::new(Mutex::new(0));
        let bytes = Arc::new(Mutex::new(Vec::new()));
        let (c, b) = (Arc::clone(&connections), Arc::clone(&bytes));
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                *c.lock().expect("lock") += 1;
                let b = Arc::clone(&b);
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    while let Ok(n @ 1..) = stream.read(&mut buf).await {
                        b.lock().expect("lock").extend_from_slice(&buf[..n]);
                    }
                });
            }
        });
        Recorder {
            port,
            connections,
            bytes,
        }
    }

    fn url(&self) -> String {
        format!("tcp://127.0.0.1:{}", self.port)
    }

    fn received(&self) -> (usize, Vec<u8>) {
        (
            *self.connections.lock().expect("lock"),
            self.bytes.lock().expect("lock").clone(),
        )
    }

    /// Waits until at least `n` bytes arrived; panics after `within`.
    async fn wait_bytes(&self, n: usize, within: Duration) -> Vec<u8> {
        let deadline = Instant::now() + within;
        loop {
            let (_, bytes) = self.received();
            if bytes.len() >= n {
                return bytes;
            }
            assert!(
                Instant::now() < deadline,
                "recorder got {} bytes",
                bytes.len()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|window| window == needle.as_bytes())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connectors_password_never_leaves_for_another_broker() {
    let broker = Mosquitto::with_password("produser", "s3cret-prod");
    let recorder = Recorder::start().await;
    let connectors = connectors_dir();
    write_connector(
        connectors.path(),
        "prod",
        json!({"broker": broker.url(), "username": "produser", "password": "s3cret-prod",
               "client-id": unique_name("prod"), "topic": "t/prod", "qos": 1}),
    );
    write_connector(
        connectors.path(),
        "open",
        json!({"broker": broker.url(), "client-id": unique_name("open"), "topic": "t/open",
               "qos": 1}),
    );
    let mut bed = TestBed::start(connectors).await;

    // The connector's own broker: published with its credentials.
    let reply = bed
        .run(json!({"connector": "prod", "content": "hi"}), T)
        .await;
    assert_eq!(reply.exit_code(), 0, "{}", reply.body);

    // Redirected, with or without a username of its own: refused, nothing sent anywhere.
    for job in [
        json!({"connector": "prod", "broker": recorder.url(), "content": "hi"}),
        json!({"connector": "prod", "broker": recorder.url(), "username": "me", "content": "hi"}),
        json!({"connector": "prod", "broker": format!("mqtt://LOCALHOST:{}", recorder.port),
               "content": "hi"}),
    ] {
        let reply = bed.run(job.clone(), T).await;
        assert_eq!(reply.exit_code(), 1, "{job}: {}", reply.body);
        assert!(
            reply.message().contains("password") && !reply.message().contains("s3cret"),
            "{}",
            reply.body
        );
    }
    // Give a connection that should not exist every chance to arrive.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        recorder.received(),
        (0, Vec::new()),
        "the recorder was contacted"
    );

    // Bringing its own credentials for its own broker: allowed (the recorder never answers).
    let reply = bed
        .run(
            json!({"connector": "prod", "broker": recorder.url(), "username": "mine",
                   "password": "my-own-pw", "content": "hi", "timeout": 500}),
            T,
        )
        .await;
    assert_eq!(reply.exit_code(), 6, "{}", reply.body);
    let seen = recorder.wait_bytes(10, T).await;
    assert!(
        contains(&seen, "my-own-pw") && !contains(&seen, "s3cret-prod"),
        "{seen:?}"
    );

    // A connector without secrets lends its other defaults to any broker.
    let reply = bed
        .run(
            json!({"connector": "open", "broker": recorder.url(), "content": "hi",
                   "timeout": 500}),
            T,
        )
        .await;
    assert_eq!(reply.exit_code(), 6, "{}", reply.body);
    assert!(recorder.received().0 >= 2);
    bed.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_may_set_and_allow_broker_accept_and_refuse_what_they_say() {
    let broker = Mosquitto::plain();
    let other = Mosquitto::plain();
    let topic = unique_name("locked");
    let connectors = connectors_dir();
    write_connector(
        connectors.path(),
        "locked",
        json!({"broker": broker.url(), "client-id": unique_name("locked"), "topic": topic,
               "qos": 1, "job-may-set": ["topic", "content"]}),
    );
    let patterns = vec![
        format!("127.0.0.*:{}", broker.port()),
        format!("localhost:{}", other.port()),
    ];
    let mut bed = TestBed::start_with(connectors, |options| {
        options.policy.allowed_brokers = AllowedBrokers::parse(&patterns).expect("patterns");
    })
    .await;
    let mut subscriber = Subscriber::start(broker.port(), &topic, QoS::AtLeastOnce).await;

    let reply = bed
        .run(json!({"connector": "locked", "content": "allowed"}), T)
        .await;
    assert_eq!(reply.exit_code(), 0, "{}", reply.body);
    assert_eq!(subscriber.expect(T).await.payload_str(), "allowed");

    for (key, value) in [
        ("qos", json!(0)),
        ("broker", json!(broker.url())),
        ("client-id", json!("x")),
    ] {
        let mut body = json!({"connector": "locked", "content": "refused"});
        body[key] = value;
        let reply = bed.run(body, T).await;
        assert_eq!(reply.exit_code(), 1, "{}", reply.body);
        assert!(
            reply.message().contains(&format!("{key:?}")) && reply.message().contains("locked"),
            "{}",
            reply.body
        );
    }

    // --allow-broker: a wildcard label with a port, and a host with a port.
    let allowed = [
        format!("tcp://127.0.0.1:{}", broker.port()),
        format!("tcp://localhost:{}", other.port()),
    ];
    for url in &allowed {
        let reply = bed.run(job(url, "t/allowed", "x"), T).await;
        assert_eq!(reply.exit_code(), 0, "{url}: {}", reply.body);
    }
    let refused = [
        format!("tcp://127.0.0.1:{}", other.port()),
        format!("tcp://localhost:{}", broker.port()),
        format!("ssl://127.0.0.1:{}", free_port()),
    ];
    for url in &refused {
        let reply = bed.run(job(url, "t/refused", "x"), T).await;
        assert_eq!(reply.exit_code(), 1, "{url}: {}", reply.body);
        let host_port = url.split("://").nth(1).expect("url");
        assert!(
            reply.message().contains(host_port) && reply.message().contains("--allow-broker"),
            "{}",
            reply.body
        );
    }
    assert!(subscriber.drain().is_empty(), "a refused job was published");
    bed.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_file_paths_only_inside_the_job_files_folder() {
    let certs = Certs::shared();
    let broker = Mosquitto::tls(certs);
    let root = tempfile::tempdir().expect("tempdir");
    let allowed = root.path().join("job-files");
    std::fs::create_dir(&allowed).expect("mkdir");
    std::fs::copy(&certs.ca_crt, allowed.join("ca.crt")).expect("copy ca");
    std::fs::copy(&certs.ca_crt, root.path().join("outside.crt")).expect("copy ca");
    std::os::unix::fs::symlink(root.path().join("outside.crt"), allowed.join("link.crt"))
        .expect("symlink");
    let unreadable = root.path().join("unreadable.crt");
    std::fs::copy(&certs.ca_crt, &unreadable).expect("copy ca");
    std::fs::set_permissions(
        &unreadable,
        std::os::unix::fs::PermissionsExt::from_mode(0o000),
    )
    .expect("chmod");

    let tls_job = |path: &std::path::Path| {
        with(
            job(&broker.url(), "t/files", "x"),
            json!({"root-ca-crt": path, "timeout": 3000}),
        )
    };
    let refused_paths = [
        root.path().join("outside.crt"),
        allowed.join("../outside.crt"),
        allowed.join("link.crt"),
        root.path().join("missing.crt"),
        unreadable.clone(),
        "/etc/shadow".into(),
        "/etc/no-such-file".into(),
    ];

    // Without --job-files (the default): every path is refused with one message, the allowed
    // folder's own file included.
    let mut bed = TestBed::new().await;
    let mut messages = Vec::new();
    for path in refused_paths.iter().chain([&allowed.join("ca.crt")]) {
        let reply = bed.run(tls_job(path), T).await;
        assert_eq!(reply.exit_code(), 1, "{}: {}", path.display(), reply.body);
        messages.push(reply.message().to_owned());
    }
    assert!(messages.iter().all(|m| *m == messages[0]), "{messages:#?}");
    assert!(messages[0].contains("--job-files"), "{}", messages[0]);
    bed.finish().await;

    // With --job-files: inside works (a real TLS publish), relative names too; the rest is
    // refused alike.
    let files = JobFiles::inside(&allowed).expect("job files dir");
    let mut bed = TestBed::start_with(connectors_dir(), |options| {
        options.policy.job_files = files;
    })
    .await;
    let mut subscriber = Subscriber::start_with(
        tls_options(broker.port(), certs, None),
        "t/files",
        QoS::AtLeastOnce,
    )
    .await;
    for path in [allowed.join("ca.crt"), "ca.crt".into()] {
        let reply = bed.run(tls_job(&path), T).await;
        assert_eq!(reply.exit_code(), 0, "{}: {}", path.display(), reply.body);
        assert_eq!(subscriber.expect(T).await.payload_str(), "x");
    }
    let mut messages = Vec::new();
    for path in &refused_paths {
        let reply = bed.run(tls_job(path), T).await;
        assert_eq!(reply.exit_code(), 1, "{}: {}", path.display(), reply.body);
        messages.push(reply.message().to_owned());
    }
    assert!(messages.iter().all(|m| *m == messages[0]), "{messages:#?}");
    assert!(subscriber.drain().is_empty());
    bed.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_is_exactly_one_json_object() {
    let broker = Mosquitto::plain();
    let topic = unique_name("one-object");
    let mut subscriber = Subscriber::start(broker.port(), &topic, QoS::AtLeastOnce).await;
    let mut bed = TestBed::new().await;
    let valid = job(&broker.url(), &topic, "x").to_string();
    for body in [
        format!("{valid} garbage"),
        format!("{valid}{valid}"),
        format!("{valid}\n{valid}"),
        format!("{valid}\0"),
        format!("{valid}]"),
    ] {
        let reply = bed.run_raw(body.as_bytes(), T).await;
        assert_eq!(reply.exit_code(), 1, "{body:?}: {}", reply.body);
        assert!(reply.message().contains("exactly one"), "{}", reply.body);
    }
    // The same job alone (whitespace around it is fine) is published: the subscriber works.
    let reply = bed.run_raw(format!("  {valid}\n").as_bytes(), T).await;
    assert_eq!(reply.exit_code(), 0, "{}", reply.body);
    let received = subscriber.collect(2, Duration::from_secs(2)).await;
    assert_eq!(received.len(), 1, "only the valid job may be published");
    bed.finish().await;
}

/// Every socket of a process (`/proc/PID/fd` entries that are sockets).
fn sockets(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|dir| {
            dir.filter_map(Result::ok)
                .filter(|entry| {
                    std::fs::read_link(entry.path())
                        .is_ok_and(|target| target.to_string_lossy().starts_with("socket:"))
                })
                .count()
        })
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn black_hole_connects_are_abandoned_with_their_jobs() {
    let silent = SilentServer::start().await;
    let (amqp, queue, reply_queue, mut replies) = job_and_reply_queues().await;
    let connectors = connectors_dir();
    let worker = ChildWorker::start(
        &queue,
        connectors.path(),
        &[("MQTT_CONNECTOR_PREFETCH", "250")],
    )
    .await;
    let fds_before = worker.open_fds();
    let run = unique_name("hole");
    let jobs = 1000;
    let bodies: Vec<(String, Vec<u8>)> = (0..jobs)
        .map(|i| {
            let body = json!({"broker": silent.url(), "client-id": format!("{run}-{i}"),
                "topic": "t", "content": "x", "qos": 1, "timeout": 500});
            (i.to_string(), body.to_string().into_bytes())
        })
        .collect();
    let started = Instant::now();
    send_burst(&amqp, &queue, &reply_queue, &bodies).await;
    let answered = Replies::gather(&mut replies, jobs, T * 3, Duration::from_millis(300)).await;
    let last_reply = started.elapsed();
    let fds_peak = worker.open_fds();
    assert_eq!(answered.total(), jobs);
    assert_eq!(
        answered.codes(),
        [(6, jobs)].into_iter().collect(),
        "{:?}",
        answered.examples(3, 3)
    );
    // Sockets of abandoned connects close as their last job gives up; 2 s is the bound.
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut fds_after = worker.open_fds();
    while fds_after > fds_before + 10 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        fds_after = worker.open_fds();
    }
    println!(
        "black hole: {jobs} jobs answered 6 in {last_reply:?}; fds {fds_before} before, \
         {fds_peak} at the last reply, {fds_after} {:?} later; silent server saw {:?}",
        started.elapsed() - last_reply,
        silent.stats()
    );
    assert!(
        fds_after <= fds_before + 10,
        "open fds {fds_after}, baseline {fds_before}, 2 s after the last reply"
    );
    worker.stop().await;
    amqp.delete_queue(&queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connections_bounds_the_sockets_of_many_client_ids() {
    let mut broker = Mosquitto::plain();
    reconfigure(&mut broker, "max_connections -1\n");
    let (amqp, queue, reply_queue, mut replies) = job_and_reply_queues().await;
    let connectors = connectors_dir();
    let worker = ChildWorker::start(
        &queue,
        connectors.path(),
        &[
            ("MQTT_CONNECTOR_MAX_CONNECTIONS", "100"),
            ("MQTT_CONNECTOR_PREFETCH", "256"),
        ],
    )
    .await;
    let pid = worker.pid();
    let sockets_before = sockets(pid);
    let rss_before = worker.rss_kib();
    // Sample the worker's sockets all along the run.
    let sampling = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let sampler = {
        let sampling = Arc::clone(&sampling);
        tokio::task::spawn_blocking(move || {
            let mut peak = 0;
            while sampling.load(std::sync::atomic::Ordering::Relaxed) {
                peak = peak.max(sockets(pid));
                std::thread::sleep(Duration::from_millis(5));
            }
            peak
        })
    };
    let run = unique_name("many");
    let jobs = 5000;
    let bodies: Vec<(String, Vec<u8>)> = (0..jobs)
        .map(|i| {
            let body = json!({"broker": broker.url(), "client-id": format!("{run}-{i}"),
                "topic": "t/many", "content": "x", "qos": 1, "timeout": 30000});
            (i.to_string(), body.to_string().into_bytes())
        })
        .collect();
    let started = Instant::now();
    send_burst(&amqp, &queue, &reply_queue, &bodies).await;
    let answered = Replies::gather(&mut replies, jobs, T * 6, Duration::from_secs(1)).await;
    let elapsed = started.elapsed();
    sampling.store(false, std::sync::atomic::Ordering::Relaxed);
    let sockets_peak = sampler.await.expect("sampler");
    let rss_after = worker.rss_kib();
    let metrics = worker.metrics().await;
    println!(
        "max-connections 100: {jobs} jobs with {jobs} client-ids in {elapsed:?} ({:.0}/s); \
         codes {:?}; worker sockets {sockets_before} before, peak {sockets_peak} \
         (MQTT at most {}); RSS {rss_before} -> {rss_after} KiB; evictions {}, waits {}",
        jobs as f64 / elapsed.as_secs_f64(),
        answered.codes(),
        sockets_peak.saturating_sub(sockets_before),
        common::worker::metric_sum(&metrics, "mqtt_connector_mqtt_connection_evictions_total"),
        common::worker::metric_sum(&metrics, "mqtt_connector_mqtt_connection_waits_total"),
    );
    assert_eq!(answered.total(), jobs);
    assert_eq!(
        answered.codes(),
        [(0, jobs)].into_iter().collect(),
        "{:?}",
        answered.examples(6, 3)
    );
    // 100 MQTT sockets, plus a few closing (a socket lives until its event loop has ended).
    assert!(
        sockets_peak.saturating_sub(sockets_before) <= 110,
        "peak {sockets_peak} sockets, {sockets_before} before"
    );
    assert!(
        rss_after.saturating_sub(rss_before) < 64 * 1024,
        "RSS {rss_before} -> {rss_after} KiB"
    );
    assert!(
        common::worker::metric_sum(&metrics, "mqtt_connector_mqtt_connection_evictions_total")
            > 0.0
    );
    worker.stop().await;
    amqp.delete_queue(&queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metric_labels_stay_bounded_over_a_thousand_brokers() {
    let mut broker = Mosquitto::plain();
    let wide_port = free_port();
    // A second listener on every address, so 127.0.x.y are 1,000 distinct brokers.
    reconfigure(
        &mut broker,
        &format!("listener {wide_port} 0.0.0.0\nmax_connections -1\n"),
    );
    let connectors = connectors_dir();
    write_connector(
        connectors.path(),
        "named",
        json!({"broker": broker.url(), "client-id": unique_name("named"), "topic": "t",
               "qos": 1}),
    );
    let mut bed = TestBed::start(connectors).await;
    let reply = bed
        .run(json!({"connector": "named", "content": "x"}), T)
        .await;
    assert_eq!(reply.exit_code(), 0, "{}", reply.body);
    let brokers = 1000;
    let correlation: Vec<String> = (0..brokers).map(|i| i.to_string()).collect();
    for (i, id) in correlation.iter().enumerate() {
        let url = format!("tcp://127.0.{}.{}:{wide_port}", i / 250, i % 250 + 1);
        let body = job(&url, "t/wide", "x").to_string();
        bed.amqp
            .send_job(
                &bed.queue,
                body.as_bytes(),
                Some(&bed.reply_queue),
                Some(id),
            )
            .await;
    }
    let replies = bed.replies.expect_replies(brokers, T * 3).await;
    let ok = replies.iter().filter(|r| r.exit_code() == 0).count();
    let metrics = bed.worker.metrics().await;
    let labels: std::collections::BTreeSet<&str> = metrics
        .lines()
        .filter(|line| {
            line.starts_with("mqtt_connector_mqtt_connections{")
                || line.starts_with("mqtt_connector_mqtt_reconnects_total{")
        })
        .filter_map(|line| line.split("broker=\"").nth(1)?.split('"').next())
        .collect();
    println!("{brokers} brokers: {ok} published; broker label values {labels:?}");
    assert_eq!(ok, brokers, "not every job was published");
    let named = format!("127.0.0.1:{}", broker.port());
    assert!(
        labels
            .iter()
            .all(|label| *label == "job" || *label == named),
        "{labels:?}"
    );
    assert!(labels.contains("job"), "{labels:?}");
    bed.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dangling_symlink_out_of_the_job_files_folder_is_refused_like_a_live_one() {
    let certs = Certs::shared();
    let broker = Mosquitto::tls(certs);
    let root = tempfile::tempdir().expect("tempdir");
    let allowed = root.path().join("job-files");
    std::fs::create_dir(&allowed).expect("mkdir");
    std::fs::copy(&certs.ca_crt, root.path().join("outside.crt")).expect("copy ca");
    let link = |name: &str, target: std::path::PathBuf| {
        std::os::unix::fs::symlink(target, allowed.join(name)).expect("symlink");
    };
    link("live.crt", root.path().join("outside.crt"));
    link("dangling.crt", root.path().join("gone.crt"));
    link("dangling-relative.crt", "../gone.crt".into());
    let files = JobFiles::inside(&allowed).expect("job files dir");
    let mut bed = TestBed::start_with(connectors_dir(), |options| {
        options.policy.job_files = files;
    })
    .await;
    let mut messages = Vec::new();
    for name in ["live.crt", "dangling.crt", "dangling-relative.crt"] {
        let body = with(
            job(&broker.url(), "t/dangling", "x"),
            json!({"root-ca-crt": allowed.join(name), "timeout": 3000}),
        );
        let reply = bed.run(body, T).await;
        assert_eq!(reply.exit_code(), 1, "{name}: {}", reply.body);
        messages.push(reply.message().to_owned());
    }
    assert!(messages.iter().all(|m| *m == messages[0]), "{messages:#?}");
    assert!(messages[0].contains("--job-files"), "{}", messages[0]);
    bed.finish().await;
}
