//! Test certificates generated with the `openssl` CLI (OpenSSL 3 syntax).
//!
//! One CA signs a server certificate for `localhost` and `127.0.0.1` and three client
//! certificates whose keys are in the three PEM formats the product must read:
//!
//! | field              | key file header                    | key            | CN            |
//! |--------------------|------------------------------------|----------------|---------------|
//! | `client_rsa_pkcs1` | `-----BEGIN RSA PRIVATE KEY-----`  | RSA 2048       | `device-rsa`  |
//! | `client_pkcs8`     | `-----BEGIN PRIVATE KEY-----`      | RSA 2048       | `device-pkcs8`|
//! | `client_ec_sec1`   | `-----BEGIN EC PRIVATE KEY-----`   | EC prime256v1  | `device-ec`   |
//!
//! A second, unrelated CA (`other_ca_crt`) exists for wrong-CA tests, and `untrusted_client`
//! (CN `device-untrusted`, EC key) is signed by it, for a client a mutual-TLS broker rejects.
//! Certificates are valid for 3 days from generation, X.509 v3, with the usual extensions
//! (CA: `basicConstraints CA:TRUE`, `keyCertSign`; server: `serverAuth`, SAN `DNS:localhost,
//! IP:127.0.0.1`; clients: `clientAuth`) so that webpki/rustls accept them.
//!
//! Keys are generated in parallel; a full set takes about a second. Use [`Certs::shared`] to
//! generate once per test process.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// A client certificate and its private key (both PEM files), and the certificate's CN.
#[derive(Clone, Debug)]
pub struct ClientCert {
    /// The certificate (PEM), signed by the CA that issued it.
    pub crt: PathBuf,
    /// The private key (PEM); its format depends on which field of [`Certs`] this is.
    pub key: PathBuf,
    /// The certificate's subject common name; Mosquitto with `use_identity_as_username` uses it
    /// as the username.
    pub cn: String,
}

impl ClientCert {
    /// The certificate's PEM bytes.
    pub fn crt_pem(&self) -> Vec<u8> {
        read(&self.crt)
    }

    /// The private key's PEM bytes.
    pub fn key_pem(&self) -> Vec<u8> {
        read(&self.key)
    }
}

/// Paths of a generated certificate set; see the module documentation.
#[derive(Clone, Debug)]
pub struct Certs {
    /// The directory holding every file.
    pub dir: PathBuf,
    /// The test CA's certificate (PEM): the `root-ca-crt` that trusts the server.
    pub ca_crt: PathBuf,
    /// The test CA's private key (PKCS#8 PEM), in case a test wants to sign more.
    pub ca_key: PathBuf,
    /// Server certificate for CN `localhost`, SAN `DNS:localhost, IP:127.0.0.1`, signed by the CA.
    pub server_crt: PathBuf,
    /// The server certificate's key (RSA, PKCS#8 PEM).
    pub server_key: PathBuf,
    /// An unrelated CA's certificate: trusting only it must fail the handshake with our server.
    pub other_ca_crt: PathBuf,
    /// Client certificate with a PKCS#1 RSA key (`BEGIN RSA PRIVATE KEY`), CN `device-rsa`.
    pub client_rsa_pkcs1: ClientCert,
    /// Client certificate with a PKCS#8 RSA key (`BEGIN PRIVATE KEY`), CN `device-pkcs8`.
    pub client_pkcs8: ClientCert,
    /// Client certificate with a SEC1 EC P-256 key (`BEGIN EC PRIVATE KEY`), CN `device-ec`.
    pub client_ec_sec1: ClientCert,
    /// Client certificate signed by the *other* CA (EC key), CN `device-untrusted`: a broker
    /// that requires certificates from our CA rejects it.
    pub untrusted_client: ClientCert,
}

impl Certs {
    /// Generates a full set into `dir` (which must exist). Panics with openssl's output if a
    /// command fails.
    pub fn generate(dir: &Path) -> Certs {
        let p = |name: &str| dir.join(name);
        const OUT: &str = "{out}";
        // 1. Keys, in parallel (RSA generation dominates the cost).
        let keys: [(&str, &[&str]); 7] = [
            (
                "ca.key",
                &[
                    "genpkey",
                    "-algorithm",
                    "RSA",
                    "-pkeyopt",
                    "rsa_keygen_bits:2048",
                ],
            ),
            (
                "other-ca.key",
                &[
                    "genpkey",
                    "-algorithm",
                    "EC",
                    "-pkeyopt",
                    "ec_paramgen_curve:P-256",
                ],
            ),
            (
                "server.key",
                &[
                    "genpkey",
                    "-algorithm",
                    "RSA",
                    "-pkeyopt",
                    "rsa_keygen_bits:2048",
                ],
            ),
            // genrsa wants the bit count last.
            (
                "client-rsa.key",
                &["genrsa", "-traditional", "-out", OUT, "2048"],
            ),
            (
                "client-pkcs8.key",
                &[
                    "genpkey",
                    "-algorithm",
                    "RSA",
                    "-pkeyopt",
                    "rsa_keygen_bits:2048",
                ],
            ),
            (
                "client-ec.key",
                &["ecparam", "-name", "prime256v1", "-genkey", "-noout"],
            ),
            (
                "untrusted.key",
                &[
                    "genpkey",
                    "-algorithm",
                    "EC",
                    "-pkeyopt",
                    "ec_paramgen_curve:P-256",
                ],
            ),
        ];
        std::thread::scope(|s| {
            for (file, args) in keys {
                let out = p(file);
                s.spawn(move || {
                    let out_s = out.to_str().expect("utf-8 path");
                    let mut a: Vec<&str> = args
                        .iter()
                        .map(|&x| if x == OUT { out_s } else { x })
                        .collect();
                    if !args.contains(&OUT) {
                        a.extend(["-out", out_s]);
                    }
                    openssl(&a);
                });
            }
        });
        expect_header(&p("client-rsa.key"), "-----BEGIN RSA PRIVATE KEY-----");
        expect_header(&p("client-pkcs8.key"), "-----BEGIN PRIVATE KEY-----");
        expect_header(&p("client-ec.key"), "-----BEGIN EC PRIVATE KEY-----");

        // 2. The two self-signed CAs.
        for (key, crt, cn) in [
            ("ca.key", "ca.crt", "mqtt-connector test CA"),
            ("other-ca.key", "other-ca.crt", "unrelated test CA"),
        ] {
            openssl(&[
                "req",
                "-x509",
                "-new",
                "-key",
                s(&p(key)),
                "-out",
                s(&p(crt)),
                "-days",
                "3",
                "-sha256",
                "-subj",
                &format!("/CN={cn}"),
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
                "-addext",
                "subjectKeyIdentifier=hash",
            ]);
        }

        // 3. Leaf certificates.
        std::fs::write(
            p("server.ext"),
            "basicConstraints=critical,CA:FALSE\n\
             keyUsage=critical,digitalSignature,keyEncipherment\n\
             extendedKeyUsage=serverAuth\n\
             subjectAltName=DNS:localhost,IP:127.0.0.1\n\
             authorityKeyIdentifier=keyid\n",
        )
        .expect("write server.ext");
        std::fs::write(
            p("client.ext"),
            "basicConstraints=critical,CA:FALSE\n\
             keyUsage=critical,digitalSignature,keyEncipherment\n\
             extendedKeyUsage=clientAuth\n\
             authorityKeyIdentifier=keyid\n",
        )
        .expect("write client.ext");
        let leaves = [
            ("server", "localhost", "ca", "server.ext"),
            ("client-rsa", "device-rsa", "ca", "client.ext"),
            ("client-pkcs8", "device-pkcs8", "ca", "client.ext"),
            ("client-ec", "device-ec", "ca", "client.ext"),
            ("untrusted", "device-untrusted", "other-ca", "client.ext"),
        ];
        std::thread::scope(|sc| {
            for (name, cn, ca, ext) in leaves {
                let p = &p;
                sc.spawn(move || {
                    let key = p(&format!("{name}.key"));
                    let csr = p(&format!("{name}.csr"));
                    let crt = p(&format!("{name}.crt"));
                    openssl(&[
                        "req",
                        "-new",
                        "-key",
                        s(&key),
                        "-subj",
                        &format!("/CN={cn}"),
                        "-out",
                        s(&csr),
                    ]);
                    let serial = format!("0x{}", &uuid::Uuid::new_v4().simple().to_string()[..16]);
                    openssl(&[
                        "x509",
                        "-req",
                        "-in",
                        s(&csr),
                        "-CA",
                        s(&p(&format!("{ca}.crt"))),
                        "-CAkey",
                        s(&p(&format!("{ca}.key"))),
                        "-set_serial",
                        &serial,
                        "-days",
                        "3",
                        "-sha256",
                        "-extfile",
                        s(&p(ext)),
                        "-out",
                        s(&crt),
                    ]);
                });
            }
        });

        let client = |name: &str, cn: &str| ClientCert {
            crt: p(&format!("{name}.crt")),
            key: p(&format!("{name}.key")),
            cn: cn.to_string(),
        };
        Certs {
            dir: dir.to_path_buf(),
            ca_crt: p("ca.crt"),
            ca_key: p("ca.key"),
            server_crt: p("server.crt"),
            server_key: p("server.key"),
            other_ca_crt: p("other-ca.crt"),
            client_rsa_pkcs1: client("client-rsa", "device-rsa"),
            client_pkcs8: client("client-pkcs8", "device-pkcs8"),
            client_ec_sec1: client("client-ec", "device-ec"),
            untrusted_client: client("untrusted", "device-untrusted"),
        }
    }

    /// One certificate set per test process, generated on first use into a fresh directory under
    /// Cargo's `CARGO_TARGET_TMPDIR` (`target/tmp/certs-*`), which outlives the process: files a
    /// worker reads later are still there. Sets older than a day are removed then. Safe to call
    /// from many tests at once.
    pub fn shared() -> &'static Certs {
        static CERTS: OnceLock<Certs> = OnceLock::new();
        CERTS.get_or_init(|| {
            remove_stale_cert_dirs(Path::new(env!("CARGO_TARGET_TMPDIR")));
            let dir = tempfile::Builder::new()
                .prefix("certs-")
                .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
                .expect("create certs dir")
                .keep();
            Certs::generate(&dir)
        })
    }

    /// The CA certificate's PEM bytes.
    pub fn ca_pem(&self) -> Vec<u8> {
        read(&self.ca_crt)
    }

    /// The unrelated CA's PEM bytes.
    pub fn other_ca_pem(&self) -> Vec<u8> {
        read(&self.other_ca_crt)
    }

    /// The three client certificates signed by our CA, one per key format.
    pub fn clients(&self) -> [&ClientCert; 3] {
        [
            &self.client_rsa_pkcs1,
            &self.client_pkcs8,
            &self.client_ec_sec1,
        ]
    }
}

fn remove_stale_cert_dirs(tmp: &Path) {
    let day = std::time::Duration::from_secs(24 * 3600);
    for entry in std::fs::read_dir(tmp).into_iter().flatten().flatten() {
        let stale = entry
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > day);
        if stale && entry.file_name().to_string_lossy().starts_with("certs-") {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

fn s(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

fn expect_header(path: &Path, header: &str) {
    let text = String::from_utf8(read(path)).expect("PEM is UTF-8");
    assert!(
        text.starts_with(header),
        "{} should begin with {header}, begins with {:?}",
        path.display(),
        text.lines().next()
    );
}

fn openssl(args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run openssl {args:?}: {e}"));
    assert!(
        out.status.success(),
        "openssl {args:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
