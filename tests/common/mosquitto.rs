//! A Mosquitto broker owned by one test: its own port, config file, log and (for the password
//! kind) password file, all in a temporary directory.
//!
//! `mosquitto -c mosquitto.conf` runs in the foreground as a child process. The constructors
//! return once the port accepts TCP connections (polled with a 10 s deadline); if the process
//! exits first (e.g. someone took the port between [`free_port`] and the bind) it is started
//! again on another port, up to 5 times. The broker is killed when the value is dropped.
//!
//! Config notes (Mosquitto 2.0.11): listeners bind `127.0.0.1` only; `user root` keeps the
//! broker from dropping privileges to the `mosquitto` user when the tests run as root (it could
//! not read the temp directory otherwise; the option is ignored when not run as root);
//! `log_dest file DIR/mosquitto.log` with connection messages, see [`Mosquitto::log`].
//!
//! The methods are synchronous and block for the few milliseconds the broker needs to start;
//! call them from `#[tokio::test(flavor = "multi_thread")]` tests (they do not need a runtime).

use super::certs::Certs;
use super::free_port;
use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Clone, Debug, PartialEq, Eq)]
enum Kind {
    Plain,
    Password,
    Tls,
    MutualTls,
}

/// A running (or killed, until [`Mosquitto::restart`]) Mosquitto broker; see the module docs.
pub struct Mosquitto {
    dir: tempfile::TempDir,
    conf: PathBuf,
    port: u16,
    kind: Kind,
    body: String,
    child: Option<Child>,
}

impl Mosquitto {
    /// Plain TCP, anonymous access. [`url`](Self::url): `tcp://127.0.0.1:PORT`.
    pub fn plain() -> Mosquitto {
        Self::start(Kind::Plain, "allow_anonymous true\n".to_string(), |_| {})
    }

    /// Like [`plain`](Self::plain) with more config lines (e.g. `"max_packet_size 1000\n"`).
    pub fn plain_with(lines: &str) -> Mosquitto {
        Self::start(
            Kind::Plain,
            format!("allow_anonymous true\n{lines}"),
            |_| {},
        )
    }

    /// Plain TCP, `allow_anonymous false`, one user with this password (password file made with
    /// `mosquitto_passwd -b -c`, or written directly as a `$6$` SHA-512 entry when the tool is
    /// missing). A wrong password gets CONNACK code 5 (not authorized).
    pub fn with_password(user: &str, pass: &str) -> Mosquitto {
        Self::with_password_impl(user, pass, which("mosquitto_passwd"))
    }

    /// Like [`with_password`](Self::with_password) but always writes the password file itself
    /// (the fallback used when `mosquitto_passwd` is not installed); exists to test that path.
    pub fn with_generated_password(user: &str, pass: &str) -> Mosquitto {
        Self::with_password_impl(user, pass, false)
    }

    fn with_password_impl(user: &str, pass: &str, use_tool: bool) -> Mosquitto {
        let (user, pass) = (user.to_string(), pass.to_string());
        Self::start(
            Kind::Password,
            "allow_anonymous false\npassword_file {DIR}/passwd\n".to_string(),
            move |dir| write_password_file(&dir.join("passwd"), &user, &pass, use_tool),
        )
    }

    /// Like [`with_password`](Self::with_password), plus an ACL file holding `acl` (Mosquitto's
    /// `acl_file` syntax, e.g. `"user alice\ntopic readwrite allowed/#\n"`): the user may use
    /// only the topics it grants. MQTT 5 clients get reason code 0x87 for a denied publish.
    pub fn with_acl(user: &str, pass: &str, acl: &str) -> Mosquitto {
        let (user, pass, acl) = (user.to_string(), pass.to_string(), acl.to_string());
        Self::start(
            Kind::Password,
            "allow_anonymous false\npassword_file {DIR}/passwd\nacl_file {DIR}/acl\n".to_string(),
            move |dir| {
                write_password_file(&dir.join("passwd"), &user, &pass, which("mosquitto_passwd"));
                std::fs::write(dir.join("acl"), &acl).expect("write acl file");
            },
        )
    }

    /// TLS with our server certificate (`certfile`/`keyfile` from `certs`, `cafile` = our CA),
    /// no client certificate required, anonymous access. [`url`](Self::url):
    /// `ssl://localhost:PORT` (the server certificate is for `localhost` and `127.0.0.1`).
    pub fn tls(certs: &Certs) -> Mosquitto {
        Self::start(
            Kind::Tls,
            format!(
                "allow_anonymous true\n{}require_certificate false\n",
                tls_lines(certs)
            ),
            |_| {},
        )
    }

    /// Mutual TLS: like [`tls`](Self::tls) plus `require_certificate true` (a client certificate
    /// signed by our CA) and `use_identity_as_username true` (its CN is the username);
    /// `allow_anonymous false`.
    pub fn mutual_tls(certs: &Certs) -> Mosquitto {
        Self::start(
            Kind::MutualTls,
            format!(
                "allow_anonymous false\n{}require_certificate true\nuse_identity_as_username true\n",
                tls_lines(certs)
            ),
            |_| {},
        )
    }

    fn start(kind: Kind, body: String, prepare: impl Fn(&Path)) -> Mosquitto {
        let mut dir = tempfile::Builder::new()
            .prefix("mosquitto-")
            .tempdir()
            .expect("create mosquitto dir");
        prepare(dir.path());
        let body = body.replace("{DIR}", dir.path().to_str().expect("utf-8 path"));
        let mut last_log = String::new();
        for _ in 0..5 {
            let mut m = Mosquitto {
                conf: dir.path().join("mosquitto.conf"),
                dir,
                port: free_port(),
                kind: kind.clone(),
                body: body.clone(),
                child: None,
            };
            m.write_conf();
            match m.spawn_and_wait() {
                Ok(()) => return m,
                Err(log) => {
                    last_log = log;
                    dir = std::mem::replace(&mut m.dir, tempfile::tempdir().expect("tempdir"));
                }
            }
        }
        panic!("mosquitto did not start after 5 attempts; last log:\n{last_log}");
    }

    fn write_conf(&self) {
        let d = self.dir.path().to_str().expect("utf-8 path");
        let conf = format!(
            "# generated by the mqtt-connector test harness\n\
             user root\n\
             persistence false\n\
             log_dest file {d}/mosquitto.log\n\
             log_type error\nlog_type warning\nlog_type notice\nlog_type information\n\
             connection_messages true\n\
             log_timestamp_format %H:%M:%S\n\
             listener {port} 127.0.0.1\n\
             {body}",
            port = self.port,
            body = self.body
        );
        std::fs::write(&self.conf, conf).expect("write mosquitto.conf");
    }

    /// Starts the process and waits for the port; on failure returns the log and stderr.
    fn spawn_and_wait(&mut self) -> Result<(), String> {
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("stderr.log"))
            .expect("open stderr.log");
        let child = Command::new("mosquitto")
            .arg("-c")
            .arg(&self.conf)
            .stdin(Stdio::null())
            .stdout(stderr.try_clone().expect("clone fd"))
            .stderr(stderr)
            .spawn()
            .expect("spawn mosquitto (is it on PATH?)");
        self.child = Some(child);
        let addr: SocketAddr = ([127, 0, 0, 1], self.port).into();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                return Err(format!("mosquitto exited with {status}\n{}", self.log()));
            }
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                self.kill();
                return Err(format!(
                    "mosquitto did not listen on {addr} within 10 s\n{}",
                    self.log()
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The port it listens on (127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The host name to use in a broker URL: `localhost` for the TLS kinds (it is in the server
    /// certificate), `127.0.0.1` otherwise.
    pub fn host(&self) -> &'static str {
        match self.kind {
            Kind::Tls | Kind::MutualTls => "localhost",
            Kind::Plain | Kind::Password => "127.0.0.1",
        }
    }

    /// The broker URL for a job or connector: `tcp://127.0.0.1:PORT` or `ssl://localhost:PORT`.
    pub fn url(&self) -> String {
        match self.kind {
            Kind::Tls | Kind::MutualTls => format!("ssl://localhost:{}", self.port),
            Kind::Plain | Kind::Password => format!("tcp://127.0.0.1:{}", self.port),
        }
    }

    /// The directory holding the config, log and password files.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The broker's log (`mosquitto.log`, then anything it wrote to stdout/stderr).
    pub fn log(&self) -> String {
        let read = |f: &str| std::fs::read_to_string(self.dir.path().join(f)).unwrap_or_default();
        format!(
            "--- mosquitto.log ---\n{}--- stderr ---\n{}",
            read("mosquitto.log"),
            read("stderr.log")
        )
    }

    /// Whether the process is running (not killed, not exited).
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => c.try_wait().ok().flatten().is_none(),
            None => false,
        }
    }

    /// Kills the broker (SIGKILL, like a crash: no DISCONNECT, connections reset) and reaps it.
    /// Returns when the process is gone, so the port refuses connections. Idempotent.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the broker again on the same port with the same config (killing it first if it
    /// runs) and waits until the port accepts connections. Sessions are gone (no persistence).
    pub fn restart(&mut self) {
        self.kill();
        if let Err(log) = self.spawn_and_wait() {
            panic!("mosquitto did not restart on port {}: {log}", self.port);
        }
    }

    /// Freezes the process (SIGSTOP): the port still accepts TCP connections (the kernel
    /// completes the handshake) but the broker answers nothing: no CONNACK, no PUBACK.
    /// [`thaw`](Self::thaw) resumes it.
    pub fn freeze(&mut self) {
        self.signal("STOP");
    }

    /// Resumes a [`freeze`](Self::freeze)d broker (SIGCONT).
    pub fn thaw(&mut self) {
        self.signal("CONT");
    }

    fn signal(&mut self, sig: &str) {
        let pid = self.child.as_ref().expect("mosquitto is not running").id();
        let status = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(pid.to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{sig} {pid} failed");
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        self.kill();
    }
}

fn tls_lines(certs: &Certs) -> String {
    format!(
        "cafile {}\ncertfile {}\nkeyfile {}\n",
        certs.ca_crt.display(),
        certs.server_crt.display(),
        certs.server_key.display()
    )
}

fn which(tool: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(tool).is_file()))
}

/// Writes a Mosquitto password file with one user. With `use_tool`, runs
/// `mosquitto_passwd -b -c`; otherwise writes a `user:$6$SALT$HASH` line itself (SHA-512 of
/// password then salt, base64, which Mosquitto 2.0 accepts), hashing with the `openssl` CLI.
pub fn write_password_file(path: &Path, user: &str, pass: &str, use_tool: bool) {
    if use_tool {
        let out = Command::new("mosquitto_passwd")
            .arg("-b")
            .arg("-c")
            .arg(path)
            .arg(user)
            .arg(pass)
            .output()
            .expect("run mosquitto_passwd");
        assert!(
            out.status.success(),
            "mosquitto_passwd failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        return;
    }
    let salt: Vec<u8> = uuid::Uuid::new_v4().as_bytes()[..12].to_vec();
    let mut input = pass.as_bytes().to_vec();
    input.extend_from_slice(&salt);
    let mut child = Command::new("openssl")
        .args(["dgst", "-sha512", "-binary"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("run openssl dgst");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(&input)
        .expect("write to openssl");
    let out = child.wait_with_output().expect("openssl dgst");
    assert!(
        out.status.success() && out.stdout.len() == 64,
        "openssl dgst failed"
    );
    let line = format!("{user}:$6${}${}\n", base64(&salt), base64(&out.stdout));
    std::fs::write(path, line).expect("write password file");
}

fn base64(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(T[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}
