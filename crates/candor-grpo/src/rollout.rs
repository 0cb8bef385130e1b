//! A generation batch: groups of completions of the same prompt, rows in group order
//! (`rows g·G .. (g+1)·G` answer one prompt), with what the updates need of each row.
//!
//! In a data-parallel run each rank samples and scores its share of the prompts (whole
//! groups); [`Groups::gather`] gives every rank the whole batch in rank order, so the
//! advantages and the update order are the same computation on every rank.

use candor_train::dist::Dist;

use crate::Result;

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Groups {
    /// Index of each row's prompt in the prompt file.
    pub prompt: Vec<usize>,
    /// Completion token ids (with the stop token when one was produced).
    pub tokens: Vec<Vec<u32>>,
    /// The completion ended on a stop token (not the length limit).
    pub stopped: Vec<bool>,
    /// The reward GRPO optimises (scores, weighted, clipped, minus the overlong penalty).
    pub reward: Vec<f64>,
    /// The reward model's raw score (or the first judge's, when there is no reward model).
    pub raw: Vec<f64>,
    /// Per token: log-probs of the policy that sampled (empty rows when not needed) and of
    /// the reference (empty rows when β = 0).
    pub old_logprobs: Vec<Vec<f64>>,
    pub ref_logprobs: Vec<Vec<f64>>,
    /// Each of `score.judges`' score of the row, in their order (empty without them).
    pub judges: Vec<Vec<f64>>,
}

impl Groups {
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// Append row `i` of `other`.
    pub fn push_row(&mut self, other: &Groups, i: usize) {
        self.prompt.push(other.prompt[i]);
        self.tokens.push(other.tokens[i].clone());
        self.stopped.push(other.stopped[i]);
        self.reward.push(other.reward[i]);
        self.raw.push(other.raw[i]);
        self.old_logprobs.push(other.old_logprobs[i].clone());
        self.ref_logprobs.push(other.ref_logprobs[i].clone());
        self.judges.push(other.judges[i].clone());
    }

    /// Every rank's rows, in rank order (exchanged as f64: token ids, indices and f32-born
    /// log-probs arrive exactly).
    pub fn gather(&self, dist: &Dist) -> Result<Groups> {
        if dist.world_size() == 1 {
            return Ok(self.clone());
        }
        let mut flat = vec![];
        for i in 0..self.len() {
            flat.extend([
                self.prompt[i] as f64,
                self.tokens[i].len() as f64,
                self.old_logprobs[i].len() as f64,
                self.ref_logprobs[i].len() as f64,
                self.judges[i].len() as f64,
                f64::from(u8::from(self.stopped[i])),
                self.reward[i],
                self.raw[i],
            ]);
            flat.extend(self.tokens[i].iter().map(|&t| f64::from(t)));
            flat.extend(&self.old_logprobs[i]);
            flat.extend(&self.ref_logprobs[i]);
            flat.extend(&self.judges[i]);
        }
        let mut all = Groups::default();
        for part in dist.all_gather_f64(&flat)? {
            let mut at = 0;
            while at < part.len() {
                const HEAD: usize = 8;
                let h = &part[at..at + HEAD];
                let (n, o, r, j) = (h[1] as usize, h[2] as usize, h[3] as usize, h[4] as usize);
                let body = &part[at + HEAD..at + HEAD + n + o + r + j];
                all.prompt.push(h[0] as usize);
                all.tokens
                    .push(body[..n].iter().map(|&t| t as u32).collect());
                all.old_logprobs.push(body[n..n + o].to_vec());
                all.ref_logprobs.push(body[n + o..n + o + r].to_vec());
                all.judges.push(body[n + o + r..].to_vec());
                all.stopped.push(h[5] != 0.0);
                all.reward.push(h[6]);
                all.raw.push(h[7]);
                at += HEAD + n + o + r + j;
            }
        }
        Ok(all)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candor_train::dist::LocalGroup;

    fn rows(range: std::ops::Range<usize>, with_old: bool) -> Groups {
        let mut g = Groups::default();
        for i in range {
            let n = 1 + i % 3;
            g.prompt.push(i / 2);
            g.tokens
                .push((0..n as u32).map(|t| t + 7 * i as u32).collect());
            g.stopped.push(i % 2 == 0);
            g.reward.push(i as f64 * 0.25 - 1.0);
            g.raw.push(-(i as f64));
            g.old_logprobs.push(if with_old {
                vec![-0.5 * i as f64; n]
            } else {
                vec![]
            });
            g.ref_logprobs.push(vec![-1.25; n]);
            g.judges.push(vec![0.5 * i as f64, 1.0]);
        }
        g
    }

    /// Each rank's rows reach every rank whole and in rank order, empty per-token rows too.
    #[test]
    fn rows_gather_in_rank_order() {
        for with_old in [true, false] {
            let whole = rows(0..6, with_old);
            let parts = [0..2, 2..2, 2..6];
            let handles: Vec<_> = LocalGroup::new(3)
                .into_iter()
                .zip(parts)
                .map(|(member, range)| {
                    std::thread::spawn(move || {
                        rows(range, with_old).gather(&Dist::new(member)).unwrap()
                    })
                })
                .collect();
            for h in handles {
                assert_eq!(h.join().unwrap(), whole);
            }
        }
    }
}
