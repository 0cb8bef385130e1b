//! NCCL (feature `nccl`): all-reduce on the GPU, rank 0's unique id sent over the TCP rendezvous.

use std::sync::Mutex;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::nccl::safe::{Comm as NcclComm, Id, ReduceOp};
use candle_core::{CpuStorage, CudaStorage, CustomOp1, DType, Device, Layout, Shape, Tensor};

use super::host::{Exchange, Op};
use super::{err, Comm, LaunchEnv, Tcp};
use crate::error::Result;

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
            let id =
                Id::new().map_err(|e| err(format!("NCCL: cannot create a unique id: {e:?}")))?;
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
    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
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
            d => candle_core::bail!("NCCL all-reduce of {d:?} tensors is not wired (f32/f64 only)"),
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
