//! candor-core: the pieces every other candor crate stands on.
//!
//! - [`config`]: YAML stage configs with `--set key=value` overrides, unknown keys rejected
//!   with their path.
//! - [`checkpoint`]: the checkpoint directory contract (`candor.json`, content hash, atomic writes).
//! - [`memory`]: memory this process can still use (host and cgroup limit).
//! - [`metrics`]: the `metrics.jsonl` log.
//! - [`output`]: atomic output files, the output probed before work, one writer per output.
//! - [`device`]: `auto|cpu|cuda[:N]|metal` parsing.
//! - [`rng`]: a small, serialisable, deterministic RNG (exact resume needs its state on disk).

pub mod checkpoint;
pub mod config;
pub mod device;
pub mod error;
pub mod memory;
pub mod metrics;
pub mod output;
pub mod rng;

pub use error::{Error, Result};

/// The version written into every `candor.json`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
