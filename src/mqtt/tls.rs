//! TLS client configuration from a job's certificate paths: roots to trust, the client
//! certificate chain and key (PKCS#1, PKCS#8 or SEC1), and ALPN. Files are read when a
//! connection first needs them (they may be mounted after the worker starts), on a blocking
//! thread, and the configuration is shared by every connection with the same TLS settings.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use rustls::RootCertStore;
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::job::TlsSettings;

/// A certificate or key problem, in words that say which file and what to do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct TlsFileError(String);

/// A built configuration is used this long, then its files are read again (certificates are
/// rotated; connections already open keep theirs).
const REREAD_AFTER: Duration = Duration::from_secs(300);
/// Distinct TLS settings remembered at most (jobs may name many); beyond it the oldest go.
const MAX_CACHED: usize = 1024;

/// One `Arc<ClientConfig>` per distinct TLS setting, built off the runtime's threads.
#[derive(Default)]
pub struct TlsConfigs {
    cache: Mutex<HashMap<TlsSettings, (Instant, Arc<rustls::ClientConfig>)>>,
}

impl TlsConfigs {
    /// The configuration for these settings: cached, or built on a blocking thread (file
    /// reads and the system roots would otherwise stall the runtime). Failures are not cached:
    /// a file may appear later.
    pub async fn get(
        &self,
        settings: &TlsSettings,
    ) -> Result<Arc<rustls::ClientConfig>, TlsFileError> {
        if let Some((built, config)) = self.lock().get(settings)
            && built.elapsed() < REREAD_AFTER
        {
            return Ok(Arc::clone(config));
        }
        let owned = settings.clone();
        let config = tokio::task::spawn_blocking(move || client_config(&owned))
            .await
            .map_err(|err| {
                TlsFileError(format!("building the TLS configuration failed: {err}"))
            })??;
        let mut cache = self.lock();
        if cache.len() >= MAX_CACHED {
            let oldest = cache
                .iter()
                .min_by_key(|(_, (built, _))| *built)
                .map(|(settings, _)| settings.clone());
            if let Some(oldest) = oldest {
                cache.remove(&oldest);
            }
        }
        cache.insert(settings.clone(), (Instant::now(), Arc::clone(&config)));
        Ok(config)
    }

    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<TlsSettings, (Instant, Arc<rustls::ClientConfig>)>> {
        self.cache
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Builds the rustls configuration for one target. Blocking: reads files.
pub fn client_config(settings: &TlsSettings) -> Result<Arc<rustls::ClientConfig>, TlsFileError> {
    let roots = match &settings.root_ca {
        Some(path) => Arc::new(roots_from_file(path)?),
        None => system_roots()?,
    };
    let builder = rustls::ClientConfig::builder().with_root_certificates(roots);
    let mut config = match &settings.client_cert {
        Some(client) => {
            let chain = certificates(&client.certificate, "certificate")?;
            let key = private_key(&client.private_key)?;
            builder.with_client_auth_cert(chain, key).map_err(|err| {
                TlsFileError(format!(
                    "certificate {} and private-key {} do not form a usable pair: {err}",
                    client.certificate.display(),
                    client.private_key.display()
                ))
            })?
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = settings
        .alpn
        .iter()
        .map(|name| name.as_bytes().to_vec())
        .collect();
    Ok(Arc::new(config))
}

/// Checks that every file a TLS setting names can be read and parsed (for `check`).
pub fn check_files(settings: &TlsSettings) -> Vec<TlsFileError> {
    let mut problems = Vec::new();
    if let Some(path) = &settings.root_ca
        && let Err(err) = roots_from_file(path)
    {
        problems.push(err);
    }
    if let Some(client) = &settings.client_cert {
        if let Err(err) = certificates(&client.certificate, "certificate") {
            problems.push(err);
        }
        if let Err(err) = private_key(&client.private_key) {
            problems.push(err);
        }
    }
    problems
}

fn roots_from_file(path: &Path) -> Result<RootCertStore, TlsFileError> {
    let mut roots = RootCertStore::empty();
    for cert in certificates(path, "root-ca-crt")? {
        roots.add(cert).map_err(|err| {
            TlsFileError(format!(
                "root-ca-crt {}: not a usable CA certificate: {err}",
                path.display()
            ))
        })?;
    }
    Ok(roots)
}

/// The system's trusted roots, read once per process and shared, never copied.
fn system_roots() -> Result<Arc<RootCertStore>, TlsFileError> {
    static ROOTS: OnceLock<Arc<RootCertStore>> = OnceLock::new();
    let roots = ROOTS.get_or_init(|| {
        let mut roots = RootCertStore::empty();
        let found = rustls_native_certs::load_native_certs();
        roots.add_parsable_certificates(found.certs);
        Arc::new(roots)
    });
    if roots.is_empty() {
        return Err(TlsFileError(
            "no system CA certificates found: install ca-certificates or set root-ca-crt".into(),
        ));
    }
    Ok(Arc::clone(roots))
}

fn certificates(path: &Path, key: &str) -> Result<Vec<CertificateDer<'static>>, TlsFileError> {
    let bytes = read(path, key)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| {
            TlsFileError(format!(
                "{key} {}: not a PEM certificate: {}",
                path.display(),
                pem_reason(&err)
            ))
        })?;
    if certs.is_empty() {
        return Err(TlsFileError(format!(
            "{key} {}: holds no PEM certificate (expected -----BEGIN CERTIFICATE-----)",
            path.display()
        )));
    }
    Ok(certs)
}

fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsFileError> {
    let bytes = read(path, "private-key")?;
    if bytes.windows(b"ENCRYPTED".len()).any(|w| w == b"ENCRYPTED") {
        return Err(TlsFileError(format!(
            "private-key {}: encrypted keys are not supported; decrypt it (openssl pkey -in KEY -out KEY.plain)",
            path.display()
        )));
    }
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|err| {
        TlsFileError(format!(
            "private-key {}: no usable key (PEM PKCS#1 RSA, PKCS#8 or SEC1 EC expected): {}",
            path.display(),
            pem_reason(&err)
        ))
    })
}

fn read(path: &Path, key: &str) -> Result<Vec<u8>, TlsFileError> {
    let cannot = |err: std::io::Error| {
        TlsFileError(format!("{key} {}: cannot be read: {err}", path.display()))
    };
    // Beneath its --job-files folder when it lies in one (no symlink swapped in since the job
    // was admitted leads out); the checks and the bytes come from that one open handle.
    let mut file = crate::policy::open_file(path).map_err(cannot)?;
    if file.metadata().map_err(cannot)?.is_dir() {
        return Err(TlsFileError(format!(
            "{key} {}: is a directory, not a file",
            path.display()
        )));
    }
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(&mut file, &mut bytes).map_err(cannot)?;
    Ok(bytes)
}

/// The PEM error without echoing file contents (a key must never reach a message).
fn pem_reason(err: &pem::Error) -> &'static str {
    match err {
        pem::Error::NoItemsFound => "no PEM section found",
        pem::Error::MissingSectionEnd { .. } => "a PEM section has no END line",
        pem::Error::IllegalSectionStart { .. } => "a PEM section start is malformed",
        pem::Error::Base64Decode(_) => "a PEM section is not valid base64",
        _ => "unreadable PEM",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::ClientCert;

    fn settings(dir: &Path, cert: &str, key: &str) -> TlsSettings {
        std::fs::write(dir.join("c.pem"), cert).expect("write");
        std::fs::write(dir.join("k.pem"), key).expect("write");
        TlsSettings {
            root_ca: Some(dir.join("c.pem")),
            client_cert: Some(ClientCert {
                certificate: dir.join("c.pem"),
                private_key: dir.join("k.pem"),
            }),
            alpn: vec![],
        }
    }

    use crate::test_support::{CHILD_EXPECTS, run_in_child};

    #[test]
    fn system_roots_are_what_ssl_cert_file_names_and_none_is_an_error() {
        let no_ca = TlsSettings {
            root_ca: None,
            client_cert: None,
            alpn: vec![],
        };
        match std::env::var(CHILD_EXPECTS).as_deref() {
            Ok("one") => {
                crate::install_crypto_provider();
                assert_eq!(system_roots().expect("roots").len(), 1);
                client_config(&no_ca).expect("a configuration from the system roots");
            }
            Ok("none") => {
                let err = client_config(&no_ca).expect_err("no roots").to_string();
                assert!(err.contains("no system CA certificates"), "{err}");
            }
            _ => {
                let dir = tempfile::tempdir().expect("tempdir");
                let ca =
                    rcgen::generate_simple_self_signed(vec!["test-ca".to_owned()]).expect("rcgen");
                std::fs::write(dir.path().join("ca.pem"), ca.cert.pem()).expect("write ca");
                let empty = dir.path().join("empty.pem");
                std::fs::write(&empty, "").expect("write");
                let name = "mqtt::tls::tests::system_roots_are_what_ssl_cert_file_names_and_none_is_an_error";
                run_in_child(name, &dir.path().join("ca.pem"), "one");
                run_in_child(name, &empty, "none");
            }
        }
    }

    #[test]
    fn a_missing_file_is_named_and_its_key_too() {
        let dir = tempfile::tempdir().expect("tempdir");
        let settings = TlsSettings {
            root_ca: Some(dir.path().join("absent.crt")),
            client_cert: None,
            alpn: vec![],
        };
        let err = client_config(&settings).expect_err("missing").to_string();
        assert!(
            err.contains("root-ca-crt") && err.contains("absent.crt"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn one_configuration_is_shared_by_every_connection_with_the_same_settings() {
        crate::install_crypto_provider();
        // A CA file the test writes rather than the system roots, which a machine may lack.
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = rcgen::generate_simple_self_signed(vec!["test-ca".to_owned()]).expect("rcgen");
        std::fs::write(dir.path().join("ca.pem"), ca.cert.pem()).expect("write ca");
        let settings = TlsSettings {
            root_ca: Some(dir.path().join("ca.pem")),
            client_cert: None,
            alpn: vec!["mqtt".into()],
        };
        let configs = TlsConfigs::default();
        let a = configs.get(&settings).await.expect("first build");
        // Once built, the file is not read again: removing it changes nothing.
        std::fs::remove_file(dir.path().join("ca.pem")).expect("remove ca");
        let b = configs.get(&settings).await.expect("from the cache");
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!(a.alpn_protocols, vec![b"mqtt".to_vec()]);
        // Other settings are another configuration, built from the files again.
        let other = TlsSettings {
            alpn: vec![],
            ..settings
        };
        let err = configs.get(&other).await.expect_err("the CA file is gone");
        assert!(err.to_string().contains("root-ca-crt"), "{err}");
        std::fs::write(dir.path().join("ca.pem"), ca.cert.pem()).expect("write ca");
        let c = configs.get(&other).await.expect("built again");
        assert!(!Arc::ptr_eq(&a, &c));
        assert!(c.alpn_protocols.is_empty());
    }

    #[test]
    fn a_directory_is_not_a_certificate() {
        let dir = tempfile::tempdir().expect("tempdir");
        let settings = TlsSettings {
            root_ca: Some(dir.path().to_owned()),
            client_cert: None,
            alpn: vec![],
        };
        assert!(
            client_config(&settings)
                .expect_err("dir")
                .to_string()
                .contains("directory")
        );
    }

    #[test]
    fn an_encrypted_key_says_so_and_never_echoes_the_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = "-----BEGIN ENCRYPTED PRIVATE KEY-----\nU0VDUkVUS0VZ\n-----END ENCRYPTED PRIVATE KEY-----\n";
        let problems = check_files(&settings(dir.path(), "junk", key));
        let text = format!("{problems:?}");
        assert!(text.contains("encrypted"), "{text}");
        assert!(!text.contains("U0VDUkVUS0VZ"), "{text}");
    }
}
