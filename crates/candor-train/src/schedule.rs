//! Learning-rate schedule: linear warm-up, then cosine decay to `min_lr` (nanoGPT's `get_lr`).

use crate::config::TrainConfig;

/// Learning rate for optimiser step `step` (0-based).
pub fn lr_at(cfg: &TrainConfig, step: usize) -> f64 {
    if step < cfg.warmup_steps {
        return cfg.lr * (step + 1) as f64 / (cfg.warmup_steps + 1) as f64;
    }
    let decay_steps = cfg.steps.saturating_sub(cfg.warmup_steps).max(1);
    let progress = ((step - cfg.warmup_steps) as f64 / decay_steps as f64).min(1.0);
    let coeff = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
    cfg.min_lr + coeff * (cfg.lr - cfg.min_lr)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_cosine() {
        let cfg = TrainConfig {
            steps: 110,
            warmup_steps: 10,
            lr: 1.0,
            min_lr: 0.1,
            ..Default::default()
        };
        assert!((lr_at(&cfg, 0) - 1.0 / 11.0).abs() < 1e-12);
        assert!((lr_at(&cfg, 9) - 10.0 / 11.0).abs() < 1e-12);
        assert!((lr_at(&cfg, 10) - 1.0).abs() < 1e-12);
        assert!((lr_at(&cfg, 60) - 0.55).abs() < 1e-12); // halfway: min + 0.5·(max − min)
        assert!((lr_at(&cfg, 110) - 0.1).abs() < 1e-12);
        assert!((lr_at(&cfg, 500) - 0.1).abs() < 1e-12);
    }
}
