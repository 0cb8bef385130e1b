//! Stage: direct preference optimisation from ranked responses.

pub mod config;
pub mod loss;

pub use config::*;

pub type Error = candor_train::Error;
pub type Result<T, E = Error> = std::result::Result<T, E>;
