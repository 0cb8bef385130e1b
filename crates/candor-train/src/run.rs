//! How a stage is run: where it writes, on what device, whether it resumes, and its place
//! in a data-parallel run — what every stage's `run(cfg, opts)` takes besides its config.

use std::path::PathBuf;

use candle_core::Device;

use crate::ckpt::{plan_start, Start};
use crate::dist::Dist;
use crate::error::{Error, Result};
use crate::precision::Precision;

/// How to run a stage: where to write, on what, and whether to resume.
pub struct RunOptions {
    pub out: PathBuf,
    pub device: Device,
    pub resume: bool,
    pub overwrite: bool,
    /// Names the config in error messages (its file path).
    pub origin: String,
    /// This process's place in a data-parallel run (`Dist::single()` alone): each rank
    /// trains on its shard of every global batch, gradients are summed, rank 0 writes.
    pub dist: Dist,
}

impl RunOptions {
    /// [`plan_start`] on every rank of the run: rank 0 decides first (with `--overwrite` it
    /// may clear `out`), then the others look at what it left. Rank 0 first takes the lock
    /// on `out` (a second run writing there is refused at once, naming this one) and checks
    /// that it can write there, so a bad `--out` fails before any training.
    pub fn plan_start(&self, effective: &serde_json::Value) -> Result<Start> {
        let dist = &self.dist;
        let mine = if dist.is_main() {
            candor_core::output::lock_output(&self.out)?;
            Some(plan_start(
                &self.out,
                self.resume,
                self.overwrite,
                effective,
            )?)
        } else {
            None
        };
        dist.barrier()?;
        match mine {
            Some(start) => Ok(start),
            None => plan_start(&self.out, self.resume, false, effective),
        }
    }

    /// A global batch (`key` in the config) must give every rank at least one item.
    pub fn check_batch(&self, key: &str, batch: usize) -> Result<()> {
        let world = self.dist.world_size();
        if batch < world {
            return Err(Error::Msg(format!(
                "{}: {key}: {batch} is smaller than the {world} ranks of this run (it is the global batch, split among them)",
                self.origin
            )));
        }
        Ok(())
    }

    /// Where and how the run computes, for its first log line: `bf16 on cuda:0, 2 ranks
    /// (nccl)`, `f32 on cpu`.
    pub fn place(&self, precision: Precision) -> String {
        let ranks = match self.dist.backend() {
            "single" => String::new(),
            backend => format!(", {} ranks ({backend})", self.dist.world_size()),
        };
        format!(
            "{} on {}{ranks}",
            precision.name(),
            candor_core::device::device_name(&self.device)
        )
    }

    /// Write the final checkpoint (`save`) on rank 0 only; no rank returns before it is in place.
    pub fn save_on_main(&self, save: impl FnOnce() -> Result<()>) -> Result<()> {
        if self.dist.is_main() {
            save()?;
        }
        self.dist.barrier()
    }
}
