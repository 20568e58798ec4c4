//! The MQTT side of the benchmark: one Mosquitto process with 1 + N listeners, and one
//! subscriber that counts every payload `TAG.SEQ` it receives.

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

use crate::free_port;
use crate::procfs::{ChildGuard, tail};

pub struct Mosquitto {
    pub _dir: tempfile::TempDir,
    /// ports[0] is the main listener; ports[1..] the "other brokers".
    pub ports: Vec<u16>,
    pub process: ChildGuard,
}

impl Mosquitto {
    pub fn start(extra_listeners: usize, nodelay: bool) -> Mosquitto {
        let dir = tempfile::Builder::new()
            .prefix("bench-mosquitto-")
            .tempdir()
            .expect("create a temporary directory for mosquitto");
        let d = dir
            .path()
            .to_str()
            .expect("utf-8 temporary path")
            .to_owned();
        for _attempt in 0..5 {
            let ports: Vec<u16> = (0..=extra_listeners).map(|_| free_port()).collect();
            // `user root`: do not drop privileges when run as root (could not read the temp dir).
            // max_inflight_messages / max_queued_messages 0: no limit towards the subscriber, so
            // the broker never drops or throttles what the benchmark must count.
            let mut conf = format!(
                "user root\npersistence false\nlog_dest file {d}/mosquitto.log\n\
                 log_type error\nlog_type warning\nconnection_messages false\n\
                 max_inflight_messages 0\nmax_queued_messages 0\nallow_anonymous true\n\
                 set_tcp_nodelay {nodelay}\n"
            );
            for port in &ports {
                conf.push_str(&format!("listener {port} 127.0.0.1\n"));
            }
            let conf_path = dir.path().join("mosquitto.conf");
            std::fs::write(&conf_path, conf).expect("write mosquitto.conf");
            let log = std::fs::File::create(dir.path().join("stderr.log"))
                .expect("create mosquitto stderr.log");
            let child = Command::new("mosquitto")
                .arg("-c")
                .arg(&conf_path)
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("clone a file handle"))
                .stderr(log)
                .spawn()
                .expect("spawn mosquitto (is it on PATH?)");
            let mut process = ChildGuard { child };
            let deadline = Instant::now() + Duration::from_secs(10);
            let mut listening = false;
            while Instant::now() < deadline {
                if matches!(process.child.try_wait(), Ok(Some(_))) {
                    break;
                }
                if ports
                    .iter()
                    .all(|p| std::net::TcpStream::connect(("127.0.0.1", *p)).is_ok())
                {
                    listening = true;
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            if listening {
                return Mosquitto {
                    _dir: dir,
                    ports,
                    process,
                };
            }
            eprintln!(
                "mosquitto did not start (a port was taken?), retrying:\n{}{}",
                tail(&dir.path().join("mosquitto.log"), 2_000),
                tail(&dir.path().join("stderr.log"), 2_000)
            );
        }
        panic!("mosquitto did not start after 5 attempts");
    }

    pub fn version() -> String {
        Command::new("mosquitto")
            .arg("-h")
            .output()
            .ok()
            .and_then(|out| {
                String::from_utf8_lossy(&out.stdout)
                    .lines()
                    .next()
                    .map(str::to_owned)
            })
            .unwrap_or_else(|| "mosquitto (version unknown)".into())
    }
}

// ---------------------------------------------------------------------------------------------
// MQTT subscriber: counts every payload `TAG.SEQ` it receives
// ---------------------------------------------------------------------------------------------

#[derive(Default)]
pub struct Arrivals {
    /// Per scenario tag: how many times each sequence number arrived.
    pub counts: Mutex<HashMap<u32, Vec<u32>>>,
    pub unparsed: AtomicU64,
    pub errors: Mutex<Option<String>>,
}

impl Arrivals {
    pub fn record(&self, payload: &[u8]) {
        let parsed = std::str::from_utf8(payload).ok().and_then(parse_tag_seq);
        match parsed {
            Some((tag, seq)) => {
                let mut counts = self.counts.lock().expect("arrivals lock");
                let vec = counts.entry(tag).or_default();
                if vec.len() <= seq {
                    vec.resize(seq + 1, 0);
                }
                vec[seq] += 1;
            }
            None => {
                self.unparsed.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// (missing, duplicates) among `expected` sequence numbers of `tag`.
    pub fn check(&self, tag: u32, expected: &[usize]) -> (usize, u64) {
        let counts = self.counts.lock().expect("arrivals lock");
        let empty = Vec::new();
        let vec = counts.get(&tag).unwrap_or(&empty);
        let mut missing = 0;
        let mut duplicates = 0;
        for &seq in expected {
            match vec.get(seq).copied().unwrap_or(0) {
                0 => missing += 1,
                n => duplicates += u64::from(n - 1),
            }
        }
        (missing, duplicates)
    }
}

pub fn parse_tag_seq(text: &str) -> Option<(u32, usize)> {
    let (tag, seq) = text.split_once('.')?;
    Some((tag.parse().ok()?, seq.parse().ok()?))
}

pub async fn start_subscriber(port: u16, filter: String, arrivals: Arc<Arrivals>) -> AsyncClient {
    let mut options = MqttOptions::new(
        format!("bench-subscriber-{}", uuid::Uuid::new_v4().simple()),
        ("127.0.0.1", port),
    );
    options.set_max_packet_size(1 << 20, 1 << 20);
    options.set_keep_alive(30);
    let (client, mut eventloop) = AsyncClient::builder(options).capacity(1_000).build();
    let notice = client
        .subscribe_tracked(filter.clone(), QoS::AtLeastOnce)
        .await
        .expect("queue the subscribe");
    let task_client = client.clone();
    tokio::spawn(async move {
        let mut connacks = 0;
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::Publish(publish))) => arrivals.record(&publish.payload),
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    connacks += 1;
                    if connacks > 1 {
                        let _ = task_client.try_subscribe(filter.clone(), QoS::AtLeastOnce);
                    }
                }
                Ok(_) => {}
                Err(err) => {
                    *arrivals.errors.lock().expect("arrivals lock") = Some(err.to_string());
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(10), notice.wait_async())
        .await
        .expect("no SUBACK from mosquitto within 10 s")
        .expect("subscribe refused");
    client
}
