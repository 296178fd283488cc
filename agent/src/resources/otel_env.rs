//! The OpenTelemetry variables of a process's environment: `OTEL_SERVICE_NAME` and
//! `OTEL_RESOURCE_ATTRIBUTES`.

/// Longest key or value accepted from `OTEL_RESOURCE_ATTRIBUTES`.
const MAX_ENV_ATTR_LEN: usize = 4096;

/// The OpenTelemetry variables of a process's environment.
#[derive(Debug, Default, PartialEq)]
pub struct ProcessEnv {
    pub service_name: Option<String>,
    pub resource_attributes: Option<String>,
}

impl ProcessEnv {
    pub fn parse(environ: &[u8]) -> Self {
        let mut env = Self::default();
        for entry in environ.split(|&b| b == 0) {
            let Some(eq) = entry.iter().position(|&b| b == b'=') else {
                continue;
            };
            let (name, value) = (&entry[..eq], &entry[eq + 1..]);
            let value = || String::from_utf8_lossy(value).trim().to_owned();
            match name {
                b"OTEL_SERVICE_NAME" => env.service_name = Some(value()).filter(|v| !v.is_empty()),
                b"OTEL_RESOURCE_ATTRIBUTES" => env.resource_attributes = Some(value()),
                _ => {}
            }
        }
        env
    }
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ResourceAttributesError {
    #[error("list member {0:?} is not key=value (expected OTEL_RESOURCE_ATTRIBUTES=k1=v1,k2=v2)")]
    NotKeyValue(String),
    #[error("a key or value is longer than {} bytes", MAX_ENV_ATTR_LEN)]
    TooLong,
    #[error("invalid percent-encoding in {0:?} (a literal % must be written %25)")]
    BadPercentEncoding(String),
}

/// Parses `OTEL_RESOURCE_ATTRIBUTES` (`k1=v1,k2=v2`, values percent-encoded). As the
/// specification asks, a malformed value is rejected as a whole.
pub fn parse_resource_attributes(
    value: &str,
) -> Result<Vec<(String, String)>, ResourceAttributesError> {
    let mut out = Vec::new();
    for member in value.split(',') {
        let member = member.trim();
        if member.is_empty() {
            continue;
        }
        let (key, val) = member
            .split_once('=')
            .map(|(k, v)| (k.trim(), v.trim()))
            .filter(|(k, _)| !k.is_empty())
            .ok_or_else(|| ResourceAttributesError::NotKeyValue(member.to_owned()))?;
        if key.len() > MAX_ENV_ATTR_LEN || val.len() > MAX_ENV_ATTR_LEN {
            return Err(ResourceAttributesError::TooLong);
        }
        let decode = |s: &str| {
            percent_decode(s)
                .ok_or_else(|| ResourceAttributesError::BadPercentEncoding(s.to_owned()))
        };
        out.push((decode(key)?, decode(val)?));
    }
    Ok(out)
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3)?;
            let hex = std::str::from_utf8(hex).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_otel_resource_attributes() {
        assert_eq!(
            parse_resource_attributes(
                "service.name=checkout, deployment.environment=prod ,team=a%2Cb%3Dc%20d"
            ),
            Ok(vec![
                ("service.name".into(), "checkout".into()),
                ("deployment.environment".into(), "prod".into()),
                ("team".into(), "a,b=c d".into()),
            ])
        );
        assert_eq!(parse_resource_attributes(""), Ok(vec![]));
        assert_eq!(
            parse_resource_attributes("a=1,,b=2,").map(|v| v.len()),
            Ok(2)
        );
        assert_eq!(
            parse_resource_attributes("k=%C3%A9"),
            Ok(vec![("k".into(), "é".into())])
        );
        assert!(matches!(
            parse_resource_attributes("a=1,novalue"),
            Err(ResourceAttributesError::NotKeyValue(_))
        ));
        assert!(matches!(
            parse_resource_attributes("=x"),
            Err(ResourceAttributesError::NotKeyValue(_))
        ));
        assert!(matches!(
            parse_resource_attributes("a=%zz"),
            Err(ResourceAttributesError::BadPercentEncoding(_))
        ));
        assert!(matches!(
            parse_resource_attributes("a=50%"),
            Err(ResourceAttributesError::BadPercentEncoding(_))
        ));
    }

    #[test]
    fn parses_process_environ() {
        let environ =
            b"PATH=/bin\0OTEL_SERVICE_NAME=checkout\0OTEL_RESOURCE_ATTRIBUTES=a=b\0EMPTY=\0\0";
        assert_eq!(
            ProcessEnv::parse(environ),
            ProcessEnv {
                service_name: Some("checkout".into()),
                resource_attributes: Some("a=b".into())
            }
        );
        assert_eq!(
            ProcessEnv::parse(b"OTEL_SERVICE_NAME=\0"),
            ProcessEnv::default()
        );
    }
}
