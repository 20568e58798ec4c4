//! The client examples of `examples/` run as a user runs them, against a real worker (in this
//! process, with the shipped `config/connectors`, so the `local` connector too) and the
//! machine's Mosquitto: documentation that cannot rot.
//!
//! For each of `examples/python/submit.py` (pika) and `examples/node/submit.js` (amqplib):
//! a job through connector `local` is answered 0, its content reaches an MQTT subscriber, and
//! the process exits 0; a job naming an unknown connector makes it exit 2 (the job's exit-code);
//! a queue that does not exist is an error, not a silent loss. With `--response-topic` each sends
//! a `request` to a real device (over MQTT 3.1.1 and 5) and prints its answer. The two Python
//! (paho-mqtt) devices of docs/requests.md run as written, with a private Mosquitto's address
//! put in, and answer requests sent through a worker. Without python3 and pika (and paho-mqtt),
//! or node and amqplib, the tests fail and say to run `scripts/test`, which installs them.

mod common;

use common::worker::spawn_worker_with;
use common::*;
use mqtt_connector::worker::WorkerOptions;
use rumqttc::QoS;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(20);

fn repository() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// One example client: how to run it and how to tell whether it can run here.
struct Example {
    name: &'static str,
    program: &'static str,
    script: &'static str,
}

const PYTHON: Example = Example {
    name: "python",
    program: "python3",
    script: "examples/python/submit.py",
};

const NODE: Example = Example {
    name: "node",
    program: "node",
    script: "examples/node/submit.js",
};

impl Example {
    /// Panics, saying what is missing and how to get it, unless the example can run.
    fn require(&self) {
        let (check, what): (Vec<&str>, &str) = match self.program {
            "python3" => (vec!["-c", "import pika"], "python3 with pika"),
            _ => (
                vec!["-e", "require('amqplib')"],
                "node with amqplib in examples/node/node_modules",
            ),
        };
        let ran = Command::new(self.program)
            .args(&check)
            .current_dir(repository().join(Path::new(self.script).parent().expect("a folder")))
            .stdin(Stdio::null())
            .output();
        let ok = matches!(&ran, Ok(out) if out.status.success());
        assert!(
            ok,
            "the {} example needs {what}: run scripts/test, which installs it ({:?})",
            self.name,
            ran.map(|out| String::from_utf8_lossy(&out.stderr).into_owned())
        );
    }

    /// Runs the example with `args` (60 s at most), off the async threads.
    async fn run(&self, args: &[String]) -> Output {
        let mut command = Command::new(self.program);
        command
            .arg(self.script)
            .args(args)
            .current_dir(repository())
            .env_remove("MQTT_CONNECTOR_AMQP_URL")
            .env_remove("MQTT_CONNECTOR_QUEUE")
            .stdin(Stdio::null());
        let described = format!("{} {} {args:?}", self.program, self.script);
        let started = Instant::now();
        let output = tokio::time::timeout(
            Duration::from_secs(60),
            tokio::task::spawn_blocking(move || command.output()),
        )
        .await
        .unwrap_or_else(|_| panic!("{described} did not finish within 60 s"))
        .expect("join")
        .unwrap_or_else(|e| panic!("run {described}: {e}"));
        eprintln!(
            "{described}: exit {:?} in {:.0} ms",
            output.status.code(),
            started.elapsed().as_secs_f64() * 1e3
        );
        output
    }
}

/// The reply the example printed (the last line of its stdout).
fn printed_reply(output: &Output) -> serde_json::Value {
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(line).unwrap_or_else(|e| {
        panic!(
            "stdout is not a reply ({e}): {stdout:?}; stderr: {}",
            String::from_utf8_lossy(&output.stderr)
        )
    })
}

/// A worker on `queue` with the shipped connectors (so `local`: the machine's Mosquitto).
async fn shipped_worker(queue: &str) -> common::worker::RunningWorker {
    let mut options = WorkerOptions::new(
        amqp_url(),
        queue.to_owned(),
        repository().join("config/connectors"),
    );
    options.metrics_addr = Some("127.0.0.1:0".parse().expect("socket address"));
    // The shipped `local` connector has one client-id: a suffix keeps this worker from taking
    // it over from any other worker on this machine (scripts/run-local, say).
    options.mqtt.client_id_suffix = format!("-{}", unique_name("test"));
    spawn_worker_with(options).await
}

async fn example_sends_a_request_and_prints_the_answer(example: Example) {
    example.require();
    let queue = unique_name(&format!("examples-requests-{}", example.name));
    let worker = shipped_worker(&queue).await;
    let commands = unique_name(&format!("examples/{}/cmd", example.name));
    let device = Device::start(1883, &commands).await;
    for version in ["3.1.1", "5"] {
        let response = unique_name(&format!("examples/{}/answer", example.name));
        let say = format!("meter 42 over {version}");
        let content = serde_json::json!({"say": say, "reply": response}).to_string();
        let args = [
            "--amqp-url",
            &amqp_url(),
            "--queue",
            &queue,
            "--topic",
            &commands,
            "--content",
            &content,
            "--response-topic",
            &response,
            "--mqtt-version",
            version,
            "--timeout",
            "10000",
        ]
        .map(str::to_owned);
        let out = example.run(&args).await;
        let reply = printed_reply(&out);
        assert_eq!(reply["exit-code"], 0, "{reply}");
        assert_eq!(out.status.code(), Some(0), "{reply}");
        assert_eq!(reply["response"]["topic"], response.as_str(), "{reply}");
        assert_eq!(reply["response"]["content"], say.as_str(), "{reply}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains(&format!("answer on {response}: ")) && stderr.contains(&say),
            "the answer shown: {stderr}"
        );
        if version == "5" {
            assert!(
                stderr.contains("device: d1"),
                "user properties shown: {stderr}"
            );
        }
    }
    assert_eq!(device.received(), 2, "one command per request");
    worker.stop().await;
    Amqp::connect().await.delete_queue(&queue).await;
}

async fn example_submits_and_exits_with_the_exit_code(example: Example) {
    example.require();
    let queue = unique_name(&format!("examples-{}", example.name));
    let worker = shipped_worker(&queue).await;
    let topic = unique_name(&format!("examples/{}", example.name));
    let mut sub = Subscriber::start(1883, &topic, QoS::AtLeastOnce).await;
    let content = unique_name("hello");
    let url = amqp_url();

    // Every option given, so nothing comes from this process' environment.
    let submit = |queue: &str, connector: &str| -> Vec<String> {
        [
            "--amqp-url",
            &url,
            "--queue",
            queue,
            "--connector",
            connector,
            "--topic",
            &topic,
            "--content",
            &content,
        ]
        .map(str::to_owned)
        .to_vec()
    };

    // A job through connector `local`: answered 0, received, exit status 0.
    let out = example.run(&submit(&queue, "local")).await;
    let reply = printed_reply(&out);
    assert_eq!(reply["exit-code"], 0, "{reply}");
    assert_eq!(out.status.code(), Some(0), "{reply}");
    assert_eq!(sub.expect(T).await.payload_str(), content);

    // An unknown connector: the job's exit-code 2 is the process' exit status.
    let out = example.run(&submit(&queue, "no-such-connector")).await;
    let reply = printed_reply(&out);
    assert_eq!(reply["exit-code"], 2, "{reply}");
    assert_eq!(out.status.code(), Some(2), "{reply}");

    // No such queue: an error on stderr and exit status 1, not a job lost in silence.
    let out = example
        .run(&submit(&unique_name("no-such-queue"), "local"))
        .await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    assert!(stderr.contains("no queue"), "stderr: {stderr}");

    assert!(
        sub.recv(Duration::from_millis(200)).await.is_none(),
        "one message only"
    );
    worker.stop().await;
    Amqp::connect().await.delete_queue(&queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_example_submits_a_job_and_exits_with_its_exit_code() {
    example_submits_and_exits_with_the_exit_code(PYTHON).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_example_submits_a_job_and_exits_with_its_exit_code() {
    example_submits_and_exits_with_the_exit_code(NODE).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_example_sends_a_request_and_prints_the_answer() {
    example_sends_a_request_and_prints_the_answer(PYTHON).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_example_sends_a_request_and_prints_the_answer() {
    example_sends_a_request_and_prints_the_answer(NODE).await;
}

/// The Python programs of docs/requests.md that answer requests (those defining `on_message`).
fn documented_devices() -> Vec<String> {
    let path = repository().join("docs/requests.md");
    let text =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    text.split("```python\n")
        .skip(1)
        .filter_map(|block| block.split("\n```").next())
        .filter(|block| block.contains("def on_message"))
        .map(str::to_owned)
        .collect()
}

/// Run before a documented device: says `subscribed` on stdout once its SUBACK came, so the test
/// awaits that instead of guessing when the device listens. The device's code is unchanged.
const SUBSCRIBED_PRELUDE: &str = r#"
import paho.mqtt.client as _paho
_init = _paho.Client.__init__
def _init_saying_subscribed(self, *args, **kwargs):
    _init(self, *args, **kwargs)
    self.on_subscribe = lambda *_: print("subscribed", flush=True)
_paho.Client.__init__ = _init_saying_subscribed
"#;

/// A documented device running as a child process; killed on drop.
struct DocumentedDevice(std::process::Child);

impl DocumentedDevice {
    /// Starts `program` against the broker on 127.0.0.1:`port` and returns once it subscribed.
    async fn start(program: &str, port: u16) -> DocumentedDevice {
        let documented = r#"client.connect("mqtt.plant-a", 1883)"#;
        assert!(
            program.contains(documented),
            "the device connects: {program}"
        );
        let program = program.replace(
            documented,
            &format!(r#"client.connect("127.0.0.1", {port})"#),
        );
        let mut child = Command::new("python3")
            .args(["-c", &format!("{SUBSCRIBED_PRELUDE}\n{program}")])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("run python3");
        let stdout = child.stdout.take().expect("stdout");
        let subscribed = tokio::task::spawn_blocking(move || {
            use std::io::BufRead;
            std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
                .any(|line| line == "subscribed")
        });
        let device = DocumentedDevice(child);
        let ok = tokio::time::timeout(T, subscribed).await;
        assert!(
            matches!(ok, Ok(Ok(true))),
            "the documented device did not subscribe within {T:?}: {program}"
        );
        device
    }
}

impl Drop for DocumentedDevice {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_documented_python_devices_answer_requests_over_mqtt_5_and_3_1_1() {
    let check = Command::new("python3")
        .args(["-c", "import paho.mqtt.client"])
        .output();
    assert!(
        matches!(&check, Ok(out) if out.status.success()),
        "the documented devices need python3 with paho-mqtt 2 (pip install paho-mqtt)"
    );
    let devices = documented_devices();
    assert_eq!(
        devices.len(),
        2,
        "an MQTT 5 and a 3.1.1 device: {devices:?}"
    );
    let broker = Mosquitto::plain();
    let mut bed = common::worker::TestBed::new().await;
    for (program, version) in devices.iter().zip(["5", "3.1.1"]) {
        assert!(
            program.contains(if version == "5" { "MQTTv5" } else { "MQTTv311" }),
            "{program}"
        );
        let _device = DocumentedDevice::start(program, broker.port()).await;
        let answers = unique_name("devices/meter-7/answers");
        let job = json!({
            "broker": broker.url(), "client-id": unique_name("worker"),
            "topic": "devices/meter-7/commands", "qos": 1, "timeout": 10000,
            "action": "request", "mqtt-version": version,
            "response-topic": answers,
            "content": json!({"read": "energy", "reply": answers}).to_string(),
        });
        let reply = bed.run(job, T).await;
        assert_eq!(reply.exit_code(), 0, "{version}: {}", reply.body);
        let response = &reply.body["response"];
        assert_eq!(response["content"], r#"{"energy": 1234}"#, "{}", reply.body);
        assert_eq!(response["topic"], answers.as_str(), "{}", reply.body);
        if version == "5" {
            assert_eq!(
                response["content-type"], "application/json",
                "{}",
                reply.body
            );
        }
    }
    bed.finish().await;
}
