//! The reward model's loss: InstructGPT's pairwise ranking loss over all pairs of a ranking.
//!
//! Ouyang et al. 2022, eq. 1: loss(θ) = −1/C(K,2) · E[log σ(r_θ(x, y_w) − r_θ(x, y_l))] over
//! every pair (y_w better than y_l) of a K-way ranking; K = 2 is the chosen/rejected loss of
//! Stiennon et al. 2020 and TRL's `RewardTrainer`. Tied responses make no pair
//! (`candor_data::preference::expand_pairs`).

use candle_core::Tensor;

use crate::Result;

/// −log σ(r_better − r_worse), averaged over the pairs: (P,) and (P,) → scalar.
///
/// Written as softplus(−d) = max(−d, 0) + log(1 + exp(−|d|)), which neither overflows nor
/// loses the gradient for large |d|.
pub fn preference_loss(better: &Tensor, worse: &Tensor) -> Result<Tensor> {
    let neg_d = (worse - better)?; // (P,) = −(r_better − r_worse)
    let softplus = (neg_d.relu()? + ((neg_d.abs()?.neg()?.exp()? + 1.0)?.log()?))?;
    Ok(softplus.mean_all()?)
}

/// Pairwise accuracy (r_better > r_worse, strictly) and mean margin r_better − r_worse.
pub fn pair_stats(better: &[f32], worse: &[f32]) -> (f64, f64) {
    let n = better.len().max(1) as f64;
    let correct = better.iter().zip(worse).filter(|(b, w)| b > w).count() as f64;
    let margin: f64 = better
        .iter()
        .zip(worse)
        .map(|(b, w)| (*b - *w) as f64)
        .sum();
    (correct / n, margin / n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};
    use candor_data::preference::expand_pairs;

    fn loss_of(rewards: &[f64], pairs: &[(usize, usize)]) -> f64 {
        let dev = Device::Cpu;
        let b: Vec<f64> = pairs.iter().map(|p| rewards[p.0]).collect();
        let w: Vec<f64> = pairs.iter().map(|p| rewards[p.1]).collect();
        preference_loss(
            &Tensor::new(b, &dev).unwrap(),
            &Tensor::new(w, &dev).unwrap(),
        )
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
    }

    #[test]
    fn k3_strict_order_gives_all_three_pairs_and_the_hand_computed_loss() {
        let pairs = expand_pairs(&[1, 2, 3]);
        assert_eq!(pairs, vec![(0, 1), (0, 2), (1, 2)]);
        // rewards best→worst 2.0, 0.5, -1.0: margins 1.5, 3.0, 1.5;
        // −log σ(d) = log(1 + e^−d): log(1 + e^−1.5) = 0.2014132779827524,
        // log(1 + e^−3) = 0.04858735157374206; mean = 0.1504713025130823
        let by_hand =
            (2.0 * (1.0f64 + (-1.5f64).exp()).ln() + (1.0f64 + (-3.0f64).exp()).ln()) / 3.0;
        assert!((by_hand - 0.1504713025130823).abs() < 1e-15);
        assert!((loss_of(&[2.0, 0.5, -1.0], &pairs) - 0.1504713025130823).abs() < 1e-12);
    }

    #[test]
    fn k4_with_a_tie_drops_the_tied_pair() {
        // order `1 2=3 4`: responses best first, the middle two tied
        let pairs = expand_pairs(&[1, 2, 2, 3]);
        assert_eq!(pairs, vec![(0, 1), (0, 2), (0, 3), (1, 3), (2, 3)]);
        // rewards 1.0, 0.0, 0.5, -1.0: margins 1, 0.5, 2, 1, 1.5 (the tied pair 0.0 vs 0.5 is
        // not a pair, whichever is higher); log(1+e^−d) = 0.31326168751822286,
        // 0.4740769841801067, 0.1269280110429725, 0.31326168751822286, 0.2014132779827524;
        // mean = 0.28578832964845546
        let want = 0.28578832964845546;
        let by_hand: f64 = [1.0f64, 0.5, 2.0, 1.0, 1.5]
            .iter()
            .map(|d| (1.0 + (-d).exp()).ln())
            .sum::<f64>()
            / 5.0;
        assert!((by_hand - want).abs() < 1e-15);
        assert!((loss_of(&[1.0, 0.0, 0.5, -1.0], &pairs) - want).abs() < 1e-12);
        let (acc, margin) = pair_stats(&[1.0, 1.0, 1.0, 0.0, 0.5], &[0.0, 0.5, -1.0, -1.0, -1.0]);
        assert_eq!((acc, margin), (1.0, 1.2));
        // all tied: no pairs; ranks out of order still give (better, worse)
        assert!(expand_pairs(&[1, 1, 1]).is_empty());
        assert_eq!(expand_pairs(&[2, 1]), vec![(1, 0)]);
    }

    /// `reward_pairwise` of tests/fixtures/ppo_math.json, written with PyTorch by
    /// scripts/make_ppo_fixtures.py (−F.logsigmoid(chosen − rejected), mean over all pairs).
    #[test]
    fn matches_the_pytorch_fixture() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../tests/fixtures/ppo_math.json"
        );
        let fx: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let cases = fx["reward_pairwise"].as_array().unwrap();
        assert_eq!(cases.len(), 3);
        let mut worst = 0.0f64;
        for case in cases {
            let name = case["name"].as_str().unwrap();
            let rows: Vec<Vec<f64>> =
                serde_json::from_value(case["inputs"]["rewards_ranked_best_first"].clone())
                    .unwrap();
            let out = &case["outputs"];
            let want_pairs: Vec<(usize, usize)> =
                serde_json::from_value(out["pairs"].clone()).unwrap();
            let (mut b, mut w) = (vec![], vec![]);
            for (r, row) in rows.iter().enumerate() {
                let ranks: Vec<u32> = (1..=row.len() as u32).collect();
                let pairs = expand_pairs(&ranks);
                assert_eq!(pairs, want_pairs, "{name}");
                let chosen: Vec<f64> =
                    serde_json::from_value(out["chosen_rewards"][r].clone()).unwrap();
                let rejected: Vec<f64> =
                    serde_json::from_value(out["rejected_rewards"][r].clone()).unwrap();
                let per_pair: Vec<f64> =
                    serde_json::from_value(out["per_pair_loss"][r].clone()).unwrap();
                for (p, &(i, j)) in pairs.iter().enumerate() {
                    assert_eq!((row[i], row[j]), (chosen[p], rejected[p]), "{name}");
                    let l = loss_of(row, &[(i, j)]);
                    worst = worst.max((l - per_pair[p]).abs());
                    b.push(row[i]);
                    w.push(row[j]);
                }
            }
            let dev = Device::Cpu;
            let loss = preference_loss(
                &Tensor::new(b.clone(), &dev).unwrap(),
                &Tensor::new(w.clone(), &dev).unwrap(),
            )
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
            worst = worst.max((loss - out["loss"].as_f64().unwrap()).abs());
            let bf: Vec<f32> = b.iter().map(|&x| x as f32).collect();
            let wf: Vec<f32> = w.iter().map(|&x| x as f32).collect();
            assert!(
                (pair_stats(&bf, &wf).0 - out["accuracy"].as_f64().unwrap()).abs() < 1e-12,
                "{name}"
            );
        }
        eprintln!("reward_pairwise: worst |loss error| {worst:e}");
        assert!(worst < 1e-12, "{worst}");
    }

    #[test]
    fn gradient_is_minus_sigmoid_of_minus_margin_and_large_margins_stay_finite() {
        let dev = Device::Cpu;
        // d/dr_better mean softplus(−d) = −σ(−d)/P; d/dr_worse = +σ(−d)/P
        let b = Var::new(&[0.3f64, 50.0, -60.0], &dev).unwrap();
        let w = Var::new(&[-0.2f64, -50.0, 60.0], &dev).unwrap();
        let loss = preference_loss(b.as_tensor(), w.as_tensor()).unwrap();
        let grads = loss.backward().unwrap();
        let gb: Vec<f64> = grads.get(b.as_tensor()).unwrap().to_vec1().unwrap();
        let gw: Vec<f64> = grads.get(w.as_tensor()).unwrap().to_vec1().unwrap();
        for (i, d) in [0.5f64, 100.0, -120.0].iter().enumerate() {
            let sig = 1.0 / (1.0 + d.exp()); // σ(−d)
            assert!(
                (gb[i] + sig / 3.0).abs() < 1e-12,
                "{i}: {} vs {}",
                gb[i],
                -sig / 3.0
            );
            assert!((gw[i] - sig / 3.0).abs() < 1e-12);
        }
        // loss = (log(1+e^−0.5) + ~0 + 120) / 3
        let want =
            ((1.0f64 + (-0.5f64).exp()).ln() + (1.0f64 + (-100.0f64).exp()).ln() + 120.0) / 3.0;
        assert!((loss.to_scalar::<f64>().unwrap() - want).abs() < 1e-12);
    }
}
