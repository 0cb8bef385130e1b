//! The model's numeric building blocks, each composed from candle ops that record a
//! backward. candle-nn 0.11's fused `ops::rms_norm`, `softmax_last_dim`, `rotary_emb::rope`
//! and `sdpa` record none: gradients would silently stop there (candle issue 2168).

use candle_core::{DType, Device, Tensor, D};

use crate::error::Result;

/// RMSNorm: `x / sqrt(mean(x²) + eps) * weight`, over the last dimension.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let x = x.to_dtype(reduce_dtype(dtype))?; // reductions in f32 under bf16/f16
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?; // (..., 1)
    let y = x.broadcast_div(&(ms + eps)?.sqrt()?)?;
    Ok(y.to_dtype(dtype)?.broadcast_mul(weight)?)
}

/// LayerNorm (GPT-2): `(x − mean) / sqrt(var + eps) * weight + bias` over the last
/// dimension, with the biased variance as `torch.nn.LayerNorm` computes it.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let x = x.to_dtype(reduce_dtype(dtype))?;
    let centred = x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?; // (..., C)
    let var = centred.sqr()?.mean_keepdim(D::Minus1)?; // (..., 1)
    let y = centred.broadcast_div(&(var + eps)?.sqrt()?)?;
    Ok(y.to_dtype(dtype)?
        .broadcast_mul(weight)?
        .broadcast_add(bias)?)
}

/// The dtype reductions run in: f32 for half types, else the input's own (f64 stays f64).
pub fn reduce_dtype(dtype: DType) -> DType {
    match dtype {
        DType::BF16 | DType::F16 => DType::F32,
        d => d,
    }
}

/// Softmax over the last dimension: exp(x - max) / sum.
pub fn softmax(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    Ok(e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?)
}

/// log-softmax over the last dimension.
pub fn log_softmax(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let shifted = x.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    Ok(shifted.broadcast_sub(&lse)?)
}

/// Log-probability of `targets` (B, T) under `logits` (B, T, V): (B, T).
pub fn token_logprobs(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let lp = log_softmax(&logits.to_dtype(reduce_dtype(logits.dtype()))?)?; // (B, T, V)
    Ok(lp
        .gather(&targets.contiguous()?.unsqueeze(2)?, 2)?
        .squeeze(2)?)
}

/// Entropy of the categorical given by `logits` (B, T, V): (B, T).
pub fn entropy(logits: &Tensor) -> Result<Tensor> {
    let lp = log_softmax(&logits.to_dtype(reduce_dtype(logits.dtype()))?)?;
    Ok((lp.exp()? * &lp)?.sum(D::Minus1)?.neg()?)
}

/// Rotary-embedding tables for positions `0..max_pos`: (cos, sin), each (max_pos, head_dim/2).
pub fn rope_tables(
    head_dim: usize,
    max_pos: usize,
    theta: f64,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let half = head_dim / 2;
    let inv_freq: Vec<f64> = (0..half)
        .map(|i| 1.0 / theta.powf(2.0 * i as f64 / head_dim as f64))
        .collect();
    let mut cos = Vec::with_capacity(max_pos * half);
    let mut sin = Vec::with_capacity(max_pos * half);
    for p in 0..max_pos {
        for f in &inv_freq {
            let a = p as f64 * f;
            cos.push(a.cos() as f32);
            sin.push(a.sin() as f32);
        }
    }
    Ok((
        Tensor::from_vec(cos, (max_pos, half), device)?,
        Tensor::from_vec(sin, (max_pos, half), device)?,
    ))
}

/// Rotary embedding in Hugging Face's rotate-half convention, on x (B, H, T, D) with
/// cos/sin broadcastable to (B, 1, T, D/2): `[x1·cos − x2·sin, x2·cos + x1·sin]`.
pub fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    let half = d / 2;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    let cos = cos.to_dtype(x.dtype())?;
    let sin = sin.to_dtype(x.dtype())?;
    let a = (x1.broadcast_mul(&cos)? - x2.broadcast_mul(&sin)?)?;
    let b = (x2.broadcast_mul(&cos)? + x1.broadcast_mul(&sin)?)?;
    Ok(Tensor::cat(&[a, b], D::Minus1)?)
}

/// Repeat key/value heads for grouped-query attention: (B, KV, T, D) → (B, KV·n, T, D).
pub fn repeat_kv(x: &Tensor, n: usize) -> Result<Tensor> {
    if n == 1 {
        return Ok(x.clone());
    }
    let (b, kv, t, d) = x.dims4()?;
    Ok(x.unsqueeze(2)?
        .expand((b, kv, n, t, d))?
        .reshape((b, kv * n, t, d))?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(v: &[f32], shape: &[usize]) -> Tensor {
        Tensor::from_vec(v.to_vec(), shape, &Device::Cpu).unwrap()
    }

    #[test]
    fn rms_norm_matches_hand_computation() {
        // x = [3, 4]: mean square 12.5, rms 3.5355; w = [1, 2]
        let y = rms_norm(&t(&[3.0, 4.0], &[1, 2]), &t(&[1.0, 2.0], &[2]), 0.0).unwrap();
        let y: Vec<f32> = y.flatten_all().unwrap().to_vec1().unwrap();
        assert!(
            (y[0] - 0.848_528).abs() < 1e-5 && (y[1] - 2.262_741).abs() < 1e-5,
            "{y:?}"
        );
    }

    #[test]
    fn layer_norm_matches_hand_computation() {
        // x = [1, 2, 3]: mean 2, biased variance 2/3; w = [1, 2, 1], b = [0, 0, 1]
        let y = layer_norm(
            &t(&[1.0, 2.0, 3.0], &[1, 3]),
            &t(&[1.0, 2.0, 1.0], &[3]),
            &t(&[0.0, 0.0, 1.0], &[3]),
            0.0,
        )
        .unwrap();
        let y: Vec<f32> = y.flatten_all().unwrap().to_vec1().unwrap();
        let s = (2.0f32 / 3.0).sqrt();
        for (a, b) in y.iter().zip([-1.0 / s, 0.0, 1.0 / s + 1.0]) {
            assert!((a - b).abs() < 1e-5, "{y:?}");
        }
    }

    #[test]
    fn softmax_and_log_softmax_agree_with_hand_values() {
        let x = t(&[1.0, 2.0, 3.0], &[1, 3]);
        let s: Vec<f32> = softmax(&x)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let z = 1f32.exp() + 2f32.exp() + 3f32.exp();
        for (i, v) in s.iter().enumerate() {
            assert!((v - ((i + 1) as f32).exp() / z).abs() < 1e-6);
        }
        let ls: Vec<f32> = log_softmax(&x)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        for (a, b) in ls.iter().zip(&s) {
            assert!((a - b.ln()).abs() < 1e-6);
        }
    }

    #[test]
    fn rope_rotates_pairs_by_position_angle() {
        // D = 2: one pair (x1, x2) rotated by angle p * theta^0 = p
        let (cos, sin) = rope_tables(2, 4, 10000.0, &Device::Cpu).unwrap();
        let x = t(&[1.0, 0.0, 1.0, 0.0], &[1, 1, 2, 2]); // positions 0, 1
        let c = cos.narrow(0, 0, 2).unwrap().reshape((1, 1, 2, 1)).unwrap();
        let s = sin.narrow(0, 0, 2).unwrap().reshape((1, 1, 2, 1)).unwrap();
        let y: Vec<f32> = apply_rope(&x, &c, &s)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert!((y[0] - 1.0).abs() < 1e-6 && y[1].abs() < 1e-6);
        assert!(
            (y[2] - 1f32.cos()).abs() < 1e-6 && (y[3] - 1f32.sin()).abs() < 1e-6,
            "{y:?}"
        );
    }

    #[test]
    fn entropy_of_uniform_is_log_n() {
        let e: Vec<f32> = entropy(&t(&[0.0; 4], &[1, 1, 4]))
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert!((e[0] - 4f32.ln()).abs() < 1e-6);
    }
}
