//! A minimal client of the Kubernetes API: list, watch and get pods, in-cluster credentials.
//!
//! Blocking (ureq + rustls) on purpose: it runs on its own thread, so a slow or unreachable API
//! server never holds up the event loop or the exporter's runtime.

use std::{
    io::{BufRead, BufReader, Read},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use serde::Deserialize;

use super::pods::{Pod, PodList, Status};

/// Where Kubernetes mounts a pod's service account credentials.
pub const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";
/// Largest pod list read (a node holds at most a few hundred pods of some KiB each).
const MAX_LIST_BYTES: u64 = 64 << 20;
/// Largest watch event (one pod).
const MAX_EVENT_BYTES: u64 = 4 << 20;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// A list or a get: the whole exchange.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(
        "KUBERNETES_SERVICE_HOST is not set: the agent is not running in a Kubernetes pod; \
         deploy it as a DaemonSet (deploy/helm) or pass --kubernetes off"
    )]
    NotInCluster,
    #[error(
        "cannot read the cluster's CA certificate {path}: {source}; the pod needs its service \
         account credentials mounted (automountServiceAccountToken: true)"
    )]
    Ca {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} holds no PEM certificate: cannot verify the Kubernetes API server")]
    NoCa { path: PathBuf },
    #[error(transparent)]
    Token(#[from] TokenUnreadable),
}

/// The service account token cannot be read: checked at start-up and re-read for each request
/// (the kubelet rotates it).
#[derive(Debug, thiserror::Error)]
#[error(
    "cannot read the service account token {}: {source}; the pod needs its service account \
     credentials mounted (automountServiceAccountToken: true)",
    path.display()
)]
pub struct TokenUnreadable {
    path: PathBuf,
    #[source]
    source: std::io::Error,
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error(
        "cannot reach the Kubernetes API at {base}: {source}; check that pods on this node can \
         reach the API server (network policies, KUBERNETES_SERVICE_HOST/PORT)"
    )]
    Unreachable {
        base: String,
        #[source]
        source: ureq::Error,
    },
    #[error(
        "the Kubernetes API server at {base} presented a certificate the cluster CA does not \
         vouch for ({source}); check {SERVICE_ACCOUNT_DIR}/ca.crt and KUBERNETES_SERVICE_HOST"
    )]
    Certificate {
        base: String,
        #[source]
        source: ureq::Error,
    },
    #[error(transparent)]
    Token(#[from] TokenUnreadable),
    #[error(
        "the Kubernetes API rejected the agent's service account token (401 Unauthorized: \
         {message}); check that the pod mounts a current projected service account token"
    )]
    Unauthorized { message: String },
    #[error(
        "the Kubernetes API denied `{verb}` on pods (403 Forbidden: {message}); grant the \
         agent's service account the verbs get, list and watch on pods (a ClusterRole bound to \
         it; the Helm chart creates one)"
    )]
    Forbidden { verb: &'static str, message: String },
    #[error("the watch's resource version is too old (410 Gone: {message})")]
    Expired { message: String },
    #[error("the Kubernetes API answered {status} to `{verb}` on pods: {message}")]
    Status {
        verb: &'static str,
        status: u16,
        message: String,
    },
    #[error("cannot decode the Kubernetes API's answer to `{verb}` on pods: {source}")]
    Decode {
        verb: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("reading the Kubernetes API's answer to `{verb}` on pods failed: {source}")]
    Read {
        verb: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("a watch event is larger than {MAX_EVENT_BYTES} bytes: listing the pods again")]
    EventTooLarge,
}

pub struct ApiClient {
    agent: ureq::Agent,
    /// `https://host:port`, no trailing slash.
    base: String,
    /// Re-read before every request: projected tokens are rotated by the kubelet.
    token: Option<PathBuf>,
}

/// One event of a pod watch.
#[derive(Debug)]
pub enum WatchEvent {
    Added(Pod),
    Modified(Pod),
    Deleted(Pod),
    /// Nothing changed; the resource version to resume from moved.
    Bookmark(String),
}

impl ApiClient {
    /// The client a pod uses: `KUBERNETES_SERVICE_HOST`/`_PORT`, the service account's token
    /// and the cluster CA under `dir` (normally [`SERVICE_ACCOUNT_DIR`]).
    pub fn in_cluster(dir: &Path) -> Result<Self, ConfigError> {
        let base = base_url(
            std::env::var("KUBERNETES_SERVICE_HOST").ok(),
            std::env::var("KUBERNETES_SERVICE_PORT").ok(),
        )?;
        let ca = dir.join("ca.crt");
        let token = dir.join("token");
        std::fs::metadata(&token).map_err(|source| TokenUnreadable {
            path: token.clone(),
            source,
        })?;
        Self::with_ca(base, &ca, Some(token))
    }

    /// A client of `base` that trusts only the certificates in the PEM file `ca`.
    pub fn with_ca(base: String, ca: &Path, token: Option<PathBuf>) -> Result<Self, ConfigError> {
        let pem = std::fs::read(ca).map_err(|source| ConfigError::Ca {
            path: ca.to_owned(),
            source,
        })?;
        let certs: Vec<ureq::tls::Certificate<'static>> = ureq::tls::parse_pem(&pem)
            .filter_map(|item| match item {
                Ok(ureq::tls::PemItem::Certificate(c)) => Some(c),
                _ => None,
            })
            .collect();
        if certs.is_empty() {
            return Err(ConfigError::NoCa {
                path: ca.to_owned(),
            });
        }
        let tls = ureq::tls::TlsConfig::builder()
            .root_certs(ureq::tls::RootCerts::Specific(Arc::new(certs)))
            .build();
        Ok(Self {
            agent: agent(Some(tls)),
            base,
            token,
        })
    }

    /// A client of `base` (`http://127.0.0.1:port`) without credentials: tests' fake server.
    #[cfg(test)]
    pub fn plain(base: &str) -> Self {
        Self {
            agent: agent(None),
            base: base.trim_end_matches('/').to_owned(),
            token: None,
        }
    }

    fn get(
        &self,
        verb: &'static str,
        path_and_query: &str,
        read_timeout: Option<Duration>,
    ) -> Result<ureq::Body, ApiError> {
        let mut request = self
            .agent
            .get(format!("{}{path_and_query}", self.base))
            .header("Accept", "application/json");
        if let Some(path) = &self.token {
            let token = std::fs::read_to_string(path).map_err(|source| TokenUnreadable {
                path: path.clone(),
                source,
            })?;
            request = request.header("Authorization", format!("Bearer {}", token.trim()));
        }
        let request = match read_timeout {
            // A watch: the stream stays open; only a silent connection is dead.
            Some(t) => request.config().timeout_per_read(Some(t)).build(),
            None => request
                .config()
                .timeout_per_call(Some(CALL_TIMEOUT))
                .build(),
        };
        let response = request.call().map_err(|source| {
            let base = self.base.clone();
            // rustls reports a refused certificate as InvalidData I/O; say what to check.
            match &source {
                ureq::Error::Io(e)
                    if e.kind() == std::io::ErrorKind::InvalidData
                        && e.to_string().contains("certificate") =>
                {
                    ApiError::Certificate { base, source }
                }
                _ => ApiError::Unreachable { base, source },
            }
        })?;
        let status = response.status().as_u16();
        let mut body = response.into_body();
        if (200..300).contains(&status) {
            return Ok(body);
        }
        // Errors come as a Status object; its message says what went wrong.
        let text = body
            .with_config()
            .limit(64 << 10)
            .read_to_string()
            .unwrap_or_default();
        let message = serde_json::from_str::<Status>(&text)
            .map(|s| s.message)
            .ok()
            .filter(|m| !m.is_empty())
            .unwrap_or_else(|| text.trim().chars().take(300).collect());
        Err(status_error(verb, status, message))
    }

    /// The pods scheduled on `node`.
    pub fn list_pods(&self, node: &str) -> Result<PodList, ApiError> {
        let path = format!(
            "/api/v1/pods?fieldSelector={}",
            encode(&format!("spec.nodeName={node}"))
        );
        let body = self.get("list", &path, None)?;
        let bytes = body
            .into_with_config()
            .limit(MAX_LIST_BYTES)
            .read_to_vec()
            .map_err(|e| ApiError::Read {
                verb: "list",
                source: e.into_io(),
            })?;
        serde_json::from_slice(&bytes).map_err(|source| ApiError::Decode {
            verb: "list",
            source,
        })
    }

    /// Changes to the pods on `node` after `resource_version`. The server ends the stream after
    /// `timeout`.
    pub fn watch_pods(
        &self,
        node: &str,
        resource_version: &str,
        timeout: Duration,
    ) -> Result<WatchStream, ApiError> {
        let path = format!(
            "/api/v1/pods?fieldSelector={}&watch=1&allowWatchBookmarks=true&resourceVersion={}&timeoutSeconds={}",
            encode(&format!("spec.nodeName={node}")),
            encode(resource_version),
            timeout.as_secs().max(1),
        );
        let body = self.get("watch", &path, Some(timeout + Duration::from_secs(30)))?;
        Ok(WatchStream {
            reader: BufReader::new(body.into_with_config().limit(u64::MAX).reader()),
            line: Vec::new(),
        })
    }

    /// One pod (the agent's own, to learn its node).
    pub fn get_pod(&self, namespace: &str, name: &str) -> Result<Pod, ApiError> {
        let path = format!(
            "/api/v1/namespaces/{}/pods/{}",
            encode(namespace),
            encode(name)
        );
        let bytes = self
            .get("get", &path, None)?
            .with_config()
            .limit(MAX_EVENT_BYTES)
            .read_to_vec()
            .map_err(|e| ApiError::Read {
                verb: "get",
                source: e.into_io(),
            })?;
        serde_json::from_slice(&bytes).map_err(|source| ApiError::Decode {
            verb: "get",
            source,
        })
    }
}

fn agent(tls: Option<ureq::tls::TlsConfig>) -> ureq::Agent {
    let mut config = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_connect(Some(CONNECT_TIMEOUT))
        .user_agent(concat!("ebpf-agent/", env!("CARGO_PKG_VERSION")));
    if let Some(tls) = tls {
        config = config.tls_config(tls);
    }
    config.build().into()
}

/// `https://host:port` from the service variables Kubernetes sets in every pod.
fn base_url(host: Option<String>, port: Option<String>) -> Result<String, ConfigError> {
    let host = host
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .ok_or(ConfigError::NotInCluster)?;
    let port = port
        .map(|p| p.trim().to_owned())
        .filter(|p| !p.is_empty())
        .unwrap_or_else(|| "443".into());
    // An IPv6 service address must be bracketed in a URL.
    if host.contains(':') && !host.starts_with('[') {
        Ok(format!("https://[{host}]:{port}"))
    } else {
        Ok(format!("https://{host}:{port}"))
    }
}

fn status_error(verb: &'static str, status: u16, message: String) -> ApiError {
    match status {
        401 => ApiError::Unauthorized { message },
        403 => ApiError::Forbidden { verb, message },
        410 => ApiError::Expired { message },
        _ => ApiError::Status {
            verb,
            status,
            message,
        },
    }
}

/// Percent-encodes a query or path value (unreserved characters pass).
fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A watch response: one JSON event per line.
pub struct WatchStream {
    reader: BufReader<ureq::BodyReader<'static>>,
    line: Vec<u8>,
}

#[derive(Deserialize)]
struct RawEvent {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    object: serde_json::Value,
}

impl WatchStream {
    /// The next event; `None` when the server ended the stream (its timeout).
    pub fn next_event(&mut self) -> Option<Result<WatchEvent, ApiError>> {
        loop {
            self.line.clear();
            let read = (&mut self.reader)
                .take(MAX_EVENT_BYTES + 1)
                .read_until(b'\n', &mut self.line);
            match read {
                Ok(0) => return None,
                Ok(n) if n as u64 > MAX_EVENT_BYTES => return Some(Err(ApiError::EventTooLarge)),
                Ok(_) => {}
                Err(source) => {
                    return Some(Err(ApiError::Read {
                        verb: "watch",
                        source,
                    }));
                }
            }
            if self.line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            return Some(parse_event(&self.line));
        }
    }
}

/// One line of a watch stream: `{"type":"ADDED","object":{…Pod…}}`.
pub fn parse_event(line: &[u8]) -> Result<WatchEvent, ApiError> {
    let decode = |source| ApiError::Decode {
        verb: "watch",
        source,
    };
    let raw: RawEvent = serde_json::from_slice(line).map_err(decode)?;
    let pod = |object| serde_json::from_value::<Pod>(object).map_err(decode);
    match raw.kind.as_str() {
        "ADDED" => Ok(WatchEvent::Added(pod(raw.object)?)),
        "MODIFIED" => Ok(WatchEvent::Modified(pod(raw.object)?)),
        "DELETED" => Ok(WatchEvent::Deleted(pod(raw.object)?)),
        "BOOKMARK" => Ok(WatchEvent::Bookmark(
            pod(raw.object)?.metadata.resource_version,
        )),
        _ => {
            // ERROR: the object is a Status (410 Gone when our resource version is too old).
            let status = serde_json::from_value::<Status>(raw.object).map_err(decode)?;
            let message = if status.message.is_empty() {
                status.reason
            } else {
                status.message
            };
            Err(status_error("watch", status.code, message))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_values_are_encoded() {
        assert_eq!(encode("spec.nodeName=node-1"), "spec.nodeName%3Dnode-1");
        assert_eq!(encode("a b/c&d"), "a%20b%2Fc%26d");
    }

    #[test]
    fn status_codes_become_actionable_errors() {
        let e = status_error("list", 403, "pods is forbidden".into());
        let text = e.to_string();
        assert!(
            text.contains("`list`") && text.contains("get, list and watch"),
            "{text}"
        );
        assert!(matches!(
            status_error("watch", 410, String::new()),
            ApiError::Expired { .. }
        ));
        assert!(matches!(
            status_error("get", 401, String::new()),
            ApiError::Unauthorized { .. }
        ));
        assert!(matches!(
            status_error("get", 500, String::new()),
            ApiError::Status { status: 500, .. }
        ));
    }

    #[test]
    fn base_url_from_the_service_variables() {
        let url = |h: Option<&str>, p: Option<&str>| {
            base_url(h.map(Into::into), p.map(Into::into)).map_err(|e| e.to_string())
        };
        assert_eq!(
            url(Some("10.96.0.1"), Some("443")).as_deref(),
            Ok("https://10.96.0.1:443")
        );
        assert_eq!(
            url(Some("fd00::1"), None).as_deref(),
            Ok("https://[fd00::1]:443")
        );
        assert_eq!(
            url(Some("[fd00::1]"), Some("6443")).as_deref(),
            Ok("https://[fd00::1]:6443")
        );
        let err = url(None, Some("443")).expect_err("not in a pod");
        assert!(err.contains("--kubernetes off"), "{err}");
        assert!(url(Some(" "), None).is_err());
    }

    /// The in-cluster case: an API server addressed by IP, with a certificate from the cluster
    /// CA, and a bearer token read from the service account file.
    #[test]
    fn lists_pods_over_tls_from_an_ip_address_and_rejects_other_cas() {
        use std::{io::Write as _, net::TcpListener};

        use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};

        let certs: Vec<_> =
            CertificateDer::pem_slice_iter(include_bytes!("testdata/tls/server.crt"))
                .collect::<Result<_, _>>()
                .expect("server certificate");
        let key = PrivateKeyDer::from_pem_slice(include_bytes!("testdata/tls/server.key"))
            .expect("server key");
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .expect("server config");
        let config = Arc::new(config);
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("address").port();
        let server = std::thread::spawn(move || {
            let mut heads = Vec::new();
            for _ in 0..2 {
                let Ok((tcp, _)) = listener.accept() else {
                    break;
                };
                let Ok(conn) = rustls::ServerConnection::new(config.clone()) else {
                    break;
                };
                let mut tls = rustls::StreamOwned::new(conn, tcp);
                let mut reader = BufReader::new(&mut tls);
                let mut head = String::new();
                loop {
                    let mut line = String::new();
                    match reader.read_line(&mut line) {
                        Ok(0) | Err(_) => break,
                        Ok(_) if line == "\r\n" => break,
                        Ok(_) => head.push_str(&line),
                    }
                }
                if head.is_empty() {
                    continue; // the client refused our certificate
                }
                heads.push(head);
                let body = include_str!("testdata/podlist-node-1.json");
                let _ = write!(
                    tls,
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = tls.flush();
                tls.conn.send_close_notify();
                let _ = tls.flush();
            }
            heads
        });

        let dir = std::env::temp_dir().join(format!("agent-tls-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let token = dir.join("token");
        std::fs::write(&token, "tok-123\n").expect("write token");
        let testdata = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/k8s/testdata/tls");
        let base = format!("https://127.0.0.1:{port}");

        // A CA that did not sign the server's certificate (the leaf itself is no CA).
        let wrong = ApiClient::with_ca(base.clone(), &testdata.join("server.crt"), None)
            .expect("a PEM certificate");
        match wrong.list_pods("node-1") {
            Err(e @ ApiError::Certificate { .. }) => {
                assert!(e.to_string().contains("ca.crt"), "{e}");
            }
            other => panic!("an unverified server was trusted: {other:?}"),
        }

        let client =
            ApiClient::with_ca(base, &testdata.join("ca.crt"), Some(token)).expect("cluster CA");
        let list = client.list_pods("node-1").expect("list over TLS");
        assert_eq!(list.items.len(), 3);
        assert_eq!(list.metadata.resource_version, "48211");
        let heads = server.join().expect("server thread");
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(heads.len(), 1, "{heads:?}");
        assert!(
            heads[0]
                .to_ascii_lowercase()
                .contains("authorization: bearer tok-123\r\n"),
            "{}",
            heads[0]
        );
        assert!(heads[0].starts_with("GET /api/v1/pods?fieldSelector=spec.nodeName%3Dnode-1 "));
    }

    #[test]
    fn the_cluster_ca_must_hold_a_certificate() {
        let dir = std::env::temp_dir().join(format!("agent-sa-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        let ca = dir.join("ca.crt");
        let base = || "https://10.96.0.1:443".to_string();
        let missing = ApiClient::with_ca(base(), &ca, None)
            .err()
            .map(|e| e.to_string());
        assert!(
            missing
                .as_deref()
                .is_some_and(|e| e.contains("ca.crt") && e.contains("automountServiceAccountToken")),
            "{missing:?}"
        );
        std::fs::write(&ca, "not a certificate").expect("write");
        assert!(matches!(
            ApiClient::with_ca(base(), &ca, None),
            Err(ConfigError::NoCa { .. })
        ));
        std::fs::write(&ca, include_str!("testdata/tls/ca.crt")).expect("write");
        assert!(ApiClient::with_ca(base(), &ca, None).is_ok());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn an_unreadable_token_names_the_file_and_the_fix_in_both_errors() {
        let unreadable = || TokenUnreadable {
            path: "/var/run/secrets/kubernetes.io/serviceaccount/token".into(),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        };
        for text in [
            ConfigError::from(unreadable()).to_string(),
            ApiError::from(unreadable()).to_string(),
        ] {
            assert!(
                text.starts_with(
                    "cannot read the service account token \
                     /var/run/secrets/kubernetes.io/serviceaccount/token: "
                ),
                "{text}"
            );
            assert!(
                text.ends_with("(automountServiceAccountToken: true)"),
                "{text}"
            );
        }
    }
}
