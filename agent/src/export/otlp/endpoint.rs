//! The OTLP endpoint a user gives, checked and resolved per the exporter specification.

use crate::export::{EndpointForm, ExportError, OtlpProtocol};

/// The endpoint a user gave, resolved for one protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedEndpoint {
    /// What the exporter connects to: as given for gRPC, `<base>/v1/traces` for HTTP.
    pub url: String,
    /// `https://`: the connection uses TLS.
    pub tls: bool,
}

/// Checks an endpoint as given (scheme, host, port) without resolving it, so that a mistake
/// stops the agent before it loads anything. Empty means the protocol's default. The message
/// never repeats the URL: it may come from a file, and carry credentials.
pub fn check_endpoint(given: &str) -> Result<(), &'static str> {
    let given = given.trim();
    if given.is_empty() {
        return Ok(());
    }
    if given.contains(char::is_whitespace) {
        return Err("it contains whitespace");
    }
    let rest = match given.split_once("://") {
        Some((scheme, rest)) => {
            if !matches!(scheme.to_ascii_lowercase().as_str(), "http" | "https") {
                return Err("the scheme must be http:// or https://");
            }
            rest
        }
        None => given,
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, hp)| hp);
    let (host, port) = match host_port.strip_prefix('[') {
        Some(v6) => {
            let (address, after) = v6.split_once(']').ok_or("an IPv6 address lacks its `]`")?;
            match after {
                "" => (address, None),
                _ => (
                    address,
                    Some(
                        after
                            .strip_prefix(':')
                            .ok_or("junk after the IPv6 address")?,
                    ),
                ),
            }
        }
        None => match host_port.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (host_port, None),
        },
    };
    if host.is_empty() {
        return Err("no host");
    }
    match port.map(str::parse::<u16>) {
        None | Some(Ok(1..)) => Ok(()),
        Some(_) => Err("the port must be a number from 1 to 65535"),
    }
}

/// Resolves `endpoint` per the OTLP exporter specification: for gRPC the URL as given (default
/// `http://localhost:4317`); for HTTP/protobuf a base URL (`OTEL_EXPORTER_OTLP_ENDPOINT`-style,
/// default `http://localhost:4318`) to which `/v1/traces` is appended unless it already ends
/// with it, or, for [`EndpointForm::TracesUrl`], the URL as given. `host:port` without a
/// scheme: for gRPC `https://host:port`, or `http://` when `insecure` (the specification's
/// option, which applies to exactly this case); for HTTP `http://host:port`.
pub fn resolve_endpoint(
    endpoint: &str,
    protocol: OtlpProtocol,
    form: EndpointForm,
    insecure: bool,
) -> Result<ResolvedEndpoint, ExportError> {
    let given = endpoint.trim();
    let base = if given.is_empty() {
        protocol.default_endpoint().to_owned()
    } else {
        given.to_owned()
    };
    let base = match (base.contains("://"), protocol) {
        (true, _) => base,
        (false, OtlpProtocol::Grpc) if !insecure => format!("https://{base}"),
        (false, _) => format!("http://{base}"),
    };
    let invalid = |reason: &str| ExportError::InvalidEndpoint {
        endpoint: endpoint.to_owned(),
        reason: reason.to_owned(),
    };
    check_endpoint(&base).map_err(invalid)?;
    let (scheme, rest) = base.split_once("://").ok_or_else(|| invalid("no scheme"))?;
    let tls = match scheme.to_ascii_lowercase().as_str() {
        "http" => false,
        "https" => true,
        _ => return Err(invalid("the scheme must be http:// or https://")),
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    if authority.is_empty() {
        return Err(invalid("no host"));
    }
    if authority.contains('@') {
        return Err(invalid(
            "credentials in the URL are not supported (give them with --otlp-header)",
        ));
    }
    if rest.contains(char::is_whitespace) {
        return Err(invalid("it contains whitespace"));
    }
    let url = match protocol {
        OtlpProtocol::Grpc => base,
        OtlpProtocol::HttpProtobuf if form == EndpointForm::TracesUrl => base,
        OtlpProtocol::HttpProtobuf => {
            let trimmed = base.trim_end_matches('/');
            if trimmed.ends_with("/v1/traces") {
                trimmed.to_owned()
            } else {
                format!("{trimmed}/v1/traces")
            }
        }
    };
    Ok(ResolvedEndpoint { url, tls })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(endpoint: &str, protocol: OtlpProtocol) -> String {
        match resolve_endpoint(endpoint, protocol, EndpointForm::Base, false) {
            Ok(r) => r.url,
            Err(e) => format!("error: {e}"),
        }
    }

    #[test]
    fn resolves_endpoints_per_protocol() {
        use OtlpProtocol::*;
        assert_eq!(url("", Grpc), "http://localhost:4317");
        assert_eq!(url("", HttpProtobuf), "http://localhost:4318/v1/traces");
        assert_eq!(url("http://collector:4317", Grpc), "http://collector:4317");
        assert_eq!(
            url("https://collector:4317", Grpc),
            "https://collector:4317"
        );
        assert_eq!(
            url("http://collector:4318", HttpProtobuf),
            "http://collector:4318/v1/traces"
        );
        assert_eq!(
            url("http://collector:4318/", HttpProtobuf),
            "http://collector:4318/v1/traces"
        );
        assert_eq!(
            url("http://gw/otlp", HttpProtobuf),
            "http://gw/otlp/v1/traces"
        );
        assert_eq!(
            url("http://collector:4318/v1/traces", HttpProtobuf),
            "http://collector:4318/v1/traces"
        );
        assert_eq!(
            url("https://gw.example.com/otlp", HttpProtobuf),
            "https://gw.example.com/otlp/v1/traces"
        );
        for bad in ["ftp://c", "http://", "http://user:pw@c:4318"] {
            assert!(
                matches!(
                    resolve_endpoint(bad, HttpProtobuf, EndpointForm::Base, false),
                    Err(ExportError::InvalidEndpoint { .. })
                ),
                "{bad}"
            );
        }
    }

    /// The specification's `insecure`: a gRPC endpoint without a scheme is TLS unless
    /// insecure; a scheme always wins; HTTP endpoints follow their scheme (plain without one).
    #[test]
    fn insecure_decides_only_for_a_grpc_endpoint_without_scheme() {
        use OtlpProtocol::*;
        let resolve = |endpoint, protocol, insecure| {
            resolve_endpoint(endpoint, protocol, EndpointForm::Base, insecure)
                .map(|r| (r.url, r.tls))
                .ok()
        };
        assert_eq!(
            resolve("collector:4317", Grpc, false),
            Some(("https://collector:4317".into(), true))
        );
        assert_eq!(
            resolve("collector:4317", Grpc, true),
            Some(("http://collector:4317".into(), false))
        );
        assert_eq!(
            resolve("https://collector:4317", Grpc, true),
            Some(("https://collector:4317".into(), true))
        );
        assert_eq!(
            resolve("http://collector:4317", Grpc, false),
            Some(("http://collector:4317".into(), false))
        );
        assert_eq!(
            resolve("collector:4318", HttpProtobuf, false),
            Some(("http://collector:4318/v1/traces".into(), false))
        );
        assert_eq!(
            resolve("", Grpc, false),
            Some(("http://localhost:4317".into(), false)),
            "the default endpoint has its scheme"
        );
    }

    #[test]
    fn traces_url_is_used_as_given_for_http() {
        use OtlpProtocol::*;
        let traces = |endpoint| match resolve_endpoint(
            endpoint,
            HttpProtobuf,
            EndpointForm::TracesUrl,
            false,
        ) {
            Ok(r) => r.url,
            Err(e) => format!("error: {e}"),
        };
        assert_eq!(traces("http://gw/otlp/traces"), "http://gw/otlp/traces");
        assert_eq!(traces("http://c:4318/v1/traces"), "http://c:4318/v1/traces");
        assert_eq!(traces("c:4318/ingest"), "http://c:4318/ingest");
        assert_eq!(traces("https://c/v1/traces"), "https://c/v1/traces");
        // gRPC takes every endpoint as given anyway.
        assert_eq!(
            resolve_endpoint("http://c:4317", Grpc, EndpointForm::TracesUrl, false)
                .map(|r| r.url)
                .ok(),
            Some("http://c:4317".to_owned())
        );
    }
}
