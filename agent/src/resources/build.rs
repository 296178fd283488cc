//! The OpenTelemetry resource of one process: what `/proc` tells of it, what its container and
//! pod add, and its own `OTEL_*` variables. The command line is redacted before it leaves the
//! machine (see `redact::command_line`).

use std::{path::Path, sync::OnceLock};

use super::otel_env::{ProcessEnv, parse_resource_attributes};
use crate::{
    intern::intern_key,
    k8s::K8sResource,
    proc::ProcessFacts,
    redact,
    spans::model::{AttrValue, Attribute, Resource},
};

/// `telemetry.distro.name` of the spans this agent produces.
pub const DISTRO_NAME: &str = "ebpf-agent";

/// The version of the OpenTelemetry SDK we export with (`telemetry.sdk.version`).
fn sdk_version() -> &'static str {
    static VERSION: OnceLock<String> = OnceLock::new();
    VERSION.get_or_init(|| {
        use opentelemetry_sdk::resource::TelemetryResourceDetector;
        let detected = opentelemetry_sdk::Resource::builder_empty()
            .with_detector(Box::new(TelemetryResourceDetector))
            .build();
        detected
            .get(&opentelemetry::Key::from_static_str(
                "telemetry.sdk.version",
            ))
            .map(|v| v.as_str().into_owned())
            .unwrap_or_else(|| "unknown".to_owned())
    })
}

/// Services whose executable name is not the name users know them by.
fn well_known_service(exe_name: &str) -> Option<&'static str> {
    match exe_name {
        // Every PostgreSQL server process (postmaster and backends) runs the `postgres` binary.
        "postgres" => Some("postgresql"),
        _ => None,
    }
}

/// The resource of process `pid`, from what `/proc` tells of it. `k8s`: what the process's
/// container and pod add (attributes, a service name below the process's own).
pub fn resource(
    pid: u32,
    facts: ProcessFacts,
    host_name: &str,
    k8s: Option<&K8sResource>,
) -> Resource {
    let ProcessFacts {
        comm,
        exe: exe_path,
        args,
        environ,
        owner,
    } = facts;
    let exe_name = exe_path
        .as_deref()
        .and_then(Path::file_name)
        .map(|n| n.to_string_lossy().into_owned())
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| comm.clone());

    let env = ProcessEnv::parse(&environ);
    let env_attrs = match env
        .resource_attributes
        .as_deref()
        .map(parse_resource_attributes)
    {
        Some(Ok(attrs)) => attrs,
        Some(Err(e)) => {
            log::warn!("pid {pid}: ignoring its OTEL_RESOURCE_ATTRIBUTES: {e}");
            Vec::new()
        }
        None => Vec::new(),
    };
    let service_name = env
        .service_name
        .clone()
        .or_else(|| {
            env_attrs
                .iter()
                .find(|(k, _)| k == "service.name")
                .map(|(_, v)| v.clone())
        })
        .filter(|s| !s.is_empty())
        .or_else(|| k8s.and_then(|k| k.service_name.clone()))
        .unwrap_or_else(|| {
            if exe_name.is_empty() {
                format!("unknown:{pid}")
            } else if let Some(name) = well_known_service(&exe_name) {
                name.to_string()
            } else {
                exe_name.clone()
            }
        });

    let mut attributes = vec![
        Attribute::str("service.name", service_name.clone()),
        Attribute::str("service.instance.id", format!("{host_name}:{pid}")),
        Attribute::int("process.pid", i64::from(pid)),
        Attribute::str("process.executable.name", exe_name),
    ];
    if let Some(path) = &exe_path {
        attributes.push(Attribute::str(
            "process.executable.path",
            path.to_string_lossy().into_owned(),
        ));
    }
    if !args.is_empty() {
        attributes.push(Attribute::str(
            "process.command_line",
            redact::command_line(&args),
        ));
    }
    if let Some(owner) = owner {
        attributes.push(Attribute::str("process.owner", owner));
    }
    attributes.extend(host_and_telemetry(host_name));
    // Container and pod (their annotations may refine what we detected, e.g. host.name).
    for attr in k8s.map(|k| k.attributes.as_slice()).unwrap_or_default() {
        if matches!(attr.key, "process.pid" | "service.name") {
            continue;
        }
        match attributes.iter_mut().find(|a| a.key == attr.key) {
            Some(existing) => existing.value = attr.value.clone(),
            None => attributes.push(attr.clone()),
        }
    }
    // The process's own OTEL_RESOURCE_ATTRIBUTES: they add to (and may refine) what we detected,
    // but cannot change which process this is nor the service name chosen above.
    for (key, value) in env_attrs {
        if matches!(key.as_str(), "process.pid" | "service.name") {
            continue;
        }
        let Some(key) = intern_key(&key) else {
            continue;
        };
        match attributes.iter_mut().find(|a| a.key == key) {
            Some(existing) => existing.value = AttrValue::Str(value.into()),
            None => attributes.push(Attribute::str(key, value)),
        }
    }

    Resource {
        pid,
        service_name,
        attributes,
    }
}

/// The resource used when `/proc/PID` could not be read (the process is gone, or access denied).
pub fn minimal_resource(pid: u32, host_name: &str) -> Resource {
    let service_name = format!("unknown:{pid}");
    let mut attributes = vec![
        Attribute::str("service.name", service_name.clone()),
        Attribute::int("process.pid", i64::from(pid)),
    ];
    attributes.extend(host_and_telemetry(host_name));
    Resource {
        pid,
        service_name,
        attributes,
    }
}

/// The resource of `child`, forked by the process of `parent` and gone before `/proc` could
/// tell of it: the parent's, but for what names the process itself.
pub fn forked(parent: &Resource, child: u32, host_name: &str) -> Resource {
    let mut attributes = parent.attributes.clone();
    for attr in &mut attributes {
        match attr.key {
            "process.pid" => attr.value = AttrValue::Int(i64::from(child)),
            "service.instance.id" => {
                attr.value = AttrValue::Str(format!("{host_name}:{child}").into())
            }
            _ => {}
        }
    }
    Resource {
        pid: child,
        service_name: parent.service_name.clone(),
        attributes,
    }
}

/// `host.name` and what produced the telemetry (SDK and distribution), on every resource.
fn host_and_telemetry(host_name: &str) -> [Attribute; 6] {
    [
        Attribute::str("host.name", host_name.to_owned()),
        Attribute::str("telemetry.sdk.name", "opentelemetry"),
        Attribute::str("telemetry.sdk.language", "rust"),
        Attribute::str("telemetry.sdk.version", sdk_version()),
        Attribute::str("telemetry.distro.name", DISTRO_NAME),
        Attribute::str("telemetry.distro.version", env!("CARGO_PKG_VERSION")),
    ]
}

#[cfg(test)]
mod tests {
    use super::well_known_service;

    #[test]
    fn postgres_backends_are_the_postgresql_service() {
        assert_eq!(well_known_service("postgres"), Some("postgresql"));
        assert_eq!(well_known_service("python3.11"), None);
    }
}
