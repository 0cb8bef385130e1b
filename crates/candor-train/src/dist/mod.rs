//! Data parallel: one process per device, each training the same model on its own slice of
//! every global batch; gradients summed across ranks before clipping; rank 0 alone writes.
//!
//! ```text
//!   every rank                         rank 0 only
//!   ─────────────────────────────────  ──────────────────────────
//!   idx = sampler.next(batch_size)     (same global batch on every rank: same seed, same cursor)
//!   mine = idx[shard_range(len)]       (disjoint, covering)
//!   loss_r = Σ_mine CE / N_global      (N_global: target tokens of the whole global batch)
//!   backward → grads_r
//!   grads = all_reduce_sum(grads_r)    (= the gradient of the global batch's mean loss)
//!   clip, AdamW step (identical on every rank, so weights stay identical)
//!                                      log metrics, evaluate, write checkpoints
//! ```
//!
//! Because each rank scales its summed loss by the *global* number of target tokens (every
//! rank knows the whole global batch, so it can count them without talking to the others),
//! the summed gradient is exactly the full-batch gradient for any split and any padding:
//! world size 2 on half batches trains the same model as world size 1 on whole batches
//! (tested). `train.batch_size` is therefore the global batch; each rank holds about
//! `batch_size / world_size` examples per micro-batch.
//!
//! [`Comm`] is the transport: [`Single`] (one process), [`LocalGroup`] (threads in one
//! process: tests), [`Tcp`] (processes over TCP through rank 0, on any device: CPU runs and a
//! fallback for GPUs NCCL will not group), and `Nccl` (feature `nccl`: GPUs, with the NCCL
//! unique id sent from rank 0 over the same TCP rendezvous). [`LaunchEnv`] reads the usual
//! launcher variables (torchrun's RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT, or
//! Slurm's SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID inside an `srun` step).
//!
//! One file each: this one (the [`Dist`] handle and its collectives, [`connect`]),
//! `launch` (the launcher's environment), `host` (the exchange through one place that the
//! threads and TCP transports share), `local` ([`LocalGroup`]), `tcp` ([`Tcp`]) and `nccl`.
//! The sharded gradient step ([`sharded_grads`]) lives with the other step code in
//! [`crate::step`].

use std::ops::Range;
use std::sync::Arc;

use candle_core::{Device, Tensor, Var};

use crate::error::{Error, Result};
use crate::optim::{AdamW, Grads};

mod host;
mod launch;
mod local;
#[cfg(feature = "nccl")]
mod nccl;
mod tcp;

pub use crate::step::{sharded_grads, StepGrads};
pub use host::WAIT;
pub use launch::{LaunchEnv, DEFAULT_MASTER_PORT};
pub use local::LocalGroup;
#[cfg(feature = "nccl")]
pub use nccl::Nccl;
pub use tcp::Tcp;

fn err(msg: impl Into<String>) -> Error {
    Error::Msg(msg.into())
}

/// The contiguous part of `0..n` that `rank` of `world` owns. Parts are disjoint, cover
/// `0..n`, and differ in size by at most one (the first `n % world` ranks get the extra).
pub fn shard_range(n: usize, rank: usize, world: usize) -> Range<usize> {
    assert!(world > 0 && rank < world, "rank {rank} of world {world}");
    let (base, extra) = (n / world, n % world);
    let start = rank * base + rank.min(extra);
    start..start + base + usize::from(rank < extra)
}

/// Collective operations among the ranks of one run. Every rank must call the same
/// operations in the same order with tensors of the same shapes.
pub trait Comm: Send + Sync {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// A short name for logs (`single`, `threads`, `tcp`, `nccl`).
    fn backend(&self) -> &'static str;
    /// Element-wise sums over the ranks, returned on each tensor's own device and dtype.
    fn all_reduce_sum(&self, tensors: &[Tensor]) -> Result<Vec<Tensor>>;
    /// Rank `root`'s tensors, on every rank.
    fn broadcast(&self, tensors: &[Tensor], root: usize) -> Result<Vec<Tensor>>;
    /// Returns when every rank has called it.
    fn barrier(&self) -> Result<()>;
}

/// One process, no peers.
pub struct Single;

impl Comm for Single {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn backend(&self) -> &'static str {
        "single"
    }
    fn all_reduce_sum(&self, tensors: &[Tensor]) -> Result<Vec<Tensor>> {
        Ok(tensors.to_vec())
    }
    fn broadcast(&self, tensors: &[Tensor], _root: usize) -> Result<Vec<Tensor>> {
        Ok(tensors.to_vec())
    }
    fn barrier(&self) -> Result<()> {
        Ok(())
    }
}

/// A stage's handle on its place in a data-parallel run (cheap to clone).
#[derive(Clone)]
pub struct Dist {
    comm: Arc<dyn Comm>,
}

impl Default for Dist {
    fn default() -> Self {
        Dist::single()
    }
}

impl std::fmt::Debug for Dist {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Dist(rank {} of {}, {})",
            self.rank(),
            self.world_size(),
            self.comm.backend()
        )
    }
}

impl Dist {
    pub fn single() -> Self {
        Dist {
            comm: Arc::new(Single),
        }
    }

    pub fn new(comm: impl Comm + 'static) -> Self {
        Dist {
            comm: Arc::new(comm),
        }
    }

    pub fn rank(&self) -> usize {
        self.comm.rank()
    }

    pub fn world_size(&self) -> usize {
        self.comm.world_size()
    }

    pub fn backend(&self) -> &'static str {
        self.comm.backend()
    }

    /// Rank 0: the one that logs, evaluates and writes checkpoints.
    pub fn is_main(&self) -> bool {
        self.rank() == 0
    }

    pub fn comm(&self) -> &dyn Comm {
        &*self.comm
    }

    /// This rank's part of `0..n` ([`shard_range`]).
    pub fn shard_range(&self, n: usize) -> Range<usize> {
        shard_range(n, self.rank(), self.world_size())
    }

    /// This rank's contiguous slice of a global batch (prompts of a PPO rollout, example
    /// indices of a training batch).
    pub fn shard<'a, T>(&self, items: &'a [T]) -> &'a [T] {
        &items[self.shard_range(items.len())]
    }

    pub fn barrier(&self) -> Result<()> {
        self.comm.barrier()
    }

    /// Sums over the ranks of a few numbers (metrics, token counts, moments for a global
    /// mean/variance), in f64.
    pub fn all_reduce_f64(&self, xs: &[f64]) -> Result<Vec<f64>> {
        if self.world_size() == 1 || xs.is_empty() {
            return Ok(xs.to_vec());
        }
        let t = Tensor::new(xs, &Device::Cpu)?;
        Ok(self.comm.all_reduce_sum(&[t])?[0].to_vec1::<f64>()?)
    }

    /// Rank 0's value of a number every rank should agree on; an error naming `what` when
    /// this rank's differs.
    pub fn check_same(&self, what: &str, value: u64) -> Result<()> {
        if self.world_size() == 1 {
            return Ok(());
        }
        let t = Tensor::new(&[value as f64], &Device::Cpu)?;
        let root = self.comm.broadcast(&[t], 0)?[0].to_vec1::<f64>()?[0] as u64;
        if root != value {
            return Err(err(format!(
                "rank {} has {what} {value} but rank 0 has {root}",
                self.rank()
            )));
        }
        Ok(())
    }

    /// Sum the gradients of `opt`'s parameters over the ranks, in place. A parameter without
    /// a gradient on some rank (it had no examples in this minibatch) counts as zeros there;
    /// one without a gradient on every rank stays `None`.
    pub fn all_reduce_grads(&self, grads: &mut Grads, opt: &AdamW) -> Result<()> {
        if self.world_size() == 1 {
            return Ok(());
        }
        let present: Vec<f64> = grads
            .0
            .iter()
            .map(|g| f64::from(u8::from(g.is_some())))
            .collect();
        let present = self.all_reduce_f64(&present)?;
        let mut slots = vec![];
        let mut tensors = vec![];
        for (i, (g, (_, var))) in grads.0.iter().zip(&opt.params).enumerate() {
            if present[i] == 0.0 {
                continue;
            }
            slots.push(i);
            tensors.push(match g {
                Some(g) => g.clone(),
                None => var.as_tensor().zeros_like()?,
            });
        }
        let summed = self.comm.all_reduce_sum(&tensors)?;
        for (i, t) in slots.into_iter().zip(summed) {
            grads.0[i] = Some(t);
        }
        Ok(())
    }

    /// Every rank's numbers (any count, possibly none), in rank order.
    pub fn all_gather_f64(&self, mine: &[f64]) -> Result<Vec<Vec<f64>>> {
        let (rank, world) = (self.rank(), self.world_size());
        if world == 1 {
            return Ok(vec![mine.to_vec()]);
        }
        let mut lens = vec![0.0; world];
        lens[rank] = mine.len() as f64;
        let lens: Vec<usize> = self
            .all_reduce_f64(&lens)?
            .into_iter()
            .map(|n| n as usize)
            .collect();
        // a sum in which each rank fills only its own slots: exact, whatever the transport
        let offset: usize = lens[..rank].iter().sum();
        let mut all = vec![0.0; lens.iter().sum()];
        all[offset..offset + mine.len()].copy_from_slice(mine);
        let all = self.all_reduce_f64(&all)?;
        let mut parts = vec![];
        let mut at = 0;
        for n in lens {
            parts.push(all[at..at + n].to_vec());
            at += n;
        }
        Ok(parts)
    }

    /// Rank 0's value of anything serialisable (a generator state), on every rank.
    pub fn broadcast_value<T: serde::Serialize + serde::de::DeserializeOwned + Clone>(
        &self,
        value: &T,
    ) -> Result<T> {
        if self.world_size() == 1 {
            return Ok(value.clone());
        }
        let bytes: Vec<f64> = if self.is_main() {
            serde_json::to_vec(value)
                .map_err(|e| err(e.to_string()))?
                .into_iter()
                .map(f64::from)
                .collect()
        } else {
            vec![]
        };
        let bytes: Vec<u8> = self
            .all_gather_f64(&bytes)?
            .swap_remove(0)
            .into_iter()
            .map(|b| b as u8)
            .collect();
        serde_json::from_slice(&bytes).map_err(|e| {
            err(format!(
                "rank {}: rank 0's value did not arrive whole: {e}",
                self.rank()
            ))
        })
    }

    /// Where every rank's loop starts: rank 0's weights, and the same resume step (a rank
    /// that resumed elsewhere stops with an error).
    pub fn sync_start(&self, vars: &[(String, Var)], step: u64) -> Result<()> {
        self.broadcast_vars(vars)?;
        self.check_same(
            "resume step (is --out on a filesystem every rank sees?)",
            step,
        )
    }

    /// Make every rank's parameters equal to rank 0's (after initialising or loading).
    pub fn broadcast_vars(&self, vars: &[(String, Var)]) -> Result<()> {
        if self.world_size() == 1 {
            return Ok(());
        }
        let tensors: Vec<Tensor> = vars.iter().map(|(_, v)| v.as_tensor().detach()).collect();
        let root = self.comm.broadcast(&tensors, 0)?;
        for ((_, v), t) in vars.iter().zip(root) {
            v.set(&t)?;
        }
        Ok(())
    }
}

/// Join the run described by `env` on `device`: NCCL when `backend` is `nccl` (or `auto`
/// with a CUDA device in a build with the `nccl` feature), else TCP through rank 0.
pub fn connect(env: &LaunchEnv, device: &Device, backend: &str) -> Result<Dist> {
    let nccl_built = cfg!(feature = "nccl");
    let use_nccl = match backend {
        "auto" => nccl_built && device.is_cuda(),
        "nccl" => true,
        "tcp" => false,
        other => {
            return Err(err(format!(
                "CANDOR_DIST_BACKEND `{other}`: expected auto, nccl or tcp"
            )))
        }
    };
    if use_nccl {
        #[cfg(feature = "nccl")]
        return Ok(Dist::new(Nccl::connect(env, device)?));
        #[cfg(not(feature = "nccl"))]
        return Err(err(
            "the nccl backend needs a candor built with --features nccl",
        ));
    }
    Ok(Dist::new(Tcp::connect(env)?))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::batch::Sampler;
    use crate::config::TrainConfig;
    use candle_core::DType;
    use candor_core::rng::Rng;

    #[test]
    fn shards_are_disjoint_covering_and_balanced() {
        for n in 0..20 {
            for world in 1..6 {
                let mut seen = vec![0; n];
                let mut sizes = vec![];
                let mut next = 0;
                for rank in 0..world {
                    let r = shard_range(n, rank, world);
                    assert_eq!(r.start, next, "contiguous, in rank order");
                    next = r.end;
                    sizes.push(r.len());
                    r.for_each(|i| seen[i] += 1);
                }
                assert!(
                    seen.iter().all(|&c| c == 1),
                    "n {n} world {world}: {seen:?}"
                );
                assert!(sizes.iter().max().unwrap() - sizes.iter().min().unwrap() <= 1);
            }
        }
        assert_eq!(shard_range(7, 0, 2), 0..4);
        assert_eq!(shard_range(7, 1, 2), 4..7);
    }

    /// Every rank draws the same global batches (same seed and cursor) and keeps a disjoint
    /// part of each; together the parts are exactly the global batch.
    #[test]
    fn ranks_draw_disjoint_parts_of_the_same_global_batches() {
        let world = 3;
        let mut samplers: Vec<Sampler> = (0..world)
            .map(|_| Sampler::new(50, 9, Default::default()))
            .collect();
        let mut single = Sampler::new(50, 9, Default::default());
        for _ in 0..40 {
            let global = single.next(8);
            let mut union = vec![];
            for (rank, s) in samplers.iter_mut().enumerate() {
                let idx = s.next(8);
                assert_eq!(idx, global);
                union.extend_from_slice(&idx[shard_range(idx.len(), rank, world)]);
            }
            assert_eq!(union, global);
        }
    }

    /// Run `f` on one thread per member of `comms`, each with its rank's [`Dist`].
    pub(crate) fn on_threads<T: Send + 'static>(
        comms: Vec<impl Comm + 'static>,
        f: impl Fn(Dist) -> T + Send + Sync + 'static,
    ) -> Vec<T> {
        let f = Arc::new(f);
        let handles: Vec<_> = comms
            .into_iter()
            .map(|c| {
                let f = f.clone();
                std::thread::spawn(move || f(Dist::new(c)))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    }

    /// all_gather of uneven (and empty) parts, rank 0's value of a serialisable state, and
    /// gradients missing on the rank that had no examples counted as zeros.
    #[test]
    fn gathers_broadcasts_values_and_zero_fills_missing_gradients() {
        let out = on_threads(LocalGroup::new(3), |d| {
            let r = d.rank();
            let mine: Vec<f64> = (0..r).map(|i| (10 * r + i) as f64 + 0.25).collect();
            let parts = d.all_gather_f64(&mine).unwrap();
            assert_eq!(parts, vec![vec![], vec![10.25], vec![20.25, 21.25]]);
            let mut rng = Rng::new(r as u64);
            rng.next_u64();
            let root = d.broadcast_value(&rng).unwrap();
            let mut want = Rng::new(0);
            want.next_u64();
            assert_eq!(root, want, "u64 state words survive the f64 exchange");
            // two parameters; rank 1 has no gradient at all, rank 2 only for the first
            let vars: Vec<(String, Var)> = (0..2)
                .map(|i| {
                    (
                        format!("p{i}"),
                        Var::zeros((2, 2), DType::F32, &Device::Cpu).unwrap(),
                    )
                })
                .collect();
            let opt = AdamW::new(vars, &TrainConfig::default()).unwrap();
            let g = |x: f32| Some(Tensor::full(x, (2, 2), &Device::Cpu).unwrap());
            let mut grads = Grads(match r {
                0 => vec![g(1.0), g(5.0)],
                1 => vec![None, None],
                _ => vec![g(2.0), None],
            });
            d.all_reduce_grads(&mut grads, &opt).unwrap();
            grads
                .0
                .iter()
                .map(|t| {
                    t.as_ref()
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .to_vec1::<f32>()
                        .unwrap()[0]
                })
                .collect::<Vec<f32>>()
        });
        assert!(out.iter().all(|g| g == &vec![3.0, 5.0]), "{out:?}");
    }
}
