//! Pretraining across ranks (threads standing in for processes) and in bf16, on the CPU.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candor_pretrain::{run, PretrainConfig, RunOptions};
use candor_train::dist::{Dist, LocalGroup};
use candor_train::precision::Precision;

fn corpus(dir: &Path) -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let text = std::fs::read_to_string(root.join("data/corpus/moby-dick.txt")).unwrap();
    let path = dir.join("corpus.txt");
    std::fs::write(&path, &text[..40_000]).unwrap();
    path
}

fn config(corpus: &Path, steps: usize) -> PretrainConfig {
    let mut c = PretrainConfig {
        seed: 4,
        ..Default::default()
    };
    c.data.files = vec![corpus.to_path_buf()];
    c.data.vocab_size = 300;
    c.model.hidden_size = 32;
    c.model.layers = 2;
    c.model.heads = 2;
    c.model.ctx = 32;
    c.train.steps = steps;
    c.train.batch_size = 6;
    c.train.grad_accum = 2;
    c.train.lr = 3e-3;
    c.train.warmup_steps = 2;
    c.train.eval_every = 0;
    c.train.eval_batches = 2;
    c.train.log_every = 1;
    c
}

fn opts(out: &Path, dist: Dist) -> RunOptions {
    RunOptions {
        out: out.to_path_buf(),
        device: Device::Cpu,
        resume: false,
        overwrite: false,
        origin: "test.yaml".into(),
        dist,
    }
}

fn weights(dir: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap()
}

fn losses(dir: &Path) -> Vec<f64> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .unwrap()
                .get("loss")
                .and_then(|v| v.as_f64())
        })
        .collect()
}

fn max_diff(a: &HashMap<String, Tensor>, b: &HashMap<String, Tensor>) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .map(|(k, x)| {
            (x - &b[k])
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        })
        .fold(0.0, f32::max)
}

/// World size 2 (each rank 3 of every 6 examples, gradients summed) trains the same model
/// as world size 1 on the whole batches, and only rank 0 writes anything.
#[test]
fn two_ranks_on_half_batches_train_the_same_model_and_only_rank_0_writes() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = corpus(tmp.path());
    let mut cfg = config(&corpus, 8);
    cfg.train.save_every = 4; // an intermediate checkpoint too
    let one = tmp.path().join("one");
    run(&cfg, &opts(&one, Dist::single())).unwrap();

    let (out0, out1) = (tmp.path().join("rank0"), tmp.path().join("rank1"));
    let handles: Vec<_> = LocalGroup::new(2)
        .into_iter()
        .zip([out0.clone(), out1.clone()])
        .map(|(member, out)| {
            let cfg = cfg.clone();
            std::thread::spawn(move || run(&cfg, &opts(&out, Dist::new(member))).map(|m| m.step))
        })
        .collect();
    for h in handles {
        assert_eq!(h.join().unwrap().unwrap(), 8);
    }
    assert!(!out1.exists(), "rank 1 wrote into its --out");
    let diff = max_diff(&weights(&one), &weights(&out0));
    let (l1, l2) = (losses(&one), losses(&out0));
    let loss_diff = l1
        .iter()
        .zip(&l2)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    println!("world 2 vs world 1 after 8 steps: worst weight difference {diff:.2e}, worst loss difference {loss_diff:.2e}");
    assert_eq!(l1.len(), l2.len());
    assert!(diff < 1e-5, "weights differ by {diff}");
    assert!(loss_diff < 1e-5, "losses differ by {loss_diff}");
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out0.join("candor.json")).unwrap()).unwrap();
    assert_eq!(
        (meta["complete"].as_bool(), meta["step"].as_u64()),
        (Some(true), Some(8))
    );
}

/// A bf16 run (f32 master weights) follows the f32 run's loss curve: every logged training
/// loss within 0.05 of f32's (bf16 rounds to ~0.4%; the loss falls from ~5.7 by ~2), and
/// the final held-out loss within 0.05. The optimiser state it saves is f32.
#[test]
fn bf16_pretraining_tracks_the_f32_loss() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = corpus(tmp.path());
    let cfg32 = config(&corpus, 40);
    let mut cfg16 = cfg32.clone();
    cfg16.train.dtype = Precision::Bf16;
    let (a, b) = (tmp.path().join("f32"), tmp.path().join("bf16"));
    let m32 = run(&cfg32, &opts(&a, Dist::single())).unwrap();
    let m16 = run(&cfg16, &opts(&b, Dist::single())).unwrap();
    let (l32, l16) = (losses(&a), losses(&b));
    assert_eq!(l32.len(), 40);
    let worst = l32
        .iter()
        .zip(&l16)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max);
    let e32 = m32.metrics["eval_loss"].as_f64().unwrap();
    let e16 = m16.metrics["eval_loss"].as_f64().unwrap();
    println!(
        "bf16 vs f32 over 40 steps: loss {:.4} → {:.4} vs {:.4} → {:.4}; worst step difference {worst:.4}; eval_loss {e16:.4} vs {e32:.4}",
        l16[0], l16[39], l32[0], l32[39]
    );
    assert!(l32[0] - l32[39] > 1.0, "the f32 run did not learn: {l32:?}");
    assert!(worst < 0.05, "bf16 loss strays {worst} from f32's");
    assert!((e16 - e32).abs() < 0.05, "eval_loss {e16} vs {e32}");
    assert!(worst > 0.0, "the bf16 run was not in bf16");
    let opt = candle_core::safetensors::load(b.join("trainer/optimizer.safetensors"), &Device::Cpu)
        .unwrap();
    assert!(!opt.is_empty() && opt.values().all(|t| t.dtype() == DType::F32));
}
