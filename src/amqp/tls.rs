//! TLS to RabbitMQ (`amqps://`): the roots to verify the server against (the system's, or
//! `--amqp-ca` alone) and an optional client certificate (`--amqp-cert`, `--amqp-key`), which
//! `?auth_mechanism=external` in the URL turns into the login. Read once, when the worker or
//! client starts, into one shared rustls configuration.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// The TLS files named on the command line (all optional).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsFiles {
    /// CA certificate(s) to trust instead of the system's roots (PEM).
    pub ca: Option<PathBuf>,
    /// Client certificate chain (PEM).
    pub cert: Option<PathBuf>,
    /// The client certificate's key (PEM: PKCS#1, PKCS#8 or SEC1).
    pub key: Option<PathBuf>,
}

/// Why the TLS settings for RabbitMQ cannot be used; each names the option and the file.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{option} {}: cannot read it", path.display())]
    Read {
        option: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{option} {}: not PEM", path.display())]
    Pem {
        option: &'static str,
        path: PathBuf,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("{option} {}: holds no PEM certificate (expected -----BEGIN CERTIFICATE-----)", path.display())]
    NoCertificate { option: &'static str, path: PathBuf },
    #[error("--amqp-ca {}: not a usable CA certificate", path.display())]
    BadCa {
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("--amqp-cert and --amqp-key go together: give both or neither")]
    HalfIdentity,
    #[error("--amqp-cert {} and --amqp-key {} do not form a usable pair", cert.display(), key.display())]
    BadIdentity {
        cert: PathBuf,
        key: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error(
        "no system CA certificates found for amqps://: install ca-certificates or give --amqp-ca"
    )]
    NoSystemRoots,
}

impl TlsFiles {
    /// Whether any TLS option was given.
    pub fn is_empty(&self) -> bool {
        self.ca.is_none() && self.cert.is_none() && self.key.is_none()
    }

    /// Reads the files into one client configuration. Blocking file reads: call it at start-up
    /// (or in `spawn_blocking`), not per connection.
    pub fn client_config(&self) -> Result<Arc<rustls::ClientConfig>, TlsError> {
        let roots = match &self.ca {
            Some(path) => roots_from_file(path)?,
            None => system_roots()?,
        };
        let builder = rustls::ClientConfig::builder().with_root_certificates(roots);
        let config = match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => {
                let chain = certificates("--amqp-cert", cert)?;
                let private_key = private_key(key)?;
                builder
                    .with_client_auth_cert(chain, private_key)
                    .map_err(|source| TlsError::BadIdentity {
                        cert: cert.clone(),
                        key: key.clone(),
                        source,
                    })?
            }
            (None, None) => builder.with_no_client_auth(),
            _ => return Err(TlsError::HalfIdentity),
        };
        Ok(Arc::new(config))
    }
}

fn read(option: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        option,
        path: path.to_owned(),
        source,
    })
}

fn certificates(
    option: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = read(option, path)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::Pem {
            option,
            path: path.to_owned(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            option,
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let bytes = read("--amqp-key", path)?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|source| TlsError::Pem {
        option: "--amqp-key",
        path: path.to_owned(),
        source,
    })
}

/// Only the given CA: a server with a certificate from any other authority is refused.
fn roots_from_file(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in certificates("--amqp-ca", path)? {
        roots.add(cert).map_err(|source| TlsError::BadCa {
            path: path.to_owned(),
            source,
        })?;
    }
    Ok(roots)
}

fn system_roots() -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
    if roots.is_empty() {
        return Err(TlsError::NoSystemRoots);
    }
    Ok(roots)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A self-signed certificate as `--amqp-ca`, so the roots load from a file the test
    /// controls and never from the machine's (which may have none).
    fn ca_file(dir: &Path) -> PathBuf {
        let ca = rcgen::generate_simple_self_signed(vec!["test-ca".to_owned()]).expect("rcgen");
        let path = dir.join("ca.pem");
        std::fs::write(&path, ca.cert.pem()).expect("write ca");
        path
    }

    use crate::test_support::{CHILD_EXPECTS, run_in_child};

    #[test]
    fn system_roots_are_what_ssl_cert_file_names_and_none_is_an_error() {
        match std::env::var(CHILD_EXPECTS).as_deref() {
            Ok("one") => {
                crate::install_crypto_provider();
                assert_eq!(system_roots().expect("roots").len(), 1);
                TlsFiles::default()
                    .client_config()
                    .expect("a configuration from the system roots");
            }
            Ok("none") => {
                let err = TlsFiles::default().client_config().expect_err("no roots");
                assert!(matches!(err, TlsError::NoSystemRoots), "{err:?}");
            }
            _ => {
                let dir = tempfile::tempdir().expect("tempdir");
                let name = "amqp::tls::tests::system_roots_are_what_ssl_cert_file_names_and_none_is_an_error";
                run_in_child(name, &ca_file(dir.path()), "one");
                let empty = dir.path().join("empty.pem");
                std::fs::write(&empty, "").expect("write");
                run_in_child(name, &empty, "none");
            }
        }
    }

    #[test]
    fn a_certificate_without_its_key_is_refused() {
        crate::install_crypto_provider();
        let dir = tempfile::tempdir().expect("tempdir");
        let files = TlsFiles {
            ca: Some(ca_file(dir.path())),
            cert: Some("/nonexistent/cert.pem".into()),
            ..TlsFiles::default()
        };
        let err = files.client_config().expect_err("half an identity");
        assert!(matches!(err, TlsError::HalfIdentity), "{err:?}");
    }

    #[test]
    fn a_key_without_its_certificate_is_refused() {
        crate::install_crypto_provider();
        let dir = tempfile::tempdir().expect("tempdir");
        let files = TlsFiles {
            ca: Some(ca_file(dir.path())),
            key: Some("/nonexistent/key.pem".into()),
            ..TlsFiles::default()
        };
        let err = files.client_config().expect_err("half an identity");
        assert!(matches!(err, TlsError::HalfIdentity), "{err:?}");
    }

    #[test]
    fn a_ca_file_alone_is_a_usable_configuration() {
        // The control for the two refusals above: the same CA without a half identity builds.
        crate::install_crypto_provider();
        let dir = tempfile::tempdir().expect("tempdir");
        let files = TlsFiles {
            ca: Some(ca_file(dir.path())),
            ..TlsFiles::default()
        };
        let config = files.client_config().expect("a CA alone is enough");
        assert!(!config.client_auth_cert_resolver.has_certs());
    }

    #[test]
    fn a_missing_ca_file_names_the_option_and_keeps_the_io_error() {
        let files = TlsFiles {
            ca: Some("/nonexistent/ca.pem".into()),
            ..TlsFiles::default()
        };
        let err = files.client_config().expect_err("missing file");
        assert!(err.to_string().contains("--amqp-ca /nonexistent/ca.pem"));
        let source = std::error::Error::source(&err).expect("io error kept");
        assert!(source.is::<std::io::Error>());
    }
}
