#![no_std]
//! Exists so the agent can name this crate as a build dependency (cargo then rebuilds the agent when
//! the kernel programs change); the programs themselves are the `agent` binary target.
