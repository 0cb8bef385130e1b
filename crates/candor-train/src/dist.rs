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

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::ops::Range;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor, Var};

use crate::batch::Sampler;
use crate::config::TrainConfig;
use crate::error::{Error, Result};
use crate::optim::{AdamW, Grads};

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

// ---------------------------------------------------------------------------------------
// One optimiser step's gradients, sharded.

/// One optimiser step's gradients (summed over the ranks), loss and tokens (global).
pub struct StepGrads {
    pub grads: Grads,
    /// Mean loss per term (target token, pair) of each global micro-batch, averaged over
    /// the micro-batches.
    pub loss: f64,
    /// Tokens the step saw, all ranks and micro-batches together.
    pub tokens: usize,
}

/// Forward and backward over `train.grad_accum` global micro-batches of `train.batch_size`
/// examples drawn by `sampler` (identically on every rank), of which this rank takes its
/// [`shard_range`]. Example `i` brings `terms(i)` terms to the loss (its target tokens, its
/// pairs); `summed_loss(mine)` returns the *sum* of the loss terms of this rank's examples
/// and the tokens it read. Each sum is divided by the global micro-batch's number of terms
/// (every rank knows the whole micro-batch, so no exchange is needed) and by `grad_accum`,
/// and the gradients are summed over the ranks: the result is the gradient of the mean
/// loss of the whole batch, whatever the world size and however the terms fall into the
/// shards. With [`Dist::single`] it is plain gradient accumulation.
pub fn sharded_grads(
    opt: &AdamW,
    sampler: &mut Sampler,
    train: &TrainConfig,
    dist: &Dist,
    terms: impl Fn(usize) -> usize,
    mut summed_loss: impl FnMut(&[usize]) -> Result<(Tensor, usize)>,
) -> Result<StepGrads> {
    let mut grads = opt.zero_grads();
    let (mut loss_sum, mut tokens) = (0.0f64, 0usize);
    for _ in 0..train.grad_accum {
        let idx = sampler.next(train.batch_size);
        let n_global: usize = idx.iter().map(|&i| terms(i)).sum();
        let mine = dist.shard(&idx);
        if mine.is_empty() {
            continue;
        }
        let (sum, n_tokens) = summed_loss(mine)?;
        let scaled = (sum / (n_global.max(1) * train.grad_accum) as f64)?;
        loss_sum += scaled.to_scalar::<f32>()? as f64;
        tokens += n_tokens;
        opt.accumulate(&scaled.backward()?, &mut grads)?;
    }
    dist.all_reduce_grads(&mut grads, opt)?;
    let totals = dist.all_reduce_f64(&[loss_sum, tokens as f64])?;
    Ok(StepGrads {
        grads,
        loss: totals[0],
        tokens: totals[1] as usize,
    })
}

// ---------------------------------------------------------------------------------------
// Where a rank is: the launcher's environment.

/// A rank's place in a multi-process run, from the launcher's environment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LaunchEnv {
    pub rank: usize,
    pub world_size: usize,
    /// Rank among the processes on this host: the GPU it uses.
    pub local_rank: usize,
    /// Rank 0's host and a free port on it: where the others connect.
    pub master_addr: String,
    pub master_port: u16,
}

/// Default MASTER_PORT, as torchrun's.
pub const DEFAULT_MASTER_PORT: u16 = 29500;

impl LaunchEnv {
    /// Read torchrun-style variables (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`,
    /// `MASTER_PORT`), else Slurm's inside an `srun` step (`SLURM_PROCID`,
    /// `SLURM_STEP_NUM_TASKS` or `SLURM_NTASKS`, `SLURM_LOCALID`; `MASTER_ADDR` must still be
    /// set, e.g. to the first host of the allocation). `None` when neither names a world
    /// of more than one process (a world of one with `MASTER_ADDR` set is a run of one
    /// rank, its transport set up: a smoke test of NCCL). A Slurm batch script itself (no
    /// step) is not a rank.
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<Option<Self>> {
        let num =
            |key: &str| -> Result<Option<usize>> {
                match get(key) {
                    None => Ok(None),
                    Some(v) if v.trim().is_empty() => Ok(None),
                    Some(v) => v.trim().parse::<usize>().map(Some).map_err(|_| {
                        err(format!("environment: {key}=`{v}` is not a whole number"))
                    }),
                }
            };
        let (rank, world, local, source) = if let Some(world) = num("WORLD_SIZE")? {
            let rank = num("RANK")?
                .ok_or_else(|| err("environment: WORLD_SIZE is set but RANK is not"))?;
            (rank, world, num("LOCAL_RANK")?.unwrap_or(rank), "RANK")
        } else if get("SLURM_STEP_ID")
            .or_else(|| get("SLURM_STEPID"))
            .is_some()
            && num("SLURM_PROCID")?.is_some()
        {
            let world = match num("SLURM_STEP_NUM_TASKS")? {
                Some(w) => w,
                None => num("SLURM_NTASKS")?.unwrap_or(1),
            };
            let rank = num("SLURM_PROCID")?.unwrap_or(0);
            (
                rank,
                world,
                num("SLURM_LOCALID")?.unwrap_or(0),
                "SLURM_PROCID",
            )
        } else {
            return Ok(None);
        };
        if world == 0 {
            return Err(err("environment: the world size is 0"));
        }
        if rank >= world {
            return Err(err(format!(
                "environment: {source}={rank} is not below the world size {world}"
            )));
        }
        let master_addr = get("MASTER_ADDR").filter(|s| !s.trim().is_empty());
        if world == 1 && master_addr.is_none() {
            return Ok(None); // alone; a world of one with MASTER_ADDR still sets up its transport
        }
        let master_addr = master_addr.ok_or_else(|| {
            err(format!("environment: a world of {world} processes needs MASTER_ADDR (rank 0's host) and MASTER_PORT"))
        })?;
        let master_port = match get("MASTER_PORT") {
            None => DEFAULT_MASTER_PORT,
            Some(p) => p.trim().parse::<u16>().map_err(|_| {
                err(format!(
                    "environment: MASTER_PORT=`{p}` is not a port number"
                ))
            })?,
        };
        Ok(Some(LaunchEnv {
            rank,
            world_size: world,
            local_rank: local,
            master_addr,
            master_port,
        }))
    }

    pub fn from_env() -> Result<Option<Self>> {
        Self::from_vars(|k| std::env::var(k).ok())
    }
}

// ---------------------------------------------------------------------------------------
// Host transports: every rank's numbers go to one place, are combined in rank order
// (deterministic), and the result goes back to every rank.

/// How a host exchange combines the ranks' contributions.
#[derive(Clone, Copy, Debug)]
enum Op {
    Sum,
    Take(usize),
}

fn combine(parts: &[Vec<f64>], op: Op) -> std::result::Result<Vec<f64>, String> {
    match op {
        Op::Take(root) => Ok(parts[root].clone()),
        Op::Sum => {
            let n = parts[0].len();
            if let Some((r, p)) = parts.iter().enumerate().find(|(_, p)| p.len() != n) {
                return Err(format!(
                    "rank {r} sent {} numbers and rank 0 sent {n}: the ranks are out of step",
                    p.len()
                ));
            }
            let mut out = parts[0].clone();
            for p in &parts[1..] {
                for (o, x) in out.iter_mut().zip(p) {
                    *o += x;
                }
            }
            Ok(out)
        }
    }
}

/// A transport that exchanges f64 buffers through one place.
trait Exchange: Send + Sync {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    fn exchange(&self, data: Vec<f64>, op: Op) -> Result<Vec<f64>>;
}

/// Flatten tensors to f64 on the host, exchange, and rebuild them on their devices.
fn host_collective(x: &dyn Exchange, tensors: &[Tensor], op: Op) -> Result<Vec<Tensor>> {
    let mut flat = Vec::with_capacity(tensors.iter().map(Tensor::elem_count).sum());
    let send = match op {
        Op::Take(root) => x.rank() == root,
        Op::Sum => true,
    };
    if send {
        for t in tensors {
            flat.extend(
                t.to_device(&Device::Cpu)?
                    .to_dtype(DType::F64)?
                    .flatten_all()?
                    .to_vec1::<f64>()?,
            );
        }
    }
    let out = x.exchange(flat, op)?;
    let want: usize = tensors.iter().map(Tensor::elem_count).sum();
    if out.len() != want {
        return Err(err(format!(
            "rank {} expected {want} numbers and got {}: the ranks are out of step",
            x.rank(),
            out.len()
        )));
    }
    let mut off = 0;
    tensors
        .iter()
        .map(|t| {
            let n = t.elem_count();
            let part = Tensor::from_slice(&out[off..off + n], t.shape(), &Device::Cpu)?;
            off += n;
            Ok(part.to_dtype(t.dtype())?.to_device(t.device())?)
        })
        .collect()
}

macro_rules! host_comm {
    ($t:ty, $name:literal) => {
        impl Comm for $t {
            fn rank(&self) -> usize {
                Exchange::rank(self)
            }
            fn world_size(&self) -> usize {
                Exchange::world_size(self)
            }
            fn backend(&self) -> &'static str {
                $name
            }
            fn all_reduce_sum(&self, tensors: &[Tensor]) -> Result<Vec<Tensor>> {
                host_collective(self, tensors, Op::Sum)
            }
            fn broadcast(&self, tensors: &[Tensor], root: usize) -> Result<Vec<Tensor>> {
                host_collective(self, tensors, Op::Take(root))
            }
            fn barrier(&self) -> Result<()> {
                self.exchange(vec![], Op::Sum).map(|_| ())
            }
        }
    };
}

/// How long a rank waits for the others to arrive (rendezvous, and threads at a collective).
pub const WAIT: Duration = Duration::from_secs(300);

/// Ranks as threads of one process (tests, and simulating a world on one machine).
pub struct LocalGroup {
    rank: usize,
    shared: Arc<LocalShared>,
}

struct LocalShared {
    n: usize,
    state: Mutex<LocalState>,
    cv: Condvar,
}

#[derive(Default)]
struct LocalState {
    slots: Vec<Option<Vec<f64>>>,
    arrived: usize,
    result: Option<std::result::Result<Arc<Vec<f64>>, String>>,
    taken: usize,
    /// Members dropped (a thread that ended, perhaps with an error).
    left: usize,
}

impl LocalGroup {
    /// `n` connected members, one per thread: member `r` is rank `r`.
    pub fn new(n: usize) -> Vec<LocalGroup> {
        let shared = Arc::new(LocalShared {
            n,
            state: Mutex::new(LocalState {
                slots: vec![None; n],
                ..Default::default()
            }),
            cv: Condvar::new(),
        });
        (0..n)
            .map(|rank| LocalGroup {
                rank,
                shared: shared.clone(),
            })
            .collect()
    }
}

impl Drop for LocalGroup {
    fn drop(&mut self) {
        let mut s = self.shared.state.lock().unwrap_or_else(|p| p.into_inner());
        s.left += 1;
        self.shared.cv.notify_all();
    }
}

impl Exchange for LocalGroup {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.shared.n
    }
    fn exchange(&self, data: Vec<f64>, op: Op) -> Result<Vec<f64>> {
        let sh = &*self.shared;
        let deadline = Instant::now() + WAIT;
        let mut s = sh.state.lock().unwrap_or_else(|p| p.into_inner());
        // the previous collective must have been collected by everyone
        while s.result.is_some() {
            s = sh
                .cv
                .wait_timeout(s, Duration::from_millis(100))
                .unwrap_or_else(|p| p.into_inner())
                .0;
            if Instant::now() > deadline {
                return Err(err(format!(
                    "rank {}: timed out waiting for the other ranks",
                    self.rank
                )));
            }
        }
        s.slots[self.rank] = Some(data);
        s.arrived += 1;
        if s.arrived == sh.n {
            let parts: Vec<Vec<f64>> = s
                .slots
                .iter_mut()
                .map(|x| x.take().unwrap_or_default())
                .collect();
            s.result = Some(combine(&parts, op).map(Arc::new));
            sh.cv.notify_all();
        } else {
            while s.result.is_none() {
                if s.left > 0 {
                    return Err(err(format!(
                        "rank {}: another rank stopped before this collective (see its error)",
                        self.rank
                    )));
                }
                if Instant::now() > deadline {
                    return Err(err(format!(
                        "rank {}: timed out waiting for the other ranks",
                        self.rank
                    )));
                }
                s = sh
                    .cv
                    .wait_timeout(s, Duration::from_millis(100))
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
        }
        let out = s.result.clone().expect("result is set");
        s.taken += 1;
        if s.taken == sh.n {
            s.result = None;
            s.taken = 0;
            s.arrived = 0;
            sh.cv.notify_all();
        }
        Ok(out.map_err(Error::Msg)?.to_vec())
    }
}

host_comm!(LocalGroup, "threads");

/// Ranks as processes, star-connected to rank 0 over TCP at MASTER_ADDR:MASTER_PORT. Rank 0
/// receives every rank's buffer, combines them and sends the result back: simple and
/// deterministic, fine for CPU runs and small models; NCCL is the fast path on GPUs.
pub struct Tcp {
    rank: usize,
    world: usize,
    /// Rank 0: streams to ranks 1..world (index r-1). Others: one stream to rank 0.
    peers: Mutex<Vec<TcpStream>>,
}

const MAGIC: &[u8; 4] = b"CNDR";

fn io_err(what: &str, e: std::io::Error) -> Error {
    err(format!("{what}: {e}"))
}

impl Tcp {
    /// Rendezvous: rank 0 listens on `master_port` and waits (up to [`WAIT`]) for the other
    /// ranks, which connect (retrying while rank 0 starts) and say who they are.
    pub fn connect(env: &LaunchEnv) -> Result<Tcp> {
        let deadline = Instant::now() + WAIT;
        let (addr, port) = (env.master_addr.as_str(), env.master_port);
        if env.rank == 0 {
            let loopback = addr == "localhost" || addr.starts_with("127.");
            let bind = if loopback {
                format!("{addr}:{port}")
            } else {
                format!("0.0.0.0:{port}")
            };
            let listener = TcpListener::bind(&bind)
                .map_err(|e| io_err(&format!("rank 0 cannot listen on {bind} (MASTER_PORT)"), e))?;
            listener
                .set_nonblocking(true)
                .map_err(|e| io_err("listener", e))?;
            let mut peers: Vec<Option<TcpStream>> = (1..env.world_size).map(|_| None).collect();
            while peers.iter().any(Option::is_none) {
                match listener.accept() {
                    Ok((mut s, from)) => {
                        s.set_nonblocking(false).map_err(|e| io_err("socket", e))?;
                        s.set_read_timeout(Some(Duration::from_secs(30)))
                            .map_err(|e| io_err("socket", e))?;
                        let mut hello = [0u8; 12];
                        s.read_exact(&mut hello)
                            .map_err(|e| io_err(&format!("rank 0: hello from {from}"), e))?;
                        let r = u32::from_le_bytes(hello[4..8].try_into().unwrap()) as usize;
                        let w = u32::from_le_bytes(hello[8..12].try_into().unwrap()) as usize;
                        if &hello[..4] != MAGIC || w != env.world_size || r == 0 || r >= w {
                            return Err(err(format!(
                                "rank 0: {from} connected to MASTER_PORT {port} claiming rank {r} of {w} (this run has {} ranks)",
                                env.world_size
                            )));
                        }
                        if peers[r - 1].is_some() {
                            return Err(err(format!("rank 0: two processes claim rank {r}")));
                        }
                        s.set_read_timeout(None).map_err(|e| io_err("socket", e))?;
                        s.set_nodelay(true).map_err(|e| io_err("socket", e))?;
                        peers[r - 1] = Some(s);
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        if Instant::now() > deadline {
                            let missing: Vec<String> = peers
                                .iter()
                                .enumerate()
                                .filter(|(_, p)| p.is_none())
                                .map(|(i, _)| (i + 1).to_string())
                                .collect();
                            return Err(err(format!(
                                "rank 0: rank(s) {} did not connect to {bind} within {} s",
                                missing.join(", "),
                                WAIT.as_secs()
                            )));
                        }
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    Err(e) => return Err(io_err("rank 0: accept", e)),
                }
            }
            Ok(Tcp {
                rank: 0,
                world: env.world_size,
                peers: Mutex::new(peers.into_iter().map(Option::unwrap).collect()),
            })
        } else {
            let target = format!("{addr}:{port}");
            let stream = loop {
                let attempt = target
                    .to_socket_addrs()
                    .map_err(|e| io_err(&format!("rank {}: MASTER_ADDR {addr}", env.rank), e))?
                    .find_map(|a| TcpStream::connect_timeout(&a, Duration::from_secs(2)).ok());
                if let Some(s) = attempt {
                    break s;
                }
                if Instant::now() > deadline {
                    return Err(err(format!(
                        "rank {}: cannot reach rank 0 at {target} within {} s",
                        env.rank,
                        WAIT.as_secs()
                    )));
                }
                std::thread::sleep(Duration::from_millis(50));
            };
            stream.set_nodelay(true).map_err(|e| io_err("socket", e))?;
            let mut hello = MAGIC.to_vec();
            hello.extend((env.rank as u32).to_le_bytes());
            hello.extend((env.world_size as u32).to_le_bytes());
            (&stream)
                .write_all(&hello)
                .map_err(|e| io_err(&format!("rank {}: hello to rank 0", env.rank), e))?;
            Ok(Tcp {
                rank: env.rank,
                world: env.world_size,
                peers: Mutex::new(vec![stream]),
            })
        }
    }
}

fn send(s: &mut TcpStream, data: &[f64]) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(8 + 8 * data.len());
    buf.extend((data.len() as u64).to_le_bytes());
    for x in data {
        buf.extend(x.to_le_bytes());
    }
    s.write_all(&buf)
}

fn recv(s: &mut TcpStream) -> std::io::Result<Vec<f64>> {
    let mut len = [0u8; 8];
    s.read_exact(&mut len)?;
    let n = u64::from_le_bytes(len) as usize;
    let mut buf = vec![0u8; n * 8];
    s.read_exact(&mut buf)?;
    Ok(buf
        .chunks_exact(8)
        .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
        .collect())
}

impl Exchange for Tcp {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world
    }
    fn exchange(&self, data: Vec<f64>, op: Op) -> Result<Vec<f64>> {
        let mut peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        let lost = |r: usize, e: std::io::Error| {
            err(format!(
                "rank {}: lost rank {r} ({e}); it probably failed: see its error",
                self.rank
            ))
        };
        if self.rank == 0 {
            let mut parts = vec![data];
            for (i, s) in peers.iter_mut().enumerate() {
                parts.push(recv(s).map_err(|e| lost(i + 1, e))?);
            }
            let out = combine(&parts, op).map_err(Error::Msg)?;
            for (i, s) in peers.iter_mut().enumerate() {
                send(s, &out).map_err(|e| lost(i + 1, e))?;
            }
            Ok(out)
        } else {
            let s = &mut peers[0];
            send(s, &data).map_err(|e| lost(0, e))?;
            recv(s).map_err(|e| lost(0, e))
        }
    }
}

host_comm!(Tcp, "tcp");

// ---------------------------------------------------------------------------------------
// NCCL (feature `nccl`): all-reduce on the GPU, rank 0's unique id sent over the TCP rendezvous.

#[cfg(feature = "nccl")]
pub use nccl::Nccl;

#[cfg(feature = "nccl")]
mod nccl {
    use super::*;
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::nccl::safe::{Comm as NcclComm, Id, ReduceOp};
    use candle_core::{CpuStorage, CudaStorage, CustomOp1, Layout, Shape};

    /// NCCL collectives on one GPU per rank.
    pub struct Nccl {
        comm: Mutex<NcclComm>,
        device: Device,
        rank: usize,
        world: usize,
    }

    // SAFETY: an NCCL communicator may be used from any thread as long as calls are not
    // concurrent; the Mutex serialises them.
    unsafe impl Send for Nccl {}
    unsafe impl Sync for Nccl {}

    impl Nccl {
        /// Rendezvous over TCP (as [`Tcp::connect`]), rank 0 creates the NCCL unique id and
        /// sends it; then every rank joins the communicator on `device` (a CUDA device).
        pub fn connect(env: &LaunchEnv, device: &Device) -> Result<Nccl> {
            let cuda = device
                .as_cuda_device()
                .map_err(|_| err("the nccl backend needs --device cuda"))?;
            let tcp = Tcp::connect(env)?;
            let id = if env.rank == 0 {
                let id = Id::new()
                    .map_err(|e| err(format!("NCCL: cannot create a unique id: {e:?}")))?;
                let bytes: Vec<f64> = id.internal().iter().map(|&c| c as u8 as f64).collect();
                tcp.exchange(bytes, Op::Take(0))?;
                id
            } else {
                let bytes = tcp.exchange(vec![], Op::Take(0))?;
                if bytes.len() != 128 {
                    return Err(err(format!(
                        "rank {}: received an NCCL id of {} bytes",
                        env.rank,
                        bytes.len()
                    )));
                }
                let mut internal = [0 as ::core::ffi::c_char; 128];
                for (d, b) in internal.iter_mut().zip(bytes) {
                    *d = b as u8 as ::core::ffi::c_char;
                }
                Id::uninit(internal)
            };
            let comm = NcclComm::from_rank(cuda.cuda_stream(), env.rank, env.world_size, id)
                .map_err(|e| err(format!("rank {}: NCCL init failed: {e:?}", env.rank)))?;
            Ok(Nccl {
                comm: Mutex::new(comm),
                device: device.clone(),
                rank: env.rank,
                world: env.world_size,
            })
        }
    }

    struct AllReduce<'a>(&'a NcclComm);

    impl CustomOp1 for AllReduce<'_> {
        fn name(&self) -> &'static str {
            "nccl-all-reduce"
        }
        fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
            candle_core::bail!("NCCL all-reduce needs a CUDA tensor")
        }
        fn cuda_fwd(
            &self,
            s: &CudaStorage,
            l: &Layout,
        ) -> candle_core::Result<(CudaStorage, Shape)> {
            let Some((start, end)) = l.contiguous_offsets() else {
                candle_core::bail!("NCCL all-reduce needs a contiguous tensor")
            };
            let dev = s.device.clone();
            let nccl_err = |e| candle_core::Error::Msg(format!("NCCL all-reduce: {e:?}"));
            let out = match s.dtype() {
                DType::F32 => {
                    let src = s.as_cuda_slice::<f32>()?.slice(start..end);
                    // SAFETY: fully written by the all-reduce before anything reads it.
                    let mut dst = unsafe { dev.alloc::<f32>(end - start)? };
                    self.0
                        .all_reduce(&src, &mut dst, &ReduceOp::Sum)
                        .map_err(nccl_err)?;
                    CudaStorage::wrap_cuda_slice(dst, dev)
                }
                DType::F64 => {
                    let src = s.as_cuda_slice::<f64>()?.slice(start..end);
                    // SAFETY: as above.
                    let mut dst = unsafe { dev.alloc::<f64>(end - start)? };
                    self.0
                        .all_reduce(&src, &mut dst, &ReduceOp::Sum)
                        .map_err(nccl_err)?;
                    CudaStorage::wrap_cuda_slice(dst, dev)
                }
                d => candle_core::bail!(
                    "NCCL all-reduce of {d:?} tensors is not wired (f32/f64 only)"
                ),
            };
            Ok((out, l.shape().clone()))
        }
    }

    impl Nccl {
        /// Sum tensors over the ranks in one NCCL call: flattened into one f32 (or f64, if
        /// any input is f64) buffer on this rank's GPU.
        fn reduce(&self, tensors: &[Tensor]) -> Result<Vec<Tensor>> {
            let dtype = if tensors.iter().any(|t| t.dtype() == DType::F64) {
                DType::F64
            } else {
                DType::F32
            };
            let flat: Vec<Tensor> = tensors
                .iter()
                .map(|t| {
                    t.detach()
                        .to_device(&self.device)?
                        .to_dtype(dtype)?
                        .flatten_all()
                })
                .collect::<candle_core::Result<_>>()?;
            let buf = Tensor::cat(&flat, 0)?.contiguous()?;
            let comm = self.comm.lock().unwrap_or_else(|p| p.into_inner());
            let summed = buf.apply_op1_no_bwd(&AllReduce(&comm))?;
            drop(comm);
            let mut off = 0;
            tensors
                .iter()
                .map(|t| {
                    let n = t.elem_count();
                    let part = summed
                        .narrow(0, off, n)?
                        .reshape(t.shape())?
                        .to_dtype(t.dtype())?
                        .to_device(t.device())?;
                    off += n;
                    Ok(part)
                })
                .collect()
        }
    }

    impl Comm for Nccl {
        fn rank(&self) -> usize {
            self.rank
        }
        fn world_size(&self) -> usize {
            self.world
        }
        fn backend(&self) -> &'static str {
            "nccl"
        }
        fn all_reduce_sum(&self, tensors: &[Tensor]) -> Result<Vec<Tensor>> {
            self.reduce(tensors)
        }
        /// A sum in which only `root` contributes non-zeros: exactly root's values.
        fn broadcast(&self, tensors: &[Tensor], root: usize) -> Result<Vec<Tensor>> {
            let mine: Vec<Tensor> = if self.rank == root {
                tensors.to_vec()
            } else {
                tensors
                    .iter()
                    .map(Tensor::zeros_like)
                    .collect::<candle_core::Result<_>>()?
            };
            self.reduce(&mine)
        }
        fn barrier(&self) -> Result<()> {
            let t = Tensor::zeros(1, DType::F32, &self.device)?;
            self.reduce(&[t])?;
            self.device.synchronize()?;
            Ok(())
        }
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
        return Ok(Dist::new(nccl::Nccl::connect(env, device)?));
        #[cfg(not(feature = "nccl"))]
        return Err(err(
            "the nccl backend needs a candor built with --features nccl",
        ));
    }
    Ok(Dist::new(Tcp::connect(env)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::LmExample;
    use crate::optim::named_vars;
    use candor_core::rng::Rng;
    use candor_model::io::build_trainable;
    use candor_model::{Head, ModelConfig};
    use std::collections::HashMap;

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

    #[test]
    fn launch_env_reads_torchrun_and_slurm_variables() {
        let env = |pairs: &[(&str, &str)]| {
            let m: HashMap<String, String> = pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            LaunchEnv::from_vars(move |k| m.get(k).cloned())
        };
        assert_eq!(env(&[]).unwrap(), None);
        assert_eq!(env(&[("RANK", "0"), ("WORLD_SIZE", "1")]).unwrap(), None);
        assert_eq!(
            env(&[("RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "h")])
                .unwrap()
                .unwrap()
                .world_size,
            1
        );
        let e = env(&[
            ("RANK", "1"),
            ("WORLD_SIZE", "4"),
            ("LOCAL_RANK", "1"),
            ("MASTER_ADDR", "node1"),
            ("MASTER_PORT", "1234"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(
            e,
            LaunchEnv {
                rank: 1,
                world_size: 4,
                local_rank: 1,
                master_addr: "node1".into(),
                master_port: 1234
            }
        );
        let e = env(&[
            ("SLURM_STEP_ID", "0"),
            ("SLURM_PROCID", "5"),
            ("SLURM_NTASKS", "8"),
            ("SLURM_LOCALID", "1"),
            ("MASTER_ADDR", "n0"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(
            (e.rank, e.world_size, e.local_rank, e.master_port),
            (5, 8, 1, DEFAULT_MASTER_PORT)
        );
        // a batch script (no step) is not a rank, even with SLURM_NTASKS > 1
        assert_eq!(
            env(&[("SLURM_PROCID", "0"), ("SLURM_NTASKS", "8")]).unwrap(),
            None
        );
        let bad = env(&[("RANK", "2"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "x")])
            .unwrap_err()
            .to_string();
        assert!(
            bad.contains("RANK=2 is not below the world size 2"),
            "{bad}"
        );
        let bad = env(&[("RANK", "0"), ("WORLD_SIZE", "two")])
            .unwrap_err()
            .to_string();
        assert!(
            bad.contains("WORLD_SIZE=`two` is not a whole number"),
            "{bad}"
        );
        let bad = env(&[("RANK", "0"), ("WORLD_SIZE", "2")])
            .unwrap_err()
            .to_string();
        assert!(bad.contains("needs MASTER_ADDR"), "{bad}");
    }

    fn on_threads<T: Send + 'static>(
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

    #[test]
    fn thread_group_all_reduces_broadcasts_and_survives_many_rounds() {
        let out = on_threads(LocalGroup::new(3), |d| {
            let r = d.rank() as f32;
            let mut last = vec![];
            for i in 0..50 {
                let t = Tensor::new(&[r, 10.0 * r + i as f32], &Device::Cpu).unwrap();
                let s = d
                    .comm()
                    .all_reduce_sum(&[t.clone(), t.sum_all().unwrap()])
                    .unwrap();
                last = s[0].to_vec1::<f32>().unwrap();
                assert_eq!(last, vec![3.0, 30.0 + 3.0 * i as f32]);
                assert_eq!(s[1].to_scalar::<f32>().unwrap(), 33.0 + 3.0 * i as f32);
                let b = d.comm().broadcast(&[t], 1).unwrap();
                assert_eq!(b[0].to_vec1::<f32>().unwrap(), vec![1.0, 10.0 + i as f32]);
                d.barrier().unwrap();
            }
            assert_eq!(d.all_reduce_f64(&[0.5, r as f64]).unwrap(), vec![1.5, 3.0]);
            d.check_same("step", 7).unwrap();
            last
        });
        assert_eq!(out.len(), 3);
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

    #[test]
    fn a_rank_that_stops_early_fails_the_others_instead_of_hanging() {
        let out = on_threads(LocalGroup::new(2), |d| {
            if d.rank() == 1 {
                return Ok(vec![]); // drops its member without joining the collective
            }
            d.all_reduce_f64(&[1.0])
        });
        let e = out[0].as_ref().unwrap_err().to_string();
        assert!(e.contains("another rank stopped"), "{e}");
        let e = on_threads(LocalGroup::new(2), |d| {
            d.check_same("step", d.rank() as u64 * 3)
        })
        .into_iter()
        .nth(1)
        .unwrap();
        assert!(e
            .unwrap_err()
            .to_string()
            .contains("rank 1 has step 3 but rank 0 has 0"));
    }

    #[test]
    fn tcp_ranks_rendezvous_and_all_reduce_across_threads() {
        let port = free_port();
        let handles: Vec<_> = (0..3)
            .map(|rank| {
                std::thread::spawn(move || {
                    let env = LaunchEnv {
                        rank,
                        world_size: 3,
                        local_rank: rank,
                        master_addr: "127.0.0.1".into(),
                        master_port: port,
                    };
                    let d = connect(&env, &Device::Cpu, "auto").unwrap();
                    assert_eq!(d.backend(), "tcp");
                    let t = Tensor::new(&[[rank as f32, 1.0], [2.0, 3.0]], &Device::Cpu).unwrap();
                    let s = d.comm().all_reduce_sum(&[t.clone()]).unwrap();
                    let b = d
                        .comm()
                        .broadcast(&[t.to_dtype(DType::BF16).unwrap()], 2)
                        .unwrap();
                    assert_eq!(b[0].dtype(), DType::BF16);
                    d.barrier().unwrap();
                    (
                        s[0].to_vec2::<f32>().unwrap(),
                        b[0].to_dtype(DType::F32).unwrap().to_vec2::<f32>().unwrap(),
                    )
                })
            })
            .collect();
        for h in handles {
            let (s, b) = h.join().unwrap();
            assert_eq!(s, vec![vec![3.0, 3.0], vec![6.0, 9.0]]);
            assert_eq!(b, vec![vec![2.0, 1.0], vec![2.0, 3.0]]);
        }
    }

    pub(crate) fn free_port() -> u16 {
        TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    /// Gradients: world size 2 on half batches, summed, equal world size 1 on the whole
    /// batch — with padding and uneven shards (5 examples of different lengths), where
    /// averaging per-rank means would not.
    #[test]
    fn world_of_two_on_half_batches_gives_the_full_batch_gradient() {
        let config = ModelConfig::llama(40, 32, 2, 4, 2, 64, 32, 10000.0, false);
        let mut rng = Rng::new(11);
        let examples: Vec<LmExample> = (0..10)
            .map(|i| {
                let len = 6 + (i * 7) % 13;
                let tokens: Vec<u32> = (0..len).map(|_| rng.below(40) as u32).collect();
                LmExample {
                    targets: (0..len).map(|t| t >= 2).collect(),
                    tokens,
                    segments: None,
                }
            })
            .collect();
        let examples = Arc::new(examples);
        let train = TrainConfig {
            batch_size: 5,
            grad_accum: 2,
            ..Default::default()
        };
        let grads_of = move |d: Dist, examples: Arc<Vec<LmExample>>, train: TrainConfig| {
            let (model, varmap) =
                build_trainable(&config, Head::Lm, None, &[], &mut Rng::new(4), &Device::Cpu)
                    .unwrap();
            let opt = AdamW::new(named_vars(&varmap), &train).unwrap();
            let mut sampler = Sampler::new(examples.len(), 2, Default::default());
            let step =
                crate::lm::lm_grads(&model, &opt, &examples, &mut sampler, &train, 0, &d).unwrap();
            let g: Vec<Vec<f32>> = step
                .grads
                .0
                .iter()
                .map(|g| {
                    g.as_ref()
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .to_vec1()
                        .unwrap()
                })
                .collect();
            (step.loss, step.tokens, g)
        };
        let (l1, n1, g1) = grads_of(Dist::single(), examples.clone(), train.clone());
        let ex2 = examples.clone();
        let t2 = train.clone();
        let two = on_threads(LocalGroup::new(2), move |d| {
            grads_of(d, ex2.clone(), t2.clone())
        });
        let mut worst = 0.0f32;
        for (l2, n2, g2) in &two {
            assert_eq!(*n2, n1);
            assert!((l2 - l1).abs() < 1e-6, "loss {l2} vs {l1}");
            for (a, b) in g1.iter().zip(g2) {
                for (x, y) in a.iter().zip(b) {
                    worst = worst.max((x - y).abs());
                }
            }
        }
        println!("world 2 vs world 1: loss {l1:.6}, worst gradient difference {worst:.2e}");
        assert!(worst < 1e-5, "gradients differ by {worst}");
    }
}
