//! PPO through the real binary: the judge score rises with KL bounded, bad input, NaN stop.

mod common;

use std::path::Path;

use common::*;

fn ppo(policy: &Path, out: &Path, sets: &[&str]) -> std::process::Command {
    let mut c = candor();
    c.args([
        "ppo",
        "--config",
        "configs/tiny/ppo.yaml",
        "--device",
        "cpu",
        "--policy",
    ])
    .arg(policy)
    .arg("--out")
    .arg(out);
    for s in sets {
        c.args(["--set", s]);
    }
    c
}

/// The sentiment judge itself as the reward (no reward model): PPO must raise the mean judge
/// score on the held-out prompts above the SFT policy's, with the KL to the reference bounded.
#[test]
fn ppo_with_the_sentiment_judge_raises_the_heldout_judge_score() {
    let sft = tiny_sft();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("ppo");
    // VADER scores lie in [-1, 1] and most of the tiny model's responses score 0: a weight of
    // 4 gives the rare scored response an advantage that stands out of the KL noise
    ok(&mut ppo(
        &sft,
        &out,
        &[
            "score.reward_model_weight=0",
            "score.judge=sentiment",
            "score.judge_weight=4",
        ],
    ));
    let meta = read_json(&out.join("candor.json"));
    let before = meta["metrics"]["judge_score_initial"].as_f64().unwrap();
    let after = meta["metrics"]["judge_score"].as_f64().unwrap();
    let m = metrics(&out);
    let kls: Vec<f64> = m
        .iter()
        .filter_map(|r| r.get("kl").and_then(|v| v.as_f64()))
        .collect();
    let max_kl = kls.iter().cloned().fold(0.0, f64::max);
    println!("ppo (judge reward): held-out judge_score {before:.4} -> {after:.4}, max KL {max_kl:.3}, final KL {:.3}", kls.last().unwrap());
    assert!(
        after > before + 0.05,
        "judge score did not rise: {before} -> {after}"
    );
    assert!(max_kl < 15.0, "KL to the reference not bounded: {max_kl}");
    let health: Vec<&serde_json::Value> = m
        .iter()
        .filter(|r| {
            r.as_object()
                .unwrap()
                .keys()
                .any(|k| k.starts_with("health_"))
        })
        .collect();
    assert!(health.is_empty(), "a healthy run tripped: {health:?}");
    // the contract: an lm checkpoint any stage loads, the critic beside it
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "candor.json",
        "metrics.jsonl",
        "samples.jsonl",
        "critic/config.json",
        "critic/model.safetensors",
        "trainer/optimizer.safetensors",
    ] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    assert_eq!(
        read_json(&out.join("critic/config.json"))["architectures"][0],
        "LlamaForSequenceClassification"
    );
    assert_eq!(meta["parents"][0]["role"], "policy");
    for key in [
        "reward_mean",
        "reward_raw_mean",
        "kl",
        "kl_coef",
        "entropy",
        "policy_loss",
        "value_loss",
        "clip_frac",
        "approx_kl",
        "response_len",
        "time_generate",
        "time_score",
        "time_train",
    ] {
        assert!(
            m.iter().any(|r| r.get(key).is_some()),
            "metric {key} never logged"
        );
    }
    let text = ok(candor()
        .args([
            "generate",
            "--chat",
            "--device",
            "cpu",
            "--max-new-tokens",
            "24",
            "--prompt",
            "Describe the sea.",
            "--model",
        ])
        .arg(&out));
    assert!(!text.trim().is_empty());
}

#[test]
fn resume_restores_policy_critic_and_optimizers() {
    let sft = tiny_sft();
    let tmp = tempfile::tempdir().unwrap();
    let sets = [
        "score.reward_model_weight=0",
        "score.judge=sentiment",
        "score.judge_weight=1",
        "train.steps=4",
        "train.save_every=2",
        "train.eval_every=0",
        "rollout.prompts_per_iteration=8",
    ];
    let straight = tmp.path().join("straight");
    ok(&mut ppo(&sft, &straight, &sets));
    // kill a second run once its iteration-2 checkpoint is on disk, then resume it
    let partial = tmp.path().join("partial");
    let mut child = ppo(&sft, &partial, &sets)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(300);
    loop {
        if let Ok(t) = std::fs::read_to_string(partial.join("candor.json")) {
            let v: serde_json::Value = serde_json::from_str(&t).unwrap();
            if v["step"].as_u64() >= Some(2) {
                child.kill().unwrap();
                break;
            }
        }
        assert!(std::time::Instant::now() < deadline);
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    child.wait().unwrap();
    assert_eq!(read_json(&partial.join("candor.json"))["complete"], false);
    let mut resumed = ppo(&sft, &partial, &sets);
    ok(resumed.arg("--resume"));
    for f in [
        "model.safetensors",
        "critic/model.safetensors",
        "trainer/optimizer.safetensors",
    ] {
        assert!(
            std::fs::read(straight.join(f)).unwrap() == std::fs::read(partial.join(f)).unwrap(),
            "{f} differs after resume"
        );
    }
}

#[test]
fn bad_input_is_refused_before_training() {
    let sft = tiny_sft();
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let out = d.join("ppo");
    let judge = [
        "score.reward_model_weight=0",
        "score.judge=sentiment",
        "score.judge_weight=1",
    ];

    // empty prompt file
    let empty = d.join("empty.jsonl");
    std::fs::write(&empty, "").unwrap();
    let mut sets = judge.to_vec();
    let p = format!("data.prompts={}", empty.display());
    sets.push(&p);
    let e = fails(&mut ppo(&sft, &out, &sets));
    assert!(e.contains("empty.jsonl: no prompts"), "{e}");

    // a prompt longer than the context
    let long = d.join("long.jsonl");
    std::fs::write(
        &long,
        format!(
            "{{\"prompt\": \"hi\"}}\n{{\"prompt\": \"{}\"}}\n",
            "word ".repeat(400)
        ),
    )
    .unwrap();
    let p = format!("data.prompts={}", long.display());
    let mut sets = judge.to_vec();
    sets.push(&p);
    let e = fails(&mut ppo(&sft, &out, &sets));
    assert!(
        e.contains("long.jsonl:2: prompt is") && e.contains("exceeds the policy's context"),
        "{e}"
    );

    // a reward model with a different tokenizer
    let corpus = small_corpus(d);
    let cfg = small_pretrain_config(d, &corpus, 2);
    let other = d.join("other");
    ok(candor()
        .args(["pretrain", "--device", "cpu", "--config"])
        .arg(&cfg)
        .arg("--out")
        .arg(&other));
    let mut c = ppo(&sft, &out, &[]);
    c.arg("--reward").arg(&other);
    let e = fails(&mut c);
    assert!(e.contains("use different tokenizers"), "{e}");

    // unknown judge
    let e = fails(&mut ppo(
        &sft,
        &out,
        &[
            "score.reward_model_weight=0",
            "score.judge=vibes",
            "score.judge_weight=1",
        ],
    ));
    assert!(e.contains("unknown judge `vibes`"), "{e}");

    // no reward at all
    let e = fails(&mut ppo(&sft, &out, &["score.reward_model_weight=0"]));
    assert!(e.contains("no reward"), "{e}");
    assert!(!out.exists());
}

#[test]
fn a_nan_stops_the_run_and_keeps_the_last_good_checkpoint() {
    let sft = tiny_sft();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("ppo");
    let e = fails(&mut ppo(
        &sft,
        &out,
        &[
            "score.reward_model_weight=0",
            "score.judge=sentiment",
            "score.judge_weight=1",
            "train.lr=1e30",
            "train.min_lr=1e30",
            "train.grad_clip=0",
            "train.save_every=1",
            "train.eval_every=0",
            "train.steps=6",
            // one update in iteration 1 (its loss is computed before the step, so finite and saved);
            // the blown-up weights make iteration 2's loss NaN
            "ppo.epochs=1",
            "rollout.prompts_per_iteration=8",
        ],
    ));
    assert!(
        e.contains("stopped") && e.contains("last good checkpoint"),
        "{e}"
    );
    let meta = read_json(&out.join("candor.json"));
    assert_eq!(meta["complete"], false);
    assert!(meta["step"].as_u64().unwrap() >= 1);
    // the kept checkpoint loads
    ok(candor()
        .args([
            "generate",
            "--device",
            "cpu",
            "--max-new-tokens",
            "3",
            "--prompt",
            "x",
            "--model",
        ])
        .arg(&out));
}

/// `--show-config` prints the effective config (defaults filled in, the command's paths
/// applied; loadable YAML) and, as comments, the paths the run would read: the policy's
/// directory, absolute; input files, absolute, a missing one marked.
#[test]
fn show_config_prints_the_effective_config_and_resolved_paths() {
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy");
    std::fs::create_dir_all(&policy).unwrap();
    let out = ok(candor().args([
        "ppo",
        "--config",
        "configs/tiny/ppo.yaml",
        "--policy",
        policy.to_str().unwrap(),
        "--set",
        "data.heldout_prompts=nowhere.jsonl",
        "--show-config",
    ]));
    let config: serde_yaml::Value = serde_yaml::from_str(&out).unwrap();
    assert_eq!(config["rollout"]["max_new_tokens"].as_u64(), Some(24));
    assert_eq!(config["ppo"]["gamma"].as_f64(), Some(1.0), "{out}");
    assert_eq!(config["policy"].as_str(), policy.to_str());
    let prompts = repo_root().join("data/prompts/sentiment-train.jsonl");
    assert!(out.contains("# resolved paths:"), "{out}");
    assert!(
        out.contains(&format!("#   policy: {}", policy.display())),
        "{out}"
    );
    assert!(
        out.contains(&format!("#   data.prompts: {}\n", prompts.display())),
        "{out}"
    );
    let missing = repo_root().join("nowhere.jsonl");
    assert!(
        out.contains(&format!(
            "#   data.heldout_prompts: {} (does not exist)",
            missing.display()
        )),
        "{out}"
    );
}

/// Issue 16, case 9: a NaN well after a save (the fault hook makes iteration 3's loss NaN;
/// debug builds only) stops the run, and the checkpoint it keeps is iteration 2's: it loads,
/// and its policy and critic equal those of the same run ended cleanly at iteration 2 (the
/// tiny config's learning rate is constant, so the two runs' first iterations are the same).
#[test]
fn a_nan_after_a_save_keeps_exactly_the_saved_step() {
    let sft = tiny_sft();
    let tmp = tempfile::tempdir().unwrap();
    let sets = [
        "score.reward_model_weight=0",
        "score.judge=sentiment",
        "score.judge_weight=1",
        "train.save_every=2",
        "train.eval_every=0",
        "rollout.prompts_per_iteration=8",
    ];
    let clean = tmp.path().join("clean");
    ok(ppo(&sft, &clean, &sets).args(["--set", "train.steps=2"]));
    let out = tmp.path().join("faulted");
    let e = fails(
        ppo(&sft, &out, &sets)
            .args(["--set", "train.steps=6"])
            .env("CANDOR_FAULT_NAN_STEP", "3"),
    );
    assert!(
        e.contains("PPO loss became NaN at iteration 3") && e.contains("last good checkpoint"),
        "{e}"
    );
    let meta = read_json(&out.join("candor.json"));
    assert_eq!(
        (meta["step"].as_u64(), &meta["complete"]),
        (Some(2), &false.into())
    );
    for f in ["model.safetensors", "critic/model.safetensors"] {
        assert!(
            std::fs::read(clean.join(f)).unwrap() == std::fs::read(out.join(f)).unwrap(),
            "{f}: the kept checkpoint is not iteration 2's"
        );
    }
    ok(candor()
        .args([
            "generate",
            "--device",
            "cpu",
            "--max-new-tokens",
            "3",
            "--prompt",
            "x",
            "--model",
        ])
        .arg(&out));
    assert!(!tmp.path().read_dir().unwrap().any(|e| e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .starts_with('.')));
}

/// Run health: a deliberately broken run — no KL penalty and a learning rate 100x the tiny
/// config's — trips health signals (a warning line each, `health_*` in metrics.jsonl), and
/// with `train.stop_on_health` stops, keeping its last checkpoint. (The tiny config itself
/// stays quiet: see the recipe test.)
#[test]
fn health_signals_trip_on_a_broken_run() {
    let sft = tiny_sft();
    let tmp = tempfile::tempdir().unwrap();
    let broken = [
        "score.reward_model_weight=0",
        "score.judge=sentiment",
        "score.judge_weight=4",
        "kl.coef=0",
        "train.lr=1e-2",
        "train.min_lr=1e-2",
        "train.steps=10",
        "train.eval_every=5",
        "train.save_every=2",
        "rollout.prompts_per_iteration=8",
    ];
    let out = tmp.path().join("broken");
    let run = ppo(&sft, &out, &broken).output().unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{stderr}");
    let warnings: Vec<&str> = stderr.lines().filter(|l| l.contains("warning: ")).collect();
    let tripped: std::collections::BTreeSet<String> = metrics(&out)
        .iter()
        .flat_map(|r| r.as_object().unwrap().keys().cloned().collect::<Vec<_>>())
        .filter(|k| k.starts_with("health_"))
        .collect();
    println!("broken run: tripped {tripped:?}\n{}", warnings.join("\n"));
    assert!(!tripped.is_empty(), "no health signal tripped: {stderr}");
    assert_eq!(
        warnings.len(),
        tripped.len(),
        "one warning line per signal: {stderr}"
    );

    let stopped = tmp.path().join("stopped");
    // saving every iteration, so that a checkpoint exists whichever signal trips first
    let e = fails(ppo(&sft, &stopped, &broken).args([
        "--set",
        "train.stop_on_health=true",
        "--set",
        "train.save_every=1",
    ]));
    assert!(
        e.contains("run health: ") && e.contains("train.stop_on_health"),
        "{e}"
    );
    let meta = read_json(&stopped.join("candor.json"));
    assert_eq!(meta["complete"], false);
}
