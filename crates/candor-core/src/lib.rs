//! candor-core: the pieces every other candor crate stands on.
//!
//! - [`config`]: YAML stage configs with `--set key=value` overrides, unknown keys rejected
//!   with their path.
//! - [`checkpoint`]: the checkpoint directory contract (`candor.json`, content hash, atomic writes).
//! - [`metrics`]: the `metrics.jsonl` log.
//! - [`device`]: `auto|cpu|cuda[:N]|metal` parsing.
//! - [`rng`]: a small, serialisable, deterministic RNG (exact resume needs its state on disk).

pub mod checkpoint;
pub mod config;
pub mod device;
pub mod error;
pub mod metrics;
pub mod rng;

pub use error::{Error, Result};

/// The version written into every `candor.json`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
