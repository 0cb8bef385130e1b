//! LoRA through the real binary: `train.lora` in SFT and the reward stage writes PEFT
//! adapter directories (the base untouched, only adapters — and a reward model's new score
//! head — trained), a killed LoRA run resumes to the same adapters, `candor merge` gives a
//! full checkpoint with the adapter-applied model's logits, an adapter directory is taken
//! wherever a model is, and bad LoRA input fails with one clear line.

mod common;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candor_model::io::load_frozen;
use common::*;

fn lora_sft(base: &Path, out: &Path, extra: &[&str]) -> std::process::Command {
    let mut cmd = candor();
    cmd.args([
        "sft",
        "--config",
        "configs/tiny/sft.yaml",
        "--device",
        "cpu",
    ])
    .args([
        "--set",
        "train.steps=12",
        "--set",
        "train.batch_size=4",
        "--set",
        "train.lr=0.01",
        "--set",
        "train.eval_every=6",
        "--set",
        "train.save_every=3",
        "--set",
        "train.lora.rank=4",
        "--set",
        "train.lora.alpha=8",
        "--set",
        "train.lora.target_modules=[q_proj, v_proj, down_proj]",
    ])
    .arg("--init")
    .arg(base)
    .arg("--out")
    .arg(out)
    .args(extra);
    cmd
}

fn tensors(path: &Path) -> std::collections::HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu).unwrap()
}

fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar()
        .unwrap()
}

fn some_ids() -> Tensor {
    Tensor::from_vec(vec![5u32, 9, 12, 3, 7, 1, 2, 30], (1, 8), &Device::Cpu).unwrap()
}

#[test]
fn lora_sft_writes_a_peft_adapter_resumes_exactly_and_merges() {
    let tmp = tempfile::tempdir().unwrap();
    let base = small_checkpoint(tmp.path());

    // straight run: an adapter directory, PEFT's names, nothing else trained
    let straight = tmp.path().join("straight");
    let out = ok(&mut lora_sft(&base, &straight, &[]));
    assert!(out.contains("sft:"), "{out}");
    assert!(!straight.join("model.safetensors").exists());
    let cfg = read_json(&straight.join("adapter_config.json"));
    assert_eq!(cfg["peft_type"], "LORA");
    assert_eq!(cfg["task_type"], "CAUSAL_LM");
    assert_eq!(
        (cfg["r"].as_u64(), cfg["lora_alpha"].as_f64()),
        (Some(4), Some(8.0))
    );
    assert_eq!(
        cfg["target_modules"],
        serde_json::json!(["q_proj", "v_proj", "down_proj"])
    );
    assert_eq!(
        PathBuf::from(cfg["base_model_name_or_path"].as_str().unwrap()),
        std::fs::canonicalize(&base).unwrap()
    );
    let adapter = tensors(&straight.join("adapter_model.safetensors"));
    let n_layers = read_json(&base.join("config.json"))["num_hidden_layers"]
        .as_u64()
        .unwrap() as usize;
    assert_eq!(adapter.len(), 2 * 3 * n_layers, "{:?}", adapter.keys());
    let b = &adapter["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"];
    let b_norm: f32 = b.abs().unwrap().sum_all().unwrap().to_scalar().unwrap();
    assert!(b_norm > 0.0, "B was not trained");
    // AdamW held the adapters only
    let opt = tensors(&straight.join("trainer/optimizer.safetensors"));
    assert!(
        opt.keys().all(|k| k.contains(".lora_")),
        "optimizer state beyond the adapters: {:?}",
        opt.keys()
            .filter(|k| !k.contains(".lora_"))
            .collect::<Vec<_>>()
    );
    let evals: Vec<f64> = metrics(&straight)
        .iter()
        .filter_map(|r| r.get("eval_loss").and_then(|v| v.as_f64()))
        .collect();
    println!("LoRA SFT eval_loss {evals:?}");
    assert!(
        evals.last() < evals.first(),
        "eval_loss did not fall: {evals:?}"
    );

    // killed and resumed: the same adapters and optimiser state
    let killed = tmp.path().join("killed");
    let mut child = lora_sft(&base, &killed, &[])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let at = kill_after_checkpoint(&mut child, &killed, 3);
    if read_json(&killed.join("candor.json"))["complete"] == false {
        ok(&mut lora_sft(&base, &killed, &["--resume"]));
        println!("LoRA SFT killed at step {at} of 12 and resumed");
    }
    for f in ["adapter_model.safetensors", "trainer/optimizer.safetensors"] {
        assert!(
            std::fs::read(straight.join(f)).unwrap() == std::fs::read(killed.join(f)).unwrap(),
            "{f} differs after resuming at step {at}"
        );
    }

    // merged: a full checkpoint with the adapter-applied model's logits; untargeted weights
    // are the base's, bit for bit
    let merged = tmp.path().join("merged");
    let out = ok(candor()
        .args(["merge", "--adapter"])
        .arg(&straight)
        .arg("--out")
        .arg(&merged));
    assert!(out.starts_with("merge: "), "{out}");
    let applied = load_frozen(&straight, &Device::Cpu).unwrap();
    let full = load_frozen(&merged, &Device::Cpu).unwrap();
    let plain = load_frozen(&base, &Device::Cpu).unwrap();
    let ids = some_ids();
    let (la, lf, lb) = (
        applied.logits(&ids).unwrap(),
        full.logits(&ids).unwrap(),
        plain.logits(&ids).unwrap(),
    );
    assert!(max_abs(&la, &lf) < 1e-5, "merged logits differ");
    assert!(max_abs(&la, &lb) > 1e-4, "the adapter changes nothing");
    // the same model through the trainable path: base + live adapters (no merge)
    let (live, _) = candor_model::lora::load_trainable(
        &base,
        "x".into(),
        candor_model::Head::Lm,
        &serde_json::from_value(serde_json::json!({"rank": 4, "alpha": 8.0, "target_modules": ["q_proj", "v_proj", "down_proj"]})).unwrap(),
        Some(&straight),
        DType::F32,
        &mut candor_core::rng::Rng::new(0),
        &Device::Cpu,
    )
    .unwrap();
    assert!(max_abs(&live.logits(&ids).unwrap(), &lf) < 1e-5);
    let (wm, wb) = (
        tensors(&merged.join("model.safetensors")),
        tensors(&base.join("model.safetensors")),
    );
    for name in [
        "model.embed_tokens.weight",
        "model.layers.0.self_attn.k_proj.weight",
        "model.layers.0.mlp.up_proj.weight",
    ] {
        assert_eq!(max_abs(&wm[name], &wb[name]), 0.0, "{name} changed");
    }
    assert!(
        max_abs(
            &wm["model.layers.0.self_attn.q_proj.weight"],
            &wb["model.layers.0.self_attn.q_proj.weight"]
        ) > 0.0
    );
    assert!(merged.join("tokenizer.json").is_file());
    assert_eq!(read_json(&merged.join("candor.json"))["stage"], "merge");

    // the adapter directory wherever a model is taken: eval, generate
    let text = tmp.path().join("text.txt");
    std::fs::write(&text, "the cat sat on the mat. the dog ran. ".repeat(20)).unwrap();
    let eval = |m: &Path| {
        let out = ok(candor()
            .args(["eval", "--json", "--device", "cpu", "--model"])
            .arg(m)
            .arg("--data")
            .arg(&text));
        serde_json::from_str::<serde_json::Value>(&out).unwrap()["eval_loss"]
            .as_f64()
            .unwrap()
    };
    let (ea, em) = (eval(&straight), eval(&merged));
    assert!(
        (ea - em).abs() < 1e-5,
        "eval_loss {ea} (adapter) vs {em} (merged)"
    );
    let out = ok(candor()
        .args([
            "generate",
            "--device",
            "cpu",
            "--max-new-tokens",
            "4",
            "--prompt",
            "the",
            "--model",
        ])
        .arg(&straight));
    assert!(!out.is_empty());
}

#[test]
fn lora_reward_trains_adapters_and_a_new_score_head() {
    let tmp = tempfile::tempdir().unwrap();
    let base = small_checkpoint(tmp.path());
    let data = tmp.path().join("pairs.jsonl");
    let (good, bad) = (
        ["good", "happy", "lovely", "kind", "great", "nice"],
        ["bad", "sad", "awful", "cruel", "dull", "grim"],
    );
    let mut lines = String::new();
    let mut scored = String::new();
    for i in 0..36 {
        let (g, b) = (good[i % 6], bad[(i * 5 + 1) % 6]);
        let prompt = format!("say something {i}");
        let chosen = format!("a {g} day, {} and {g}", good[(i + 2) % 6]);
        let rejected = format!("a {b} day, {} and {b}", bad[(i + 3) % 6]);
        lines += &serde_json::json!({"prompt": prompt, "chosen": chosen, "rejected": rejected})
            .to_string();
        lines += "\n";
        scored += &serde_json::json!({"prompt": prompt, "response": chosen}).to_string();
        scored += "\n";
    }
    let responses = tmp.path().join("responses.jsonl");
    std::fs::write(&responses, scored).unwrap();
    std::fs::write(&data, lines).unwrap();
    let rm = tmp.path().join("rm");
    ok(candor()
        .args([
            "reward",
            "--config",
            "configs/tiny/reward.yaml",
            "--device",
            "cpu",
            "--init",
        ])
        .arg(&base)
        .arg("--set")
        .arg(format!("data.files=[{}]", data.display()))
        .args([
            "--set",
            "data.heldout=null",
            "--set",
            "data.heldout_fraction=0.25",
            "--set",
            "train.steps=20",
            "--set",
            "train.eval_every=10",
            "--set",
            "train.lr=0.01",
            "--set",
            "train.lora.rank=2",
        ])
        .arg("--out")
        .arg(&rm));
    let cfg = read_json(&rm.join("adapter_config.json"));
    assert_eq!(cfg["task_type"], "SEQ_CLS");
    assert_eq!(cfg["modules_to_save"], serde_json::json!(["score"]));
    assert_eq!(
        cfg["target_modules"],
        serde_json::json!(["q_proj", "v_proj"])
    );
    let adapter = tensors(&rm.join("adapter_model.safetensors"));
    assert!(adapter.contains_key("base_model.model.score.weight"));
    let opt = tensors(&rm.join("trainer/optimizer.safetensors"));
    assert!(opt.keys().any(|k| k.contains("score.weight")));
    let evals: Vec<(f64, f64)> = metrics(&rm)
        .iter()
        .filter_map(|r| {
            Some((
                r.get("eval_loss")?.as_f64()?,
                r.get("eval_accuracy")?.as_f64()?,
            ))
        })
        .collect();
    println!("LoRA reward (eval_loss, eval_accuracy) {evals:?}");
    assert!(
        evals.last().unwrap().0 < evals[0].0,
        "eval_loss did not fall: {evals:?}"
    );
    // it loads as a score model: `candor score` reads it
    let scored = ok(candor()
        .args(["score", "--device", "cpu", "--model"])
        .arg(&rm)
        .arg("--data")
        .arg(&responses));
    assert!(!scored.is_empty());
    let model = load_frozen(&rm, &Device::Cpu).unwrap();
    assert_eq!(model.head, candor_model::Head::Score);
}

#[test]
fn bad_lora_input_fails_with_one_clear_line() {
    let tmp = tempfile::tempdir().unwrap();
    let base = small_checkpoint(tmp.path());
    let out = tmp.path().join("x");
    let e = fails(&mut lora_sft(&base, &out, &["--set", "train.lora.rnk=2"]));
    assert!(e.contains("train.lora") && e.contains("rnk"), "{e}");
    let e = fails(&mut lora_sft(
        &base,
        &out,
        &["--set", "train.lora.target_modules=[qproj]"],
    ));
    assert!(
        e.contains("train.lora.target_modules: unknown module `qproj`"),
        "{e}"
    );
    let e = fails(
        candor()
            .args([
                "pretrain",
                "--device",
                "cpu",
                "--config",
                "configs/tiny/pretrain.yaml",
            ])
            .args(["--set", "train.lora.rank=2", "--out"])
            .arg(&out),
    );
    assert!(
        e.contains("train.lora: the pretrain stage trains full weights only"),
        "{e}"
    );
    // an adapter directory whose base is gone
    let adapter = tmp.path().join("adapter");
    std::fs::create_dir(&adapter).unwrap();
    std::fs::write(
        adapter.join("adapter_config.json"),
        r#"{"peft_type": "LORA", "r": 2, "lora_alpha": 4, "base_model_name_or_path": "/no/such/base"}"#,
    )
    .unwrap();
    std::fs::write(adapter.join("adapter_model.safetensors"), b"").unwrap();
    let e = fails(
        candor()
            .args(["merge", "--adapter"])
            .arg(&adapter)
            .arg("--out")
            .arg(&out),
    );
    assert!(
        e.contains("adapter_config.json: base model `/no/such/base`"),
        "{e}"
    );
    let e = fails(&mut lora_sft(&adapter, &out, &[]));
    assert!(e.contains("adapter_config.json: base model"), "{e}");
    assert!(!out.exists(), "nothing half-written");
}

/// Preference pairs whose chosen responses use kind words and rejected ones unkind words.
fn pairs_file(dir: &Path) -> PathBuf {
    let (good, bad) = (
        ["good", "happy", "lovely", "kind", "great", "nice"],
        ["bad", "sad", "awful", "cruel", "dull", "grim"],
    );
    let mut lines = String::new();
    for i in 0..24 {
        let chosen = format!("a {} day", good[i % 6]);
        let rejected = format!("a {} day", bad[(i * 5 + 1) % 6]);
        lines += &serde_json::json!({"prompt": format!("day {i}"), "chosen": chosen, "rejected": rejected})
            .to_string();
        lines += "\n";
    }
    let path = dir.join("dpo-pairs.jsonl");
    std::fs::write(&path, lines).unwrap();
    path
}

/// DPO's reference in a LoRA run is the policy with its adapters off: before the first
/// step the policy (B = 0) equals it exactly, so every pair's loss is log 2.
#[test]
fn lora_dpo_reference_is_the_base_with_adapters_off() {
    let tmp = tempfile::tempdir().unwrap();
    let base = small_checkpoint(tmp.path());
    let data = pairs_file(tmp.path());
    let out = tmp.path().join("dpo");
    ok(candor()
        .args([
            "dpo",
            "--config",
            "configs/tiny/dpo.yaml",
            "--device",
            "cpu",
            "--init",
        ])
        .arg(&base)
        .arg("--set")
        .arg(format!("data.files=[{}]", data.display()))
        .args([
            "--set",
            "data.heldout=null",
            "--set",
            "data.heldout_fraction=0.25",
            "--set",
            "eval.prompts=null",
            "--set",
            "eval.judge=null",
            "--set",
            "train.steps=6",
            "--set",
            "train.eval_every=3",
            "--set",
            "train.lr=0.01",
            "--set",
            "train.lora.target_modules=[all-linear]",
        ])
        .arg("--out")
        .arg(&out));
    let cfg = read_json(&out.join("adapter_config.json"));
    assert_eq!(cfg["task_type"], "CAUSAL_LM");
    let evals: Vec<(u64, f64)> = metrics(&out)
        .iter()
        .filter_map(|r| Some((r["step"].as_u64()?, r.get("eval_loss")?.as_f64()?)))
        .collect();
    println!("LoRA DPO eval_loss {evals:?}");
    assert_eq!(evals[0].0, 0);
    assert!(
        (evals[0].1 - std::f64::consts::LN_2).abs() < 1e-6,
        "policy and reference differ before training: {evals:?}"
    );
    assert!(evals.last().unwrap().1 < evals[0].1, "{evals:?}");
}

/// GRPO with LoRA: adapters trained against the base-with-adapters-off reference (β > 0),
/// written as an adapter directory.
#[test]
fn lora_grpo_trains_adapters_against_the_base() {
    let sft = tiny_sft();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("grpo");
    let mut cmd = candor();
    cmd.args([
        "grpo",
        "--config",
        "configs/tiny/grpo.yaml",
        "--device",
        "cpu",
        "--policy",
    ])
    .arg(&sft)
    .arg("--out")
    .arg(&out);
    for s in [
        "train.steps=3",
        "train.eval_every=0",
        "rollout.prompts_per_step=4",
        "rollout.group_size=4",
        "train.batch_size=8",
        "grpo.num_iterations=2",
        "grpo.beta=0.04",
        "train.lr=0.01",
        "train.lora.rank=4",
        // a seed whose groups have reward spread at the first step (with every group
        // scored alike there is no advantage, hence no gradient, to train on)
        "seed=3",
    ] {
        cmd.args(["--set", s]);
    }
    ok(&mut cmd);
    let cfg = read_json(&out.join("adapter_config.json"));
    assert_eq!(
        PathBuf::from(cfg["base_model_name_or_path"].as_str().unwrap()),
        std::fs::canonicalize(&sft).unwrap()
    );
    let kl: Vec<f64> = metrics(&out)
        .iter()
        .filter_map(|r| r.get("kl").and_then(|v| v.as_f64()))
        .collect();
    println!("LoRA GRPO kl {kl:?}");
    assert!(!kl.is_empty() && kl.iter().all(|k| k.is_finite()), "{kl:?}");
    let adapter = tensors(&out.join("adapter_model.safetensors"));
    let b: f32 = adapter
        .iter()
        .filter(|(k, _)| k.contains("lora_B"))
        .map(|(_, t)| {
            t.abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        })
        .sum();
    assert!(b > 0.0, "the adapters were not trained");
}

/// PPO with LoRA: policy and critic train adapters (the critic also its score head), the
/// reference is the policy with adapters off (KL 0 before the first update), both are
/// written as adapter directories, and a killed run resumes to the same adapters.
#[test]
fn lora_ppo_trains_policy_and_critic_adapters_and_resumes_exactly() {
    let sft = tiny_sft();
    let tmp = tempfile::tempdir().unwrap();
    let ppo = |out: &Path| {
        let mut c = candor();
        c.args([
            "ppo",
            "--config",
            "configs/tiny/ppo.yaml",
            "--device",
            "cpu",
            "--policy",
        ])
        .arg(&sft)
        .arg("--out")
        .arg(out);
        for s in [
            "score.reward_model_weight=0",
            "score.judge=sentiment",
            "score.judge_weight=1",
            "train.steps=4",
            "train.save_every=2",
            "train.eval_every=0",
            "rollout.prompts_per_iteration=8",
            "train.lr=0.001",
            "train.lora.rank=4",
        ] {
            c.args(["--set", s]);
        }
        c
    };
    let straight = tmp.path().join("straight");
    ok(&mut ppo(&straight));
    for d in [straight.clone(), straight.join("critic")] {
        assert!(d.join("adapter_config.json").is_file(), "{}", d.display());
        assert!(!d.join("model.safetensors").exists());
    }
    assert_eq!(
        read_json(&straight.join("critic/adapter_config.json"))["task_type"],
        "SEQ_CLS"
    );
    let critic = tensors(&straight.join("critic/adapter_model.safetensors"));
    assert!(critic.contains_key("base_model.model.score.weight"));
    let opt = tensors(&straight.join("trainer/optimizer.safetensors"));
    assert!(
        opt.keys()
            .all(|k| k.contains(".lora_") || k.contains("score.weight")),
        "{:?}",
        opt.keys().collect::<Vec<_>>()
    );
    let kl: Vec<f64> = metrics(&straight)
        .iter()
        .filter_map(|r| r.get("kl").and_then(|v| v.as_f64()))
        .collect();
    println!("LoRA PPO kl {kl:?}");
    assert!(
        kl[0].abs() < 1e-6,
        "the reference differs from the starting policy: {kl:?}"
    );

    let partial = tmp.path().join("partial");
    let mut child = ppo(&partial)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let at = kill_after_checkpoint(&mut child, &partial, 2);
    if read_json(&partial.join("candor.json"))["complete"] == false {
        ok(ppo(&partial).arg("--resume"));
        println!("LoRA PPO killed at iteration {at} of 4 and resumed");
    }
    for f in [
        "adapter_model.safetensors",
        "critic/adapter_model.safetensors",
        "trainer/optimizer.safetensors",
    ] {
        assert!(
            std::fs::read(straight.join(f)).unwrap() == std::fs::read(partial.join(f)).unwrap(),
            "{f} differs after resuming at iteration {at}"
        );
    }
}

/// `train.dtype: bf16` with LoRA: the frozen base in bf16, the adapters (and their AdamW
/// state) in f32; the run trains and its adapter loads.
#[test]
fn lora_sft_with_a_bf16_base() {
    let tmp = tempfile::tempdir().unwrap();
    let base = small_checkpoint(tmp.path());
    let out = tmp.path().join("bf16");
    ok(&mut lora_sft(
        &base,
        &out,
        &["--set", "train.dtype=bf16", "--set", "train.save_every=0"],
    ));
    let evals: Vec<f64> = metrics(&out)
        .iter()
        .filter_map(|r| r.get("eval_loss").and_then(|v| v.as_f64()))
        .collect();
    println!("LoRA SFT, bf16 base: eval_loss {evals:?}");
    assert!(evals.last() < evals.first(), "{evals:?}");
    let opt = tensors(&out.join("trainer/optimizer.safetensors"));
    assert!(opt.values().all(|t| t.dtype() == DType::F32));
    load_frozen(&out, &Device::Cpu).unwrap();
}
