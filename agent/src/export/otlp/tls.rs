//! TLS of the OTLP exporter: one rustls client configuration (ring, no OpenSSL) for gRPC and
//! HTTP, read at start-up from the standard settings (`OTEL_EXPORTER_OTLP_CERTIFICATE`,
//! `_CLIENT_CERTIFICATE`, `_CLIENT_KEY`).
//!
//! Trusted roots: the CA bundle given, alone (as the OpenTelemetry SDKs do); without one, the
//! Mozilla root CAs compiled into the agent (webpki-roots). Compiled-in roots, not the host's
//! store: the agent's container image is Debian slim without a CA bundle, and a binary that
//! carries its roots behaves the same on every host. A private CA is what the certificate
//! setting is for.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::{self, PemObject as _};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// The TLS files a user gave (any may be unset).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM bundle of the CAs that may sign the collector's certificate.
    pub certificate: Option<PathBuf>,
    /// PEM certificate (chain) presented to a collector that asks for one (mTLS).
    pub client_certificate: Option<PathBuf>,
    /// PEM private key of `client_certificate`.
    pub client_key: Option<PathBuf>,
}

impl TlsFiles {
    pub fn any(&self) -> bool {
        self.certificate.is_some() || self.client_certificate.is_some() || self.client_key.is_some()
    }
}

/// Why the TLS files cannot be used. File contents never appear in the message (a key file,
/// or a wrong path naming some other secret).
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read the {what} {} ({setting}): {error}", path.display())]
    Read {
        what: &'static str,
        setting: &'static str,
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("the {what} {} ({setting}) {problem}", path.display())]
    Unusable {
        what: &'static str,
        setting: &'static str,
        path: PathBuf,
        problem: String,
    },
    #[error("the TLS library refused its configuration: {0}")]
    Setup(rustls::Error),
    #[error(
        "a client certificate for mTLS needs both files: {missing} is not set (the {given} is); \
         set both, or neither"
    )]
    HalfClientIdentity {
        missing: &'static str,
        given: &'static str,
    },
}

const CA: (&str, &str) = (
    "CA certificate file",
    "--otlp-certificate, OTEL_EXPORTER_OTLP_CERTIFICATE",
);
const CLIENT_CERT: (&str, &str) = (
    "client certificate file",
    "--otlp-client-certificate, OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE",
);
const CLIENT_KEY: (&str, &str) = (
    "client key file",
    "--otlp-client-key, OTEL_EXPORTER_OTLP_CLIENT_KEY",
);

fn read(file: (&'static str, &'static str), path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|error| TlsError::Read {
        what: file.0,
        setting: file.1,
        path: path.to_owned(),
        error,
    })
}

fn unusable(file: (&'static str, &'static str), path: &Path, problem: String) -> TlsError {
    TlsError::Unusable {
        what: file.0,
        setting: file.1,
        path: path.to_owned(),
        problem,
    }
}

/// What is wrong with a PEM file, in words that quote nothing of it.
fn pem_problem(error: &pem::Error) -> &'static str {
    match error {
        pem::Error::MissingSectionEnd { .. } => "has a PEM block without its -----END line",
        pem::Error::IllegalSectionStart { .. } => "has a malformed -----BEGIN line",
        pem::Error::Base64Decode(_) => "has a PEM block that is not valid base64",
        pem::Error::SectionTooLarge => "has a PEM block over 256 MB",
        _ => "is not a PEM file",
    }
}

fn certificates(
    file: (&'static str, &'static str),
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = read(file, path)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| unusable(file, path, pem_problem(&e).to_owned()))?;
    if certs.is_empty() {
        return Err(unusable(
            file,
            path,
            "holds no certificate: expected PEM (-----BEGIN CERTIFICATE----- blocks)".to_owned(),
        ));
    }
    Ok(certs)
}

fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let bytes = read(CLIENT_KEY, path)?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| {
        let problem = match e {
            pem::Error::NoItemsFound => {
                "holds no private key: expected PEM (-----BEGIN PRIVATE KEY-----, RSA or EC)"
            }
            e => pem_problem(&e),
        };
        unusable(CLIENT_KEY, path, problem.to_owned())
    })
}

/// The rustls client configuration for `files` (no ALPN: each transport sets its own).
/// Reads and checks every file given: a missing or unusable file is an error here, at start-up,
/// rather than a failed handshake later.
pub fn client_config(files: &TlsFiles) -> Result<rustls::ClientConfig, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    match &files.certificate {
        Some(path) => {
            let certs = certificates(CA, path)?;
            let (added, ignored) = roots.add_parsable_certificates(certs);
            if added == 0 {
                return Err(unusable(
                    CA,
                    path,
                    "holds no usable CA certificate (each failed to parse as X.509)".to_owned(),
                ));
            }
            if ignored > 0 {
                log::warn!(
                    "{ignored} of the certificates in {} could not be parsed and are not trusted",
                    path.display()
                );
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Setup)?
        .with_root_certificates(roots);
    match (&files.client_certificate, &files.client_key) {
        (None, None) => Ok(builder.with_no_client_auth()),
        (Some(_), None) => Err(TlsError::HalfClientIdentity {
            missing: "the client key (--otlp-client-key, OTEL_EXPORTER_OTLP_CLIENT_KEY)",
            given: "client certificate",
        }),
        (None, Some(_)) => Err(TlsError::HalfClientIdentity {
            missing: "the client certificate (--otlp-client-certificate, \
                      OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE)",
            given: "client key",
        }),
        (Some(cert_path), Some(key_path)) => {
            let chain = certificates(CLIENT_CERT, cert_path)?;
            let key = private_key(key_path)?;
            builder.with_client_auth_cert(chain, key).map_err(|e| {
                let problem = match e {
                    rustls::Error::InconsistentKeys(_) => {
                        format!("does not belong to the certificate {}", cert_path.display())
                    }
                    e => format!("cannot be used: {e}"),
                };
                unusable(CLIENT_KEY, key_path, problem)
            })
        }
    }
}

/// What to check when a TLS connection to the collector failed, from the rustls error in the
/// error chain (if any).
pub fn hint(error: &(dyn std::error::Error + 'static)) -> Option<&'static str> {
    use rustls::{AlertDescription as Alert, CertificateError as Cert, Error as Tls};
    let tls = find_rustls_error(error)?;
    Some(match tls {
        Tls::InvalidCertificate(Cert::UnknownIssuer | Cert::BadSignature | Cert::BadEncoding) => {
            "the collector's certificate is not signed by a CA the agent trusts: give the CA that \
             signed it with --otlp-certificate (OTEL_EXPORTER_OTLP_CERTIFICATE); without it only \
             the public (Mozilla) root CAs are trusted"
        }
        Tls::InvalidCertificate(Cert::NotValidForName | Cert::NotValidForNameContext { .. }) => {
            "the collector's certificate does not name the host in the endpoint URL: use a host \
             name or address the certificate lists"
        }
        Tls::InvalidCertificate(
            Cert::Expired
            | Cert::ExpiredContext { .. }
            | Cert::NotValidYet
            | Cert::NotValidYetContext { .. },
        ) => {
            "the collector's certificate is outside its validity period: renew it, or check this \
             host's clock"
        }
        Tls::InvalidCertificate(_) => {
            "the collector's certificate was refused: check it against the CA given with \
             --otlp-certificate"
        }
        Tls::AlertReceived(
            Alert::CertificateRequired
            | Alert::BadCertificate
            | Alert::UnknownCA
            | Alert::CertificateUnknown
            | Alert::AccessDenied
            | Alert::HandshakeFailure,
        ) => {
            "the collector refused the TLS handshake: if it requires a client certificate (mTLS), \
             set --otlp-client-certificate and --otlp-client-key to a pair signed by a CA it trusts"
        }
        Tls::InvalidMessage(_) | Tls::InappropriateMessage { .. } => {
            "the collector does not speak TLS there: use an http:// endpoint, or its TLS port"
        }
        _ => "the TLS handshake with the collector failed",
    })
}

fn find_rustls_error<'a>(
    error: &'a (dyn std::error::Error + 'static),
) -> Option<&'a rustls::Error> {
    let mut next = Some(error);
    while let Some(e) = next {
        if let Some(tls) = e.downcast_ref::<rustls::Error>() {
            return Some(tls);
        }
        // io::Error hides the error it wraps from `source()`: tokio-rustls wraps rustls's
        // error in one, which hyper-rustls wraps in another.
        if let Some(inner) = e
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            next = Some(inner);
            continue;
        }
        next = e.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Dir(PathBuf);

    impl Dir {
        fn new(name: &str) -> Self {
            let dir = std::env::temp_dir().join(format!("agent-tls-{}-{name}", std::process::id()));
            std::fs::create_dir_all(&dir).expect("temp dir");
            Self(dir)
        }
        fn file(&self, name: &str, contents: &[u8]) -> PathBuf {
            let path = self.0.join(name);
            std::fs::write(&path, contents).expect("write");
            path
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn error(files: &TlsFiles) -> String {
        match client_config(files) {
            Ok(_) => panic!("accepted {files:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn no_files_trust_the_compiled_in_roots() {
        assert!(client_config(&TlsFiles::default()).is_ok());
        assert!(webpki_roots::TLS_SERVER_ROOTS.len() > 100);
    }

    #[test]
    fn unreadable_and_unparsable_files_are_refused_without_quoting_them() {
        let dir = Dir::new("bad");
        let missing = dir.0.join("nope.pem");
        let err = error(&TlsFiles {
            certificate: Some(missing.clone()),
            ..TlsFiles::default()
        });
        assert!(
            err.contains("cannot read the CA certificate file")
                && err.contains("nope.pem")
                && err.contains("OTEL_EXPORTER_OTLP_CERTIFICATE"),
            "{err}"
        );
        let secret = dir.file("shadow", b"root:$6$hunter2:19000:0:99999:7:::\n");
        let err = error(&TlsFiles {
            certificate: Some(secret.clone()),
            ..TlsFiles::default()
        });
        assert!(err.contains("holds no certificate"), "{err}");
        assert!(!err.contains("hunter2"), "file contents echoed: {err}");
        let broken = dir.file(
            "broken.pem",
            b"-----BEGIN CERTIFICATE-----\nnot base64 hunter2!!\n-----END CERTIFICATE-----\n",
        );
        let err = error(&TlsFiles {
            certificate: Some(broken),
            ..TlsFiles::default()
        });
        assert!(err.contains("not valid base64"), "{err}");
        assert!(!err.contains("hunter2"), "{err}");
        // Valid base64 that is no certificate.
        let garbage = dir.file(
            "garbage.pem",
            b"-----BEGIN CERTIFICATE-----\naGVsbG8gd29ybGQ=\n-----END CERTIFICATE-----\n",
        );
        let err = error(&TlsFiles {
            certificate: Some(garbage),
            ..TlsFiles::default()
        });
        assert!(err.contains("no usable CA certificate"), "{err}");
        let err = error(&TlsFiles {
            client_key: Some(secret),
            client_certificate: Some(missing),
            ..TlsFiles::default()
        });
        assert!(err.contains("client certificate file"), "{err}");
    }

    #[test]
    fn a_client_certificate_needs_its_key_and_the_reverse() {
        let err = error(&TlsFiles {
            client_certificate: Some("/c.pem".into()),
            ..TlsFiles::default()
        });
        assert!(err.contains("OTEL_EXPORTER_OTLP_CLIENT_KEY"), "{err}");
        let err = error(&TlsFiles {
            client_key: Some("/k.pem".into()),
            ..TlsFiles::default()
        });
        assert!(
            err.contains("OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE"),
            "{err}"
        );
    }

    #[test]
    fn hints_come_from_the_rustls_error_inside_io_errors() {
        let wrapped = std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer),
        );
        // Wrapped once more and boxed, as hyper's client error holds its connector's.
        let outer: Box<dyn std::error::Error + Send + Sync> =
            Box::new(std::io::Error::other(wrapped));
        assert!(
            hint(outer.as_ref()).is_some_and(|h| h.contains("OTEL_EXPORTER_OTLP_CERTIFICATE")),
            "{outer}"
        );
        let alert = std::io::Error::other(rustls::Error::AlertReceived(
            rustls::AlertDescription::CertificateRequired,
        ));
        assert!(hint(&alert).is_some_and(|h| h.contains("--otlp-client-key")));
        assert_eq!(hint(&std::io::Error::other("refused")), None);
    }
}
