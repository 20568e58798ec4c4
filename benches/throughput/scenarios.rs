//! The scenarios: starts the worker under test (a child process with its connectors), then
//! drives it closed loop at QoS 1, 0 and 2, open loop, over many brokers and many client-ids,
//! between two echo ceilings; each scenario gets a warm-up and a [`Row`].

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use crate::child::ChildWorker;
use crate::device::Device;
use crate::loadgen::{Load, LoadGen, Measured, QOS1, Shape, answers_one_job, drive};
use crate::mosquitto::{Arrivals, Mosquitto, start_subscriber};
use crate::procfs::{Pids, find_rabbitmq_pid, proc_sample, reset_peak_rss, snapshot};
use crate::report::{Row, WorkerMemory, evaluate, print_table, print_targets, print_worker_memory};
use crate::{Config, Mode, now_ns};

pub struct Bench {
    pub config: Config,
    pub loadgen: LoadGen,
    pub arrivals: Arc<Arrivals>,
    pub run_id: String,
    pub rows: Vec<Row>,
    pub rabbitmq: Option<u32>,
    pub mosquitto_pid: u32,
}

impl Bench {
    /// `who`'s closed loops at QoS 1, 0 and 2 (MQTT 3.1.1), each a row, with `running` checked
    /// after each; returns the QoS 1 row's jobs/s.
    pub async fn closed_loops(
        &mut self,
        who: &str,
        queue: &str,
        pid: u32,
        mut running: impl FnMut(),
    ) -> f64 {
        let closed = Load::Closed(self.config.outstanding);
        let mut capacity = 0.0;
        for qos in [1u8, 0, 2] {
            let shape = Shape::Worker {
                qos,
                clients: None,
                brokers: None,
                v5: false,
            };
            let (row, _) = self
                .scenario(
                    &format!("{who} closed loop, QoS {qos}"),
                    queue,
                    pid,
                    self.config.jobs,
                    closed,
                    shape,
                    false,
                )
                .await;
            if qos == 1 {
                capacity = row.per_s;
            }
            self.rows.push(row);
            running();
        }
        capacity
    }

    /// Warm-up (not reported), then one measured scenario against `server_pid`'s queue.
    #[allow(clippy::too_many_arguments)]
    pub async fn scenario(
        &mut self,
        name: &str,
        queue: &str,
        server_pid: u32,
        n: usize,
        load: Load,
        shape: Shape,
        sample_rss: bool,
    ) -> (Row, Measured) {
        let pids = Pids {
            server: Some(server_pid),
            rabbitmq: self.rabbitmq,
            mosquitto: self.mosquitto_pid,
        };
        let peak_reset = reset_peak_rss(server_pid);
        let before = snapshot(pids);
        let measured = drive(
            &self.loadgen,
            queue,
            n,
            load,
            shape,
            &self.run_id,
            self.config.stall,
            sample_rss.then_some(server_pid),
        )
        .await;
        let after = snapshot(pids);
        let qos0 = matches!(shape, Shape::Worker { qos: 0, .. });
        let arrivals =
            matches!(shape, Shape::Worker { .. } | Shape::Request).then_some(&*self.arrivals);
        let row = evaluate(
            name,
            &measured,
            arrivals,
            qos0,
            self.config.mode == Mode::Smoke,
            before,
            after,
            peak_reset,
        )
        .await;
        (row, measured)
    }
}
pub fn write_connector(dir: &Path, name: &str, json: serde_json::Value) {
    let path = dir.join(format!("{name}.json"));
    std::fs::write(&path, json.to_string())
        .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

/// `dir/connectors` with the connector `bench` every worker under test gets: QoS 1 on the
/// main listener, as `client_id`.
pub fn bench_connectors(dir: &Path, mosquitto: &Mosquitto, client_id: &str) -> PathBuf {
    let connectors = dir.join("connectors");
    std::fs::create_dir_all(&connectors).expect("create the connectors folder");
    write_connector(
        &connectors,
        "bench",
        serde_json::json!({
            "broker": format!("tcp://127.0.0.1:{}", mosquitto.ports[0]),
            "client-id": client_id, "qos": 1, "topic": "bench/default"
        }),
    );
    connectors
}

/// The worker under test (the harness' child-worker wrapper), with one connector `bench` for
/// the main listener and one `bNN` per extra listener; `RUST_LOG` passed on.
pub fn start_worker(
    config: &Config,
    queue: &str,
    mosquitto: &Mosquitto,
    dir: &Path,
) -> ChildWorker {
    let connectors = bench_connectors(dir, mosquitto, "bench-worker");
    // The same broker over MQTT 5, with a client-id of its own (one connection per client-id).
    write_connector(
        &connectors,
        "bench5",
        serde_json::json!({
            "broker": format!("tcp://127.0.0.1:{}", mosquitto.ports[0]),
            "client-id": "bench-worker-v5", "qos": 1, "topic": "bench/default",
            "mqtt-version": 5
        }),
    );
    // One connector per extra listener; distinct client-ids, since every listener is the same
    // broker (a second connection with one client-id would take the first one's session over).
    for (i, port) in mosquitto.ports[1..].iter().enumerate() {
        write_connector(
            &connectors,
            &format!("b{i:02}"),
            serde_json::json!({
                "broker": format!("tcp://127.0.0.1:{port}"),
                "client-id": format!("bench-b{i:02}"), "qos": 1, "topic": "bench/default"
            }),
        );
    }
    let mut command = ChildWorker::command(&config.amqp_url, queue, &connectors)
        .env("MQTT_CONNECTOR_PREFETCH", config.prefetch.to_string());
    if let Some(filter) = std::env::var_os("RUST_LOG") {
        command = command.env("RUST_LOG", filter);
    }
    command.spawn()
}

/// Sum of `mqtt_connector_mqtt_connections` over brokers, from the worker's /metrics.
pub async fn open_mqtt_connections(port: u16) -> Option<f64> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .ok()?;
    let mut text = String::new();
    stream.read_to_string(&mut text).await.ok()?;
    let sum = text
        .lines()
        .filter(|l| l.starts_with("mqtt_connector_mqtt_connections{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    Some(sum)
}

pub async fn run(config: Config) -> bool {
    now_ns();
    let run_id = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
    println!(
        "throughput benchmark, {:?} mode: {} jobs per closed-loop scenario, prefetch {}, {} \
         outstanding, open loop {} jobs/s; {} CPUs; {}; {} queues; worker log: RUST_LOG={}",
        config.mode,
        config.jobs,
        config.prefetch,
        config.outstanding,
        config.rate,
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        Mosquitto::version(),
        if config.durable {
            "durable queues, persistent"
        } else {
            "transient"
        },
        std::env::var("RUST_LOG").unwrap_or_else(|_| "(unset: info, one line per job)".into()),
    );
    let mosquitto = Mosquitto::start(config.brokers, config.mosquitto_nodelay);
    let arrivals = Arc::new(Arrivals::default());
    let _subscriber = start_subscriber(
        mosquitto.ports[0],
        format!("bench/{run_id}/#"),
        arrivals.clone(),
    )
    .await;
    let loadgen = LoadGen::connect(&config.amqp_url, config.durable).await;
    let mut bench = Bench {
        config: config.clone(),
        loadgen,
        arrivals,
        run_id: run_id.clone(),
        rows: Vec::new(),
        rabbitmq: find_rabbitmq_pid(),
        mosquitto_pid: mosquitto.process.pid(),
    };
    let smoke = config.mode == Mode::Smoke;
    let warmup = (config.jobs / 10).clamp(1, 2_000);

    // ---- ceiling 1: MQTT publish with acks, one connection ----
    bench.mqtt_ceilings(mosquitto.ports[0], warmup).await;

    // ---- ceiling 2: RabbitMQ echo round trip (again at the end: the machine drifts) ----
    let echo_first = bench
        .echo_ceiling("echo ceiling (closed loop)", warmup, true)
        .await;

    // ---- the worker ----
    let queue = format!("bench-jobs-{run_id}");
    bench.loadgen.declare_queue(&queue).await;
    let dir = tempfile::Builder::new()
        .prefix("bench-worker-")
        .tempdir()
        .expect("create a temporary directory for the worker");
    let mut worker = start_worker(&config, &queue, &mosquitto, dir.path());
    let pid = worker.pid();
    let worker_start = Instant::now();
    // Ready when it answers one job; then a closed-loop warm-up (not reported).
    {
        let answered = answers_one_job(&bench.loadgen, &queue, &run_id).await;
        worker.check_running();
        assert!(
            answered,
            "the worker did not answer its first job; its log:\n{}",
            worker.tail(60)
        );
        println!(
            "worker pid {pid} answered its first job {:.0} ms after it was started",
            worker_start.elapsed().as_secs_f64() * 1e3
        );
        drive(
            &bench.loadgen,
            &queue,
            warmup,
            Load::Closed(config.outstanding),
            QOS1,
            &run_id,
            config.stall,
            None,
        )
        .await;
    }
    let closed = Load::Closed(config.outstanding);
    let capacity = bench
        .closed_loops("worker", &queue, pid, || worker.check_running())
        .await;
    let v5 = Shape::Worker {
        qos: 1,
        clients: None,
        brokers: None,
        v5: true,
    };
    let (row, _) = bench
        .scenario(
            "worker closed loop, QoS 1, MQTT 5",
            &queue,
            pid,
            config.jobs,
            closed,
            v5,
            false,
        )
        .await;
    bench.rows.push(row);
    worker.check_running();
    // Commands that answer: the device answers at once, on the same Mosquitto.
    let device = Device::start(mosquitto.ports[0], format!("bench/{run_id}/+")).await;
    let (row, _) = bench
        .scenario(
            "worker closed loop, request v5",
            &queue,
            pid,
            config.jobs,
            closed,
            Shape::Request,
            false,
        )
        .await;
    drop(device);
    bench.rows.push(row);
    worker.check_running();

    // ---- open loop ----
    let qos1 = Shape::Worker {
        qos: 1,
        clients: None,
        brokers: None,
        v5: false,
    };
    let open_rates = [
        (
            format!("worker open loop {:.0}/s, QoS 1", config.rate),
            config.rate,
            config.open_seconds,
        ),
        (
            format!("worker open loop 50% = {:.0}/s", capacity * 0.5),
            (capacity * 0.5).max(1.0),
            config.soak_seconds,
        ),
    ];
    let mut soak: Option<Vec<u64>> = None;
    for (i, (name, rate, seconds)) in open_rates.into_iter().enumerate() {
        let n = ((rate * seconds).round() as usize).max(1);
        let (row, measured) = bench
            .scenario(&name, &queue, pid, n, Load::Open(rate), qos1, i == 1)
            .await;
        if i == 1 {
            soak = Some(measured.rss_samples_kib);
        }
        bench.rows.push(row);
        worker.check_running();
    }

    // ---- many connectors: brokers, then client-ids (last: those connections stay open) ----
    let brokers = Shape::Worker {
        qos: 1,
        clients: None,
        brokers: Some(config.brokers),
        v5: false,
    };
    let (mut row, _) = bench
        .scenario(
            &format!("worker {} brokers, QoS 1", config.brokers),
            &queue,
            pid,
            config.jobs,
            closed,
            brokers,
            false,
        )
        .await;
    row.notes.push(format!(
        "{} listeners of one mosquitto process, one connector each",
        config.brokers
    ));
    bench.rows.push(row);

    let connections_before = open_mqtt_connections(worker.metrics_addr.port()).await;
    let rss_before = proc_sample(pid).map(|s| s.rss_kib);
    let mosquitto_before = proc_sample(bench.mosquitto_pid).map(|s| s.rss_kib);
    let clients = Shape::Worker {
        qos: 1,
        clients: Some(config.clients),
        brokers: None,
        v5: false,
    };
    let (row, _) = bench
        .scenario(
            &format!("worker {} client-ids, QoS 1", config.clients),
            &queue,
            pid,
            config.jobs.max(config.clients),
            closed,
            clients,
            false,
        )
        .await;
    bench.rows.push(row);
    worker.check_running();
    let connections_after = open_mqtt_connections(worker.metrics_addr.port()).await;
    let rss_after = proc_sample(pid).map(|s| s.rss_kib);
    let mosquitto_after = proc_sample(bench.mosquitto_pid).map(|s| s.rss_kib);
    let worker_final = proc_sample(pid);
    let log_bytes = std::fs::metadata(worker.log_path()).map_or(0, |m| m.len());
    drop(worker);
    bench.loadgen.delete_queue(&queue).await;
    if let Some(command) = config.peer.clone() {
        bench.peer(&command, &mosquitto, warmup).await;
    }
    let echo_last = bench
        .echo_ceiling("echo ceiling, again at the end", warmup, false)
        .await;
    // Every closed-loop throughput against the mean of the two echo ceilings.
    let echo_ceiling = (echo_first + echo_last) / 2.0;
    for row in &mut bench.rows {
        if row.name.starts_with("echo ceiling")
            || (row.name.starts_with("worker") && !row.name.contains("open loop"))
        {
            row.ratio = Some(row.per_s / echo_ceiling);
        }
    }
    println!(
        "\necho ceiling: {echo_first:.0} jobs/s at the start, {echo_last:.0} at the end; \
         ratios are to their mean, {echo_ceiling:.0} jobs/s"
    );

    // ---- report ----
    print_table(&bench.rows);
    println!();
    print_worker_memory(
        &WorkerMemory {
            connections_before,
            connections_after,
            rss_before,
            rss_after,
            mosquitto_before,
            mosquitto_after,
            clients: config.clients,
            soak,
            worker_final,
            log_bytes,
        },
        &bench.rows,
    );
    let stray = bench.loadgen.stray.load(Ordering::Relaxed);
    let unparsed = bench.arrivals.unparsed.load(Ordering::Relaxed);
    if stray > 0 || unparsed > 0 {
        println!("{stray} replies and {unparsed} MQTT messages belonged to no scenario");
    }
    if let Some(err) = bench.arrivals.errors.lock().expect("arrivals lock").clone() {
        println!("the MQTT subscriber lost its connection at least once: {err}");
    }
    if !smoke {
        print_targets(&bench.rows, echo_ceiling);
    }
    let ok = bench.rows.iter().all(|r| r.ok) && stray == 0;
    drop(mosquitto);
    ok
}
