pub mod http1;
pub mod postgres;
