//! Host transports: every rank's numbers go to one place, are combined in rank order
//! (deterministic), and the result goes back to every rank. The threads ([`super::LocalGroup`])
//! and TCP ([`super::Tcp`]) transports are such exchanges.

use std::time::Duration;

use candle_core::{DType, Device, Tensor};

use super::err;
use crate::error::Result;

/// How a host exchange combines the ranks' contributions.
#[derive(Clone, Copy, Debug)]
pub(super) enum Op {
    Sum,
    Take(usize),
}

pub(super) fn combine(parts: &[Vec<f64>], op: Op) -> std::result::Result<Vec<f64>, String> {
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
pub(super) trait Exchange: Send + Sync {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    fn exchange(&self, data: Vec<f64>, op: Op) -> Result<Vec<f64>>;
}

/// Flatten tensors to f64 on the host, exchange, and rebuild them on their devices.
pub(super) fn host_collective(x: &dyn Exchange, tensors: &[Tensor], op: Op) -> Result<Vec<Tensor>> {
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
        impl $crate::dist::Comm for $t {
            fn rank(&self) -> usize {
                $crate::dist::host::Exchange::rank(self)
            }
            fn world_size(&self) -> usize {
                $crate::dist::host::Exchange::world_size(self)
            }
            fn backend(&self) -> &'static str {
                $name
            }
            fn all_reduce_sum(
                &self,
                tensors: &[candle_core::Tensor],
            ) -> $crate::error::Result<Vec<candle_core::Tensor>> {
                $crate::dist::host::host_collective(self, tensors, $crate::dist::host::Op::Sum)
            }
            fn broadcast(
                &self,
                tensors: &[candle_core::Tensor],
                root: usize,
            ) -> $crate::error::Result<Vec<candle_core::Tensor>> {
                $crate::dist::host::host_collective(
                    self,
                    tensors,
                    $crate::dist::host::Op::Take(root),
                )
            }
            fn barrier(&self) -> $crate::error::Result<()> {
                $crate::dist::host::Exchange::exchange(self, vec![], $crate::dist::host::Op::Sum)
                    .map(|_| ())
            }
        }
    };
}

/// `host_comm!(Type, "name")`: [`Comm`](super::Comm) for an [`Exchange`] transport.
pub(super) use host_comm;

/// How long a rank waits for the others to arrive (rendezvous, and threads at a collective).
pub const WAIT: Duration = Duration::from_secs(300);
