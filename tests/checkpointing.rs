//! Gradient checkpointing end to end (`train.gradient_checkpointing`), and `candor bench
//! --model` on a checkpoint.

mod common;

use std::path::Path;

use common::{candor, fails, metrics, ok, read_json, small_checkpoint};

/// SFT with `train.gradient_checkpointing: true` trains the model SFT trains without it:
/// the same losses at every logged step (the gradients differ only in the order a tied
/// weight's two parts are added), and the effective config records the switch only when on.
#[test]
fn sft_with_gradient_checkpointing_trains_the_same_model() {
    let tmp = tempfile::tempdir().unwrap();
    let base = small_checkpoint(tmp.path());
    let run = |out: &Path, extra: &[&str]| {
        ok(candor()
            .args([
                "sft",
                "--config",
                "configs/tiny/sft.yaml",
                "--device",
                "cpu",
            ])
            .args(["--set", "train.steps=6", "--set", "train.batch_size=4"])
            .args(["--set", "train.log_every=1", "--set", "train.eval_every=3"])
            .args(extra)
            .arg("--init")
            .arg(&base)
            .arg("--out")
            .arg(out));
    };
    let (plain, ckpt) = (tmp.path().join("plain"), tmp.path().join("ckpt"));
    run(&plain, &[]);
    run(&ckpt, &["--set", "train.gradient_checkpointing=true"]);
    let losses = |d: &Path| -> Vec<(String, f64)> {
        metrics(d)
            .iter()
            .flat_map(|r| {
                ["loss", "eval_loss", "grad_norm"]
                    .into_iter()
                    .filter_map(move |k| {
                        r.get(k)
                            .map(|v| (format!("{k}@{}", r["step"]), v.as_f64().unwrap()))
                    })
            })
            .collect()
    };
    let (a, b) = (losses(&plain), losses(&ckpt));
    assert_eq!(a.len(), b.len());
    assert!(a.len() >= 6 + 6 + 2, "{a:?}");
    for ((k, x), (k2, y)) in a.iter().zip(&b) {
        assert_eq!(k, k2);
        assert!((x - y).abs() <= 1e-5 * x.abs().max(1.0), "{k}: {x} vs {y}");
    }
    let effective = |d: &Path| read_json(&d.join("candor.json")).to_string();
    assert!(effective(&ckpt).contains("\"gradient_checkpointing\":true"));
    assert!(!effective(&plain).contains("gradient_checkpointing"));
}

/// Every row of `candor bench --model` runs on a small checkpoint, prints its line of the
/// table and lands in `--out`'s JSON; bad rows and sizes are one-line errors.
#[test]
fn bench_model_times_every_row_of_a_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let base = small_checkpoint(tmp.path());
    let json = tmp.path().join("bench.json");
    let sizes = [
        "--batch",
        "2",
        "--seq-len",
        "16",
        "--steps",
        "1",
        "--warmup",
        "0",
        "--prompt-len",
        "4",
        "--new-tokens",
        "4",
    ];
    let table = ok(candor()
        .args(["bench", "--device", "cpu", "--model"])
        .arg(&base)
        .args(sizes)
        .arg("--out")
        .arg(&json));
    for row in ["train ", "train-ckpt ", "lora ", "lora-ckpt ", "generate "] {
        assert!(table.lines().any(|l| l.starts_with(row)), "{row}: {table}");
    }
    let out = read_json(&json);
    let rows = out["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 5);
    for r in rows {
        assert!(r["tokens_per_sec"].as_f64().unwrap() > 0.0, "{r}");
        assert!(r["peak_rss_bytes"].as_u64().unwrap() >= r["loaded_rss_bytes"].as_u64().unwrap());
    }
    assert_eq!(out["sizes"]["seq_len"], 16);
    let e = fails(
        candor()
            .args([
                "bench",
                "--device",
                "cpu",
                "--rows",
                "train,nope",
                "--model",
            ])
            .arg(&base),
    );
    assert!(e.contains("unknown row `nope`"), "{e}");
    let e = fails(
        candor()
            .args(["bench", "--device", "cpu", "--seq-len", "64", "--model"])
            .arg(&base),
    );
    assert!(
        e.contains("--seq-len 64") && e.contains("max_position_embeddings 32"),
        "{e}"
    );
    let e = fails(
        candor()
            .args(["bench", "--model"])
            .arg(tmp.path().join("missing")),
    );
    assert!(e.contains("missing"), "{e}");
}
