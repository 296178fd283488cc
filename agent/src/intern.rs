//! Attribute keys read at run time (a process's `OTEL_RESOURCE_ATTRIBUTES`, a pod's
//! `resource.opentelemetry.io/*` annotations) made `&'static str`, as `Attribute` keys are.

use std::{
    collections::HashSet,
    sync::{Mutex, OnceLock},
};

/// Distinct keys are interned (leaked once each). A process could invent unbounded keys; past
/// this many distinct keys, new ones are ignored.
const MAX_INTERNED_KEYS: usize = 1024;

/// `&'static` key for an attribute read from a process or a pod (see `MAX_INTERNED_KEYS`).
pub fn intern_key(key: &str) -> Option<&'static str> {
    static KEYS: OnceLock<Mutex<HashSet<&'static str>>> = OnceLock::new();
    let mut keys = KEYS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    if let Some(k) = keys.get(key) {
        return Some(k);
    }
    if keys.len() >= MAX_INTERNED_KEYS {
        log::debug!("ignoring resource attribute {key:?}: too many distinct keys");
        return None;
    }
    let leaked: &'static str = Box::leak(key.to_owned().into_boxed_str());
    keys.insert(leaked);
    Some(leaked)
}
