//! Batches: which examples (a resumable, epoch-shuffled cursor) and how they are laid out
//! (right-padded token rows with a loss mask).

use candle_core::{Device, Tensor};
use candor_core::rng::Rng;
use candor_model::mask::Layout;
use serde::{Deserialize, Serialize};

use crate::error::Result;

/// Position in the shuffled data: epoch and index within that epoch's order.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Cursor {
    pub epoch: u64,
    pub pos: usize,
}

/// Draws example indices epoch by epoch, each epoch a fresh permutation derived from the
/// seed and the epoch number, so a saved [`Cursor`] is all a resumed run needs.
pub struct Sampler {
    n: usize,
    seed: u64,
    order: Vec<usize>,
    pub cursor: Cursor,
}

impl Sampler {
    pub fn new(n: usize, seed: u64, cursor: Cursor) -> Self {
        assert!(n > 0, "sampler over an empty dataset");
        let order = Self::permutation(n, seed, cursor.epoch);
        Sampler {
            n,
            seed,
            order,
            cursor,
        }
    }

    fn permutation(n: usize, seed: u64, epoch: u64) -> Vec<usize> {
        let mut order: Vec<usize> = (0..n).collect();
        Rng::derive(seed, &format!("epoch-{epoch}")).shuffle(&mut order);
        order
    }

    /// The next `k` example indices.
    pub fn next(&mut self, k: usize) -> Vec<usize> {
        let mut out = Vec::with_capacity(k);
        while out.len() < k {
            if self.cursor.pos == self.n {
                self.cursor.epoch += 1;
                self.cursor.pos = 0;
                self.order = Self::permutation(self.n, self.seed, self.cursor.epoch);
            }
            out.push(self.order[self.cursor.pos]);
            self.cursor.pos += 1;
        }
        out
    }
}

/// Split items into (training, held-out): a `fraction` of them, chosen at random from the
/// seed, held out (at least one, and never all, when `fraction > 0` and there are two or
/// more); both keep their original order.
pub fn split_heldout<T>(all: Vec<T>, fraction: f64, seed: u64) -> (Vec<T>, Vec<T>) {
    let n = all.len();
    let mut k = (fraction * n as f64).round() as usize;
    if fraction > 0.0 && n >= 2 {
        k = k.clamp(1, n - 1);
    }
    let mut order: Vec<usize> = (0..n).collect();
    Rng::derive(seed, "heldout").shuffle(&mut order);
    let mut held = vec![false; n];
    for &i in &order[..k.min(n)] {
        held[i] = true;
    }
    let (mut train, mut heldout) = (vec![], vec![]);
    for (x, h) in all.into_iter().zip(held) {
        if h {
            heldout.push(x)
        } else {
            train.push(x)
        }
    }
    (train, heldout)
}

/// A batch for next-token training: `inputs`/`targets` (B, T) u32, `loss_mask` (B, T) f32
/// (1 where the target counts), the attention layout.
pub struct LmBatch {
    pub inputs: Tensor,
    pub targets: Tensor,
    pub loss_mask: Tensor,
    pub layout: Layout,
    /// Number of target tokens that count.
    pub n_targets: usize,
}

/// One training example: tokens, and per token whether predicting it counts in the loss
/// (its first token is never predicted), and optionally a segment per token (packing).
#[derive(Clone, Debug)]
pub struct LmExample {
    pub tokens: Vec<u32>,
    /// `weights[i]`: whether token i is a target (i ≥ 1).
    pub targets: Vec<bool>,
    pub segments: Option<Vec<u32>>,
}

impl LmExample {
    /// Every token after the first is a target (pretraining).
    pub fn dense(tokens: Vec<u32>) -> Self {
        let mut targets = vec![true; tokens.len()];
        if let Some(t) = targets.first_mut() {
            *t = false;
        }
        LmExample {
            tokens,
            targets,
            segments: None,
        }
    }

    /// The tokens this example trains on (the count [`lm_batch`] makes: the first token is
    /// never predicted).
    pub fn n_targets(&self) -> usize {
        self.targets.iter().skip(1).filter(|&&t| t).count()
    }
}

/// Pack examples, in order, into rows of at most `max_len` tokens (an example longer than
/// that gets a row of its own). Each example of a row is a segment: the attention layout
/// keeps it from seeing the others and restarts its positions, so a packed example's
/// loss is the one it has alone (tested in [`crate::lm`]). Its first token is never a
/// target: nothing of it comes before.
pub fn pack_examples(examples: &[LmExample], max_len: usize) -> Vec<LmExample> {
    let mut rows: Vec<LmExample> = vec![];
    let mut row: Option<LmExample> = None;
    for e in examples {
        if row
            .as_ref()
            .is_some_and(|r| r.tokens.len() + e.tokens.len() > max_len)
        {
            rows.extend(row.take());
        }
        let r = row.get_or_insert_with(|| LmExample {
            tokens: vec![],
            targets: vec![],
            segments: Some(vec![]),
        });
        let seg = r
            .segments
            .as_ref()
            .and_then(|s| s.last())
            .map_or(0, |&s| s + 1);
        r.tokens.extend(&e.tokens);
        r.targets.push(false);
        r.targets.extend(&e.targets[1..]);
        r.segments
            .as_mut()
            .expect("packed rows have segments")
            .extend(std::iter::repeat_n(seg, e.tokens.len()));
    }
    rows.extend(row);
    rows
}

/// Right-pad examples to the longest and build inputs (tokens[..-1]) and targets (tokens[1..]).
pub fn lm_batch(examples: &[&LmExample], pad_id: u32, device: &Device) -> Result<LmBatch> {
    let b = examples.len();
    let t = examples
        .iter()
        .map(|e| e.tokens.len())
        .max()
        .unwrap_or(1)
        .saturating_sub(1)
        .max(1);
    let mut inputs = vec![pad_id; b * t];
    let mut targets = vec![pad_id; b * t];
    let mut mask = vec![0f32; b * t];
    let mut valid = vec![false; b * t];
    let mut segments = examples
        .iter()
        .any(|e| e.segments.is_some())
        .then(|| vec![u32::MAX; b * t]);
    let mut n_targets = 0;
    for (r, e) in examples.iter().enumerate() {
        let n = e.tokens.len().saturating_sub(1);
        for i in 0..n {
            inputs[r * t + i] = e.tokens[i];
            targets[r * t + i] = e.tokens[i + 1];
            valid[r * t + i] = true;
            if e.targets[i + 1] {
                mask[r * t + i] = 1.0;
                n_targets += 1;
            }
            if let (Some(seg), Some(es)) = (segments.as_mut(), e.segments.as_ref()) {
                seg[r * t + i] = es[i];
            }
        }
        // padding gets its own segment so it never joins a real one
        if let Some(seg) = segments.as_mut() {
            for i in n..t {
                seg[r * t + i] = u32::MAX;
            }
            if e.segments.is_none() {
                for i in 0..n {
                    seg[r * t + i] = 0;
                }
            }
        }
    }
    Ok(LmBatch {
        inputs: Tensor::from_vec(inputs, (b, t), device)?,
        targets: Tensor::from_vec(targets, (b, t), device)?,
        loss_mask: Tensor::from_vec(mask, (b, t), device)?,
        layout: Layout {
            batch: b,
            len: t,
            valid,
            segments,
        },
        n_targets,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sampler_visits_each_example_once_per_epoch_and_resumes() {
        let mut s = Sampler::new(5, 1, Cursor::default());
        let mut first: Vec<usize> = s.next(5);
        first.sort();
        assert_eq!(first, vec![0, 1, 2, 3, 4]);
        let a = s.next(3);
        let saved = s.cursor.clone();
        let b = s.next(4);
        let mut resumed = Sampler::new(5, 1, saved);
        assert_eq!(resumed.next(4), b);
        assert_eq!(s.cursor.epoch, 2);
        assert_eq!(a.len(), 3);
    }

    #[test]
    fn heldout_split_is_seeded_and_keeps_order() {
        let (train, held) = split_heldout((0..100).collect::<Vec<u32>>(), 0.1, 5);
        assert_eq!((train.len(), held.len()), (90, 10));
        assert!(held.windows(2).all(|w| w[0] < w[1]) && train.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(
            split_heldout((0..100).collect::<Vec<u32>>(), 0.1, 5).1,
            held
        );
        assert_ne!(
            split_heldout((0..100).collect::<Vec<u32>>(), 0.1, 6).1,
            held
        );
        assert_eq!(split_heldout(vec![1, 2], 0.01, 1).1.len(), 1);
        assert_eq!(split_heldout(vec![1, 2], 0.0, 1).1.len(), 0);
    }

    #[test]
    fn packing_fills_rows_in_order_and_marks_segments() {
        let ex = |n: u32, len: usize| LmExample::dense(vec![n; len]);
        let rows = pack_examples(&[ex(1, 3), ex(2, 4), ex(3, 5), ex(4, 9), ex(5, 2)], 8);
        let tokens: Vec<Vec<u32>> = rows.iter().map(|r| r.tokens.clone()).collect();
        assert_eq!(
            tokens,
            vec![
                vec![1, 1, 1, 2, 2, 2, 2],
                vec![3, 3, 3, 3, 3],
                vec![4; 9],
                vec![5, 5]
            ]
        );
        assert_eq!(rows[0].segments, Some(vec![0, 0, 0, 1, 1, 1, 1]));
        assert_eq!(
            rows[0].targets,
            vec![false, true, true, false, true, true, true]
        );
        assert_eq!(rows[2].segments, Some(vec![0; 9]));
    }

    #[test]
    fn lm_batch_shifts_pads_and_masks() {
        let a = LmExample::dense(vec![5, 6, 7, 8]);
        let b = LmExample {
            tokens: vec![1, 2, 3],
            targets: vec![false, false, true],
            segments: None,
        };
        let batch = lm_batch(&[&a, &b], 0, &Device::Cpu).unwrap();
        assert_eq!(
            batch.inputs.to_vec2::<u32>().unwrap(),
            vec![vec![5, 6, 7], vec![1, 2, 0]]
        );
        assert_eq!(
            batch.targets.to_vec2::<u32>().unwrap(),
            vec![vec![6, 7, 8], vec![2, 3, 0]]
        );
        assert_eq!(
            batch.loss_mask.to_vec2::<f32>().unwrap(),
            vec![vec![1.0, 1.0, 1.0], vec![0.0, 1.0, 0.0]]
        );
        assert_eq!(batch.n_targets, 4);
        assert_eq!(
            batch.layout.valid,
            vec![true, true, true, true, true, false]
        );
    }
}
