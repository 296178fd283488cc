//! Spans: the record exporters take, how HTTP exchanges become spans, trace context, linking.
pub mod context;
pub mod correlation;
pub mod http;
pub mod model;
pub mod pairing;
pub mod postgres;
