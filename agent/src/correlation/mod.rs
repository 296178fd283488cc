//! Trace correlation: which span is whose child, across threads, processes and hosts.
pub mod contexts;
pub mod linker;
pub mod pairing;
