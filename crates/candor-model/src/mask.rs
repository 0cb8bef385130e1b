//! Attention masks and position ids for padded and packed batches.
//!
//! A [`Layout`] says, for each (row, position), whether the token is real and which packed
//! example (segment) it belongs to. From it come the position ids (counting only real
//! tokens, restarting in each segment) and the additive attention bias: a query sees a key
//! when the key is real, not in the future, and in the same segment. Padding may be on the
//! left (generation) or right (training).

use candle_core::{Device, Tensor};

use crate::error::Result;

/// Added to the scores of keys a query must not see. Finite, so a row that sees nothing
/// (a padding query) becomes uniform instead of NaN; exp(-1e9 - max) is exactly 0 in f32.
pub const MASKED: f32 = -1e9;

#[derive(Clone, Debug)]
pub struct Layout {
    pub batch: usize,
    pub len: usize,
    /// (B·T) row-major: is this a real token?
    pub valid: Vec<bool>,
    /// (B·T) row-major: packed-example id; `None` = one example per row.
    pub segments: Option<Vec<u32>>,
}

impl Layout {
    /// Every token real, one example per row.
    pub fn dense(batch: usize, len: usize) -> Self {
        Layout {
            batch,
            len,
            valid: vec![true; batch * len],
            segments: None,
        }
    }

    /// Position id of each token: the count of real tokens of its segment before it.
    /// Padding tokens get 0.
    pub fn positions(&self) -> Vec<u32> {
        let mut out = vec![0u32; self.batch * self.len];
        for b in 0..self.batch {
            let mut count = 0u32;
            let mut seg = None;
            for t in 0..self.len {
                let i = b * self.len + t;
                let s = self.segments.as_ref().map(|s| s[i]);
                if s != seg {
                    count = 0;
                    seg = s;
                }
                if self.valid[i] {
                    out[i] = count;
                    count += 1;
                }
            }
        }
        out
    }

    pub fn positions_tensor(&self, device: &Device) -> Result<Tensor> {
        Ok(Tensor::from_vec(
            self.positions(),
            (self.batch, self.len),
            device,
        )?)
    }

    /// Additive attention bias (B, 1, T, T).
    pub fn bias(&self, device: &Device) -> Result<Tensor> {
        let (bsz, t) = (self.batch, self.len);
        let mut bias = vec![MASKED; bsz * t * t];
        for b in 0..bsz {
            for q in 0..t {
                let qi = b * t + q;
                for k in 0..=q {
                    let ki = b * t + k;
                    let same_seg = self.segments.as_ref().is_none_or(|s| s[ki] == s[qi]);
                    if self.valid[ki] && same_seg {
                        bias[(b * t + q) * t + k] = 0.0;
                    }
                }
            }
        }
        Ok(Tensor::from_vec(bias, (bsz, 1, t, t), device)?)
    }

    /// True when the bias is the plain causal one (no padding, no packing).
    pub fn is_dense(&self) -> bool {
        self.segments.is_none() && self.valid.iter().all(|&v| v)
    }
}

/// Causal bias (1, 1, T, past + T) for T new queries after `past` cached keys.
pub fn causal_bias(t: usize, past: usize, device: &Device) -> Result<Tensor> {
    let k = past + t;
    let bias: Vec<f32> = (0..t)
        .flat_map(|q| (0..k).map(move |j| if j <= past + q { 0.0 } else { MASKED }))
        .collect();
    Ok(Tensor::from_vec(bias, (1, 1, t, k), device)?)
}

/// Bias (B, 1, 1, K) for one new query per row, given which of the K keys (cache + new) are real.
pub fn step_bias(key_valid: &[Vec<bool>], device: &Device) -> Result<Tensor> {
    let b = key_valid.len();
    let k = key_valid.first().map_or(0, Vec::len);
    let bias: Vec<f32> = key_valid
        .iter()
        .flatten()
        .map(|&v| if v { 0.0 } else { MASKED })
        .collect();
    Ok(Tensor::from_vec(bias, (b, 1, 1, k), device)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn left_padding_positions_and_bias() {
        // row 0: [pad, a, b]; row 1: [a, b, c]
        let l = Layout {
            batch: 2,
            len: 3,
            valid: vec![false, true, true, true, true, true],
            segments: None,
        };
        assert_eq!(l.positions(), vec![0, 0, 1, 0, 1, 2]);
        let b: Vec<f32> = l
            .bias(&Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        // row 0, query 2 sees keys 1, 2 but not the pad at 0
        assert_eq!(&b[6..9], &[MASKED, 0.0, 0.0]);
        // row 1, query 0 sees only key 0
        assert_eq!(&b[9..12], &[0.0, MASKED, MASKED]);
    }

    #[test]
    fn packed_segments_do_not_see_each_other() {
        let l = Layout {
            batch: 1,
            len: 4,
            valid: vec![true; 4],
            segments: Some(vec![0, 0, 1, 1]),
        };
        assert_eq!(l.positions(), vec![0, 1, 0, 1]);
        let b: Vec<f32> = l
            .bias(&Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(&b[12..16], &[MASKED, MASKED, 0.0, 0.0]); // query 3 sees keys 2..=3
    }

    #[test]
    fn causal_bias_with_cache() {
        let b: Vec<f32> = causal_bias(2, 1, &Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(b, vec![0.0, 0.0, MASKED, 0.0, 0.0, 0.0]);
    }
}
