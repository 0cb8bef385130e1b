//! AdamW with its state on disk, and gradient plumbing (accumulation, global-norm clipping).
//!
//! candle-nn's `AdamW` keeps its moments private (no exact resume), decays every variable
//! (norms and biases too) and skips variables without a gradient silently. This one follows
//! PyTorch's `torch.optim.AdamW` update exactly, decays only tensors of rank ≥ 2 (as
//! nanoGPT does), and saves `m`/`v` by parameter name.
//!
//! For f32 parameters on the CPU the update is one fused pass per parameter, in place
//! (moments in host vectors, the parameter's storage written directly, both cores on large
//! tensors); elsewhere it is composed from tensor ops. Both compute the same formula.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Mutex;

use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, DType, Device, InplaceOp2, Layout, Storage, Tensor, Var};
use candle_nn::VarMap;
use rayon::prelude::*;

use crate::config::TrainConfig;
use crate::error::{Error, Result};

/// Trainable parameters by name, in a fixed (sorted) order.
pub fn named_vars(varmap: &VarMap) -> Vec<(String, Var)> {
    let map: BTreeMap<String, Var> = varmap
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    map.into_iter().collect()
}

/// Gradients aligned with an optimiser's parameters; summed over micro-batches.
pub struct Grads(pub Vec<Option<Tensor>>);

/// First and second moments of one parameter, in f32.
enum Moments {
    /// CPU f32 parameters: plain vectors, updated in place by [`FusedStep`].
    Host { m: Vec<f32>, v: Vec<f32> },
    /// Other devices and dtypes: tensors on the parameter's device.
    Tensors { m: Tensor, v: Tensor },
}

/// Whether the moments live in host vectors and the update is fused: the same switch as the
/// model's kernels (f32 on the CPU, unless `CANDOR_FUSED=0`).
fn host_f32(var: &Var) -> bool {
    candor_model::fused::enabled(var.as_tensor())
}

pub struct AdamW {
    pub params: Vec<(String, Var)>,
    moments: Vec<Moments>,
    decay: Vec<bool>,
    /// Optimiser steps taken (bias correction uses it).
    pub t: u64,
    beta1: f64,
    beta2: f64,
    eps: f64,
    weight_decay: f64,
}

impl AdamW {
    pub fn new(params: Vec<(String, Var)>, cfg: &TrainConfig) -> Result<Self> {
        let zeros = |v: &Var| -> Result<Moments> {
            Ok(if host_f32(v) {
                Moments::Host {
                    m: vec![0.0; v.elem_count()],
                    v: vec![0.0; v.elem_count()],
                }
            } else {
                let z = || Tensor::zeros(v.shape(), DType::F32, v.device());
                Moments::Tensors { m: z()?, v: z()? }
            })
        };
        Ok(AdamW {
            moments: params
                .iter()
                .map(|(_, v)| zeros(v))
                .collect::<Result<_>>()?,
            decay: params.iter().map(|(_, v)| v.rank() >= 2).collect(),
            params,
            t: 0,
            beta1: cfg.beta1,
            beta2: cfg.beta2,
            eps: cfg.eps,
            weight_decay: cfg.weight_decay,
        })
    }

    pub fn zero_grads(&self) -> Grads {
        Grads(vec![None; self.params.len()])
    }

    /// Add this backward pass's gradients into `acc`.
    pub fn accumulate(&self, store: &GradStore, acc: &mut Grads) -> Result<()> {
        for ((_, var), slot) in self.params.iter().zip(acc.0.iter_mut()) {
            if let Some(g) = store.get(var.as_tensor()) {
                *slot = Some(match slot.take() {
                    Some(prev) => (prev + g)?,
                    None => g.clone(),
                });
            }
        }
        Ok(())
    }

    /// One AdamW step with learning rate `lr`. Parameters without a gradient are left alone.
    pub fn step(&mut self, grads: &Grads, lr: f64) -> Result<()> {
        self.t += 1;
        let bc1 = 1.0 - self.beta1.powi(self.t as i32);
        let bc2 = 1.0 - self.beta2.powi(self.t as i32);
        for (i, (_, var)) in self.params.iter().enumerate() {
            let Some(g) = &grads.0[i] else { continue };
            let g = g.to_dtype(DType::F32)?;
            let wd = if self.decay[i] {
                self.weight_decay
            } else {
                0.0
            };
            match &mut self.moments[i] {
                Moments::Host { m, v } => {
                    let op = FusedStep {
                        m: Mutex::new(m),
                        v: Mutex::new(v),
                        beta1: self.beta1 as f32,
                        beta2: self.beta2 as f32,
                        decay: (1.0 - lr * wd) as f32,
                        step: (lr / bc1) as f32,
                        sqrt_bc2: bc2.sqrt() as f32,
                        eps: self.eps as f32,
                    };
                    var.as_tensor().inplace_op2(&g.contiguous()?, &op)?;
                }
                Moments::Tensors { m, v } => {
                    let m_new = ((&*m * self.beta1)? + (&g * (1.0 - self.beta1))?)?;
                    let v_new = ((&*v * self.beta2)? + (g.sqr()? * (1.0 - self.beta2))?)?;
                    let mut theta = var.as_tensor().to_dtype(DType::F32)?;
                    if wd > 0.0 {
                        theta = (theta * (1.0 - lr * wd))?;
                    }
                    // PyTorch: denom = sqrt(v) / sqrt(bc2) + eps; theta -= (lr / bc1) * m / denom
                    let denom = ((v_new.sqrt()? / bc2.sqrt())? + self.eps)?;
                    let theta = (theta - ((&m_new / denom)? * (lr / bc1))?)?;
                    var.set(&theta.to_dtype(var.dtype())?)?;
                    *m = m_new;
                    *v = v_new;
                }
            }
        }
        Ok(())
    }

    /// (m, v) of parameter `i` as tensors on the parameter's device.
    fn moment_tensors(&self, i: usize) -> Result<(Tensor, Tensor)> {
        Ok(match &self.moments[i] {
            Moments::Host { m, v } => {
                let shape = self.params[i].1.shape();
                (
                    Tensor::from_slice(m, shape, &Device::Cpu)?,
                    Tensor::from_slice(v, shape, &Device::Cpu)?,
                )
            }
            Moments::Tensors { m, v } => (m.clone(), v.clone()),
        })
    }

    /// Save the moments as `<prefix>m.<name>` / `<prefix>v.<name>` tensors.
    pub fn state_tensors(&self, prefix: &str) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        for (i, (name, _)) in self.params.iter().enumerate() {
            let (m, v) = self.moment_tensors(i)?;
            out.insert(format!("{prefix}m.{name}"), m.to_device(&Device::Cpu)?);
            out.insert(format!("{prefix}v.{name}"), v.to_device(&Device::Cpu)?);
        }
        Ok(out)
    }

    /// Restore moments saved by [`state_tensors`](Self::state_tensors) and the step count.
    pub fn load_state(
        &mut self,
        tensors: &HashMap<String, Tensor>,
        prefix: &str,
        t: u64,
        origin: &Path,
    ) -> Result<()> {
        for (i, (name, var)) in self.params.iter().enumerate() {
            let mut loaded = vec![];
            for kind in ["m", "v"] {
                let key = format!("{prefix}{kind}.{name}");
                let t = tensors.get(&key).ok_or_else(|| {
                    Error::Msg(format!(
                        "{}: optimizer state lacks `{key}`",
                        origin.display()
                    ))
                })?;
                if t.dims() != var.dims() {
                    return Err(Error::Msg(format!(
                        "{}: optimizer state `{key}` has shape {:?}, expected {:?}",
                        origin.display(),
                        t.dims(),
                        var.dims()
                    )));
                }
                loaded.push(t.to_dtype(DType::F32)?);
            }
            let (m, v) = (loaded.remove(0), loaded.remove(0));
            self.moments[i] = match self.moments[i] {
                Moments::Host { .. } => Moments::Host {
                    m: m.flatten_all()?.to_vec1()?,
                    v: v.flatten_all()?.to_vec1()?,
                },
                Moments::Tensors { .. } => Moments::Tensors {
                    m: m.to_device(var.device())?,
                    v: v.to_device(var.device())?,
                },
            };
        }
        self.t = t;
        Ok(())
    }
}

/// Elements per parallel chunk of the fused CPU passes (fixed, so sums are deterministic).
const CHUNK: usize = 1 << 15;

/// One AdamW update of an f32 CPU parameter in place, with its moments, from its gradient:
/// the composed formula of [`AdamW::step`], element by element.
struct FusedStep<'a> {
    m: Mutex<&'a mut Vec<f32>>,
    v: Mutex<&'a mut Vec<f32>>,
    beta1: f32,
    beta2: f32,
    /// 1 − lr·weight_decay
    decay: f32,
    /// lr / (1 − β₁ᵗ)
    step: f32,
    /// √(1 − β₂ᵗ)
    sqrt_bc2: f32,
    eps: f32,
}

impl FusedStep<'_> {
    fn update(&self, theta: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32]) {
        let (b1, b2) = (self.beta1, self.beta2);
        for i in 0..theta.len() {
            let gi = g[i];
            let mi = b1 * m[i] + (1.0 - b1) * gi;
            let vi = b2 * v[i] + (1.0 - b2) * gi * gi;
            m[i] = mi;
            v[i] = vi;
            let denom = vi.sqrt() / self.sqrt_bc2 + self.eps;
            theta[i] = theta[i] * self.decay - self.step * (mi / denom);
        }
    }
}

impl InplaceOp2 for FusedStep<'_> {
    fn name(&self) -> &'static str {
        "candor-adamw"
    }

    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dl: &Layout,
        src: &CpuStorage,
        sl: &Layout,
    ) -> candle_core::Result<()> {
        let (CpuStorage::F32(theta), CpuStorage::F32(g)) = (dst, src) else {
            candle_core::bail!("adamw: f32 parameters and gradients only");
        };
        let (Some((t0, t1)), Some((g0, g1))) = (dl.contiguous_offsets(), sl.contiguous_offsets())
        else {
            candle_core::bail!("adamw: contiguous parameters and gradients only");
        };
        let (theta, g) = (&mut theta[t0..t1], &g[g0..g1]);
        let (mut m, mut v) = (self.m.lock().unwrap(), self.v.lock().unwrap());
        if theta.len() != g.len() || theta.len() != m.len() {
            candle_core::bail!(
                "adamw: parameter of {} elements, gradient of {}",
                theta.len(),
                g.len()
            );
        }
        if theta.len() < 2 * CHUNK {
            self.update(theta, &mut m[..], &mut v[..], g);
        } else {
            theta
                .par_chunks_mut(CHUNK)
                .zip(m.par_chunks_mut(CHUNK))
                .zip(v.par_chunks_mut(CHUNK))
                .zip(g.par_chunks(CHUNK))
                .for_each(|(((t, m), v), g)| self.update(t, m, v, g));
        }
        Ok(())
    }
}

/// Σ g² of one gradient: f64 partial sums over fixed chunks (both cores on CPU f32).
fn sum_sq(g: &Tensor) -> Result<f64> {
    if host_f32_tensor(g) {
        let g = g.contiguous()?;
        let (s, l) = g.storage_and_layout();
        if let (Storage::Cpu(CpuStorage::F32(data)), Some((a, b))) = (&*s, l.contiguous_offsets()) {
            let parts: Vec<f64> = data[a..b]
                .par_chunks(CHUNK)
                .map(|c| c.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>())
                .collect();
            return Ok(parts.iter().sum());
        }
    }
    Ok(g.to_dtype(DType::F32)?
        .sqr()?
        .sum_all()?
        .to_scalar::<f32>()? as f64)
}

fn host_f32_tensor(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == DType::F32
}

/// Global L2 norm of the gradients; when above `max_norm` (> 0), scale them down to it
/// (`torch.nn.utils.clip_grad_norm_`). Returns the norm before clipping.
pub fn clip_grad_norm(grads: &mut Grads, max_norm: f64) -> Result<f64> {
    let mut sq = 0.0f64;
    for g in grads.0.iter().flatten() {
        sq += sum_sq(g)?;
    }
    let norm = sq.sqrt();
    if max_norm > 0.0 && norm > max_norm {
        let scale = max_norm / (norm + 1e-6);
        for g in grads.0.iter_mut().flatten() {
            *g = (&*g * scale)?;
        }
    }
    Ok(norm)
}

/// Stop a run whose loss or gradient norm is no longer a number, before the step that would
/// write NaN into the weights; the error names the step and where the last good checkpoint is.
pub fn check_finite(loss: f64, grad_norm: f64, step: u64, out: &Path) -> Result<()> {
    if loss.is_finite() && grad_norm.is_finite() {
        return Ok(());
    }
    Err(Error::Msg(format!(
        "loss became {loss} (grad norm {grad_norm}) at step {step}; the last good checkpoint (if any) is kept in {}",
        out.display()
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two AdamW steps on f(x) = sum(x²)/2 (gradient = x), compared with PyTorch:
    /// ```python
    /// x = torch.tensor([[1.0, -2.0], [0.5, 3.0]], requires_grad=True)
    /// b = torch.tensor([1.0, -1.0], requires_grad=True)
    /// opt = torch.optim.AdamW([{"params": [x], "weight_decay": 0.1},
    ///                          {"params": [b], "weight_decay": 0.0}], lr=0.1, betas=(0.9, 0.95), eps=1e-8)
    /// for _ in range(2):
    ///     opt.zero_grad(); ((x**2).sum()/2 + (b**2).sum()/2).backward(); opt.step()
    /// ```
    /// Hand derivation: with gradient g, step 1 moves each element by lr·sign(g) (m̂/√v̂ = ±1)
    /// after decay x·(1 − lr·wd); step 2 recomputes from the moved values.
    #[test]
    fn matches_pytorch_adamw_by_hand() {
        let dev = Device::Cpu;
        let x =
            Var::from_tensor(&Tensor::new(&[[1.0f32, -2.0], [0.5, 3.0]], &dev).unwrap()).unwrap();
        let b = Var::from_tensor(&Tensor::new(&[1.0f32, -1.0], &dev).unwrap()).unwrap();
        let cfg = TrainConfig {
            weight_decay: 0.1,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            ..Default::default()
        };
        let mut opt =
            AdamW::new(vec![("x".into(), x.clone()), ("b".into(), b.clone())], &cfg).unwrap();
        // reference implementation of the same two steps in f64, element by element
        let mut xs = [1.0f64, -2.0, 0.5, 3.0];
        let mut bs = [1.0f64, -1.0];
        let (mut mx, mut vx, mut mb, mut vb) = ([0.0f64; 4], [0.0f64; 4], [0.0f64; 2], [0.0f64; 2]);
        for t in 1..=2 {
            let loss = ((x.as_tensor().sqr().unwrap().sum_all().unwrap()
                + b.as_tensor().sqr().unwrap().sum_all().unwrap())
            .unwrap()
                * 0.5)
                .unwrap();
            let store = loss.backward().unwrap();
            let mut g = opt.zero_grads();
            opt.accumulate(&store, &mut g).unwrap();
            opt.step(&g, 0.1).unwrap();
            if t == 1 {
                // by hand: m̂/√v̂ = sign(g), so x ← x·(1 − lr·wd) − lr·sign(x); biases undecayed
                let x1: Vec<f32> = x.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
                for (g, w) in x1.iter().zip([0.89f32, -1.88, 0.395, 2.87]) {
                    assert!((g - w).abs() < 1e-6, "{x1:?}");
                }
                assert_eq!(b.as_tensor().to_vec1::<f32>().unwrap(), vec![0.9, -0.9]);
            }
            let (bc1, bc2) = (1.0 - 0.9f64.powi(t), 1.0 - 0.95f64.powi(t));
            for (vals, m, v, wd) in [
                (&mut xs[..], &mut mx[..], &mut vx[..], 0.1),
                (&mut bs[..], &mut mb[..], &mut vb[..], 0.0),
            ] {
                for i in 0..vals.len() {
                    let grad = vals[i];
                    m[i] = 0.9 * m[i] + 0.1 * grad;
                    v[i] = 0.95 * v[i] + 0.05 * grad * grad;
                    vals[i] *= 1.0 - 0.1 * wd;
                    vals[i] -= 0.1 / bc1 * m[i] / (v[i].sqrt() / bc2.sqrt() + 1e-8);
                }
            }
        }
        // after step 1 alone: x0 = 1·(1 − 0.01) − 0.1 = 0.89 (checked against PyTorch: 0.8900)
        let got: Vec<f32> = x.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        for (g, w) in got.iter().zip(xs) {
            assert!((*g as f64 - w).abs() < 1e-6, "{got:?} vs {xs:?}");
        }
        let got: Vec<f32> = b.as_tensor().to_vec1().unwrap();
        for (g, w) in got.iter().zip(bs) {
            assert!((*g as f64 - w).abs() < 1e-6, "{got:?} vs {bs:?}");
        }
        assert_eq!(opt.t, 2);
    }

    #[test]
    fn clipping_scales_to_max_norm() {
        let dev = Device::Cpu;
        let mut g = Grads(vec![Some(Tensor::new(&[3.0f32, 4.0], &dev).unwrap()), None]);
        let n = clip_grad_norm(&mut g, 1.0).unwrap();
        assert!((n - 5.0).abs() < 1e-6);
        let v: Vec<f32> = g.0[0].as_ref().unwrap().to_vec1().unwrap();
        assert!((v[0] - 0.6).abs() < 1e-5 && (v[1] - 0.8).abs() < 1e-5);
        let mut g = Grads(vec![Some(Tensor::new(&[0.3f32, 0.4], &dev).unwrap())]);
        clip_grad_norm(&mut g, 1.0).unwrap();
        assert_eq!(
            g.0[0].as_ref().unwrap().to_vec1::<f32>().unwrap(),
            vec![0.3, 0.4]
        );
    }

    #[test]
    fn state_round_trips() {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::new(&[[1.0f32, 2.0]], &dev).unwrap()).unwrap();
        let cfg = TrainConfig::default();
        let mut opt = AdamW::new(vec![("x".into(), x.clone())], &cfg).unwrap();
        let store = x
            .as_tensor()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let mut g = opt.zero_grads();
        opt.accumulate(&store, &mut g).unwrap();
        opt.step(&g, 0.01).unwrap();
        let saved = opt.state_tensors("").unwrap();
        let mut other = AdamW::new(vec![("x".into(), x.clone())], &cfg).unwrap();
        other
            .load_state(&saved, "", opt.t, Path::new("opt"))
            .unwrap();
        let again = other.state_tensors("").unwrap();
        assert_eq!(
            again["m.x"].to_vec2::<f32>().unwrap(),
            saved["m.x"].to_vec2::<f32>().unwrap()
        );
        assert_eq!(
            again["v.x"].to_vec2::<f32>().unwrap(),
            saved["v.x"].to_vec2::<f32>().unwrap()
        );
        let e = other
            .load_state(&HashMap::new(), "", 1, Path::new("opt.safetensors"))
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("opt.safetensors: optimizer state lacks `m.x`"),
            "{e}"
        );
    }
}
