//! The DPO stage through the real binary: on the tiny SFT model's own samples ranked by the
//! sentiment judge, DPO must raise the held-out judge score with a finite KL and order
//! held-out pairs; kill and `--resume` must end on the same weights; iterated DPO runs in a
//! `repeat:` group; bad input is one clear line and writes nothing.

mod common;

use std::path::{Path, PathBuf};

use common::*;

/// The tiny SFT model's samples (K = 6, as configs/recipes/tiny.yaml draws them) ranked by
/// the sentiment judge, for the training and the held-out prompts; made once per build.
fn rankings() -> (PathBuf, PathBuf) {
    let sft = tiny_sft();
    let dir = cached_checkpoint("tiny-rankings", |out| {
        std::fs::create_dir_all(out).unwrap();
        for (name, prompts) in [
            ("train", "data/prompts/sentiment-train.jsonl"),
            ("heldout", "data/prompts/sentiment-heldout.jsonl"),
        ] {
            let cand = out.join(format!("{name}-candidates.jsonl"));
            ok(candor()
                .args(["sample", "--device", "cpu", "--model"])
                .arg(&sft)
                .args(["--prompts", prompts])
                .args([
                    "--k",
                    "6",
                    "--max-new-tokens",
                    "32",
                    "--temperature",
                    "0.4",
                    "--top-k",
                    "20",
                ])
                .arg("--out")
                .arg(&cand));
            ok(candor()
                .args(["rank", "--judge", "sentiment", "--in"])
                .arg(&cand)
                .arg("--out")
                .arg(out.join(format!("{name}.jsonl"))));
        }
        // cached_checkpoint waits for a complete candor.json
        std::fs::write(out.join("candor.json"), "{\"complete\": true}").unwrap();
    });
    (dir.join("train.jsonl"), dir.join("heldout.jsonl"))
}

fn dpo(init: &Path, out: &Path, sets: &[&str]) -> std::process::Command {
    let (train, heldout) = rankings();
    let mut c = candor();
    c.args([
        "dpo",
        "--config",
        "configs/tiny/dpo.yaml",
        "--device",
        "cpu",
        "--init",
    ])
    .arg(init)
    .arg("--out")
    .arg(out)
    .arg("--set")
    .arg(format!("data.files=[{}]", train.display()))
    .arg("--set")
    .arg(format!("data.heldout={}", heldout.display()));
    for s in sets {
        c.args(["--set", s]);
    }
    c
}

fn last(m: &[serde_json::Value], key: &str) -> f64 {
    m.iter()
        .rev()
        .find_map(|r| r.get(key).and_then(|v| v.as_f64()))
        .unwrap_or_else(|| panic!("{key} never logged"))
}

fn first(m: &[serde_json::Value], key: &str) -> f64 {
    m.iter()
        .find_map(|r| r.get(key).and_then(|v| v.as_f64()))
        .unwrap_or_else(|| panic!("{key} never logged"))
}

/// configs/tiny/dpo.yaml as shipped: the held-out judge score rises over the SFT policy's
/// with a finite KL to it, and the implicit reward orders held-out pairs better than chance.
#[test]
fn dpo_raises_the_heldout_judge_score_and_orders_heldout_pairs() {
    let sft = tiny_sft();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("dpo");
    let t0 = std::time::Instant::now();
    ok(&mut dpo(&sft, &out, &[]));
    let secs = t0.elapsed().as_secs_f64();
    let m = metrics(&out);
    let (before, after) = (first(&m, "judge_score"), last(&m, "judge_score"));
    let (acc0, acc) = (first(&m, "eval_accuracy"), last(&m, "eval_accuracy"));
    let kl = last(&m, "kl");
    println!(
        "dpo (tiny, sigmoid β 0.1): held-out judge_score {before:.4} -> {after:.4}, kl {kl:.3}, \
         eval_accuracy {acc0:.3} -> {acc:.3}, eval_margin {:.3}, eval_loss {:.4} -> {:.4}, {secs:.1}s",
        last(&m, "eval_margin"),
        first(&m, "eval_loss"),
        last(&m, "eval_loss"),
    );
    assert!(
        after > before + 0.05,
        "judge score did not rise: {before} -> {after}"
    );
    assert!(kl.is_finite() && kl < 30.0, "KL to the SFT policy: {kl}");
    assert!(acc > 0.5, "eval_accuracy {acc}");
    // a healthy run: no run-health signal trips
    let tripped: Vec<&serde_json::Value> = m
        .iter()
        .filter(|r| {
            r.as_object()
                .unwrap()
                .keys()
                .any(|k| k.starts_with("health_"))
        })
        .collect();
    assert!(tripped.is_empty(), "{tripped:?}");
    for key in [
        "loss",
        "eval_loss",
        "eval_accuracy",
        "eval_margin",
        "reward_chosen",
        "reward_rejected",
        "logps_chosen",
        "logps_rejected",
        "lr",
        "grad_norm",
        "tokens_per_sec",
        "judge_score",
        "kl",
    ] {
        assert!(
            m.iter().any(|r| r.get(key).is_some()),
            "metric {key} never logged"
        );
    }
    // an lm checkpoint, the reference's log-probs kept with the trainer state
    let meta = read_json(&out.join("candor.json"));
    assert_eq!(meta["stage"], "dpo");
    assert_eq!(meta["head"], "lm");
    assert_eq!(meta["parents"][0]["role"], "init");
    assert!(meta["metrics"]["judge_score_initial"].as_f64().is_some());
    for f in [
        "model.safetensors",
        "samples.jsonl",
        "trainer/reference_logps.safetensors",
    ] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    let text = ok(candor()
        .args([
            "generate",
            "--chat",
            "--device",
            "cpu",
            "--max-new-tokens",
            "16",
        ])
        .args(["--prompt", "Describe the sea.", "--model"])
        .arg(&out));
    assert!(!text.trim().is_empty());
}

/// A deliberately broken run (learning rate 3e-3, 15× the shipped one) pushes the chosen
/// responses' likelihood down with the rejected ones: `health_chosen_falls` trips, warns
/// once and is logged; with `train.stop_on_health` the run stops with one error line and
/// keeps its last checkpoint.
#[test]
fn a_broken_run_trips_the_chosen_falls_signal_and_can_stop_on_it() {
    let sft = tiny_sft();
    let tmp = tempfile::tempdir().unwrap();
    let sets = [
        "train.lr=3e-3",
        "train.min_lr=3e-3",
        "train.steps=24",
        "train.eval_every=0",
        "train.log_every=1",
    ];
    let out = tmp.path().join("broken");
    let run = dpo(&sft, &out, &sets).output().unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{stderr}");
    let m = metrics(&out);
    let first_trip = m
        .iter()
        .find(|r| r.get("health_chosen_falls").is_some())
        .unwrap_or_else(|| panic!("health_chosen_falls never tripped: {m:?}"));
    let step = first_trip["step"].as_u64().unwrap();
    let value = first_trip["health_chosen_falls"].as_f64().unwrap();
    // the signal's value is the step's logged reward_chosen, below -chosen_floor (2)
    let logged = m
        .iter()
        .find(|r| r["step"] == step && r.get("reward_chosen").is_some())
        .unwrap()["reward_chosen"]
        .as_f64()
        .unwrap();
    assert!(value == logged && value < -2.0, "{value} vs {logged}");
    assert_eq!(
        stderr
            .matches("warning: chosen responses losing likelihood")
            .count(),
        1,
        "{stderr}"
    );

    let stopped = tmp.path().join("stopped");
    let mut sets = sets.to_vec();
    sets.extend(["train.stop_on_health=true", "train.save_every=1"]);
    let e = fails(&mut dpo(&sft, &stopped, &sets));
    assert!(
        e.contains("run health: chosen responses losing likelihood")
            && e.contains(&format!("stopped at step {step}")),
        "{e}"
    );
    let meta = read_json(&stopped.join("candor.json"));
    assert_eq!(meta["step"].as_u64(), Some(step - 1));
}

/// Killed after a checkpoint and resumed, a run ends on the same weights and optimiser state
/// as one never interrupted, and the resumed run reads the reference's log-probs from the
/// checkpoint instead of computing them again.
#[test]
fn kill_and_resume_gives_the_same_final_weights() {
    let sft = tiny_sft();
    let tmp = tempfile::tempdir().unwrap();
    let sets = [
        "train.steps=6",
        "train.save_every=2",
        "train.eval_every=0",
        "eval.prompts=null",
        "eval.judge=null",
    ];
    let straight = tmp.path().join("straight");
    ok(&mut dpo(&sft, &straight, &sets));
    let partial = tmp.path().join("partial");
    let mut child = dpo(&sft, &partial, &sets)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let step = kill_after_checkpoint(&mut child, &partial, 2);
    assert!(step < 6, "the run finished before it was killed");
    assert_eq!(read_json(&partial.join("candor.json"))["complete"], false);
    let resumed = dpo(&sft, &partial, &sets).arg("--resume").output().unwrap();
    let stderr = String::from_utf8_lossy(&resumed.stderr);
    assert!(resumed.status.success(), "{stderr}");
    assert!(stderr.contains("resuming at step"), "{stderr}");
    assert!(
        !stderr.contains("reference log-probs of"),
        "the resumed run recomputed the reference log-probs: {stderr}"
    );
    for f in [
        "model.safetensors",
        "trainer/optimizer.safetensors",
        "trainer/reference_logps.safetensors",
    ] {
        assert!(
            std::fs::read(straight.join(f)).unwrap() == std::fs::read(partial.join(f)).unwrap(),
            "{f} differs after kill and resume (killed at step {step})"
        );
    }
}

/// SimPO loads no reference (none is needed, none is stored); IPO and hinge train.
#[test]
fn every_loss_type_trains_and_simpo_loads_no_reference() {
    let sft = tiny_sft();
    let tmp = tempfile::tempdir().unwrap();
    let short = [
        "train.steps=2",
        "train.eval_every=0",
        "eval.prompts=null",
        "eval.judge=null",
    ];
    for (loss, extra) in [
        (
            "simpo",
            vec![
                "dpo.beta=2.0",
                "dpo.simpo_gamma=0.5",
                "dpo.label_smoothing=0.1",
            ],
        ),
        ("ipo", vec![]),
        ("hinge", vec!["dpo.sft_coef=0.5"]),
    ] {
        let out = tmp.path().join(loss);
        let lt = format!("dpo.loss_type={loss}");
        let mut sets: Vec<&str> = short.to_vec();
        sets.push(&lt);
        sets.extend(extra);
        // a reference that does not exist: only SimPO may run without reading it
        let mut c = dpo(&sft, &out, &sets);
        c.arg("--reference")
            .arg(tmp.path().join("no-such-reference"));
        if loss == "simpo" {
            let o = c.output().unwrap();
            let stderr = String::from_utf8_lossy(&o.stderr);
            assert!(o.status.success(), "{stderr}");
            assert!(stderr.contains("no reference"), "{stderr}");
            assert!(!out.join("trainer/reference_logps.safetensors").exists());
        } else {
            let e = fails(&mut c);
            assert!(e.contains("no-such-reference"), "{e}");
            ok(&mut dpo(&sft, &out, &sets));
        }
        let m = metrics(&out);
        assert!(last(&m, "loss").is_finite() && last(&m, "eval_accuracy").is_finite());
    }
}

/// DPO with `train.gradient_checkpointing` (the policy's blocks recomputed in the backward of
/// the pair loss) logs the losses, rewards and accuracies DPO logs without it.
#[test]
fn gradient_checkpointing_gives_the_same_dpo_run() {
    let sft = tiny_sft();
    let tmp = tempfile::tempdir().unwrap();
    let short = [
        "train.steps=3",
        "train.log_every=1",
        "train.eval_every=0",
        "eval.prompts=null",
        "eval.judge=null",
    ];
    let (plain, ckpt) = (tmp.path().join("plain"), tmp.path().join("ckpt"));
    ok(&mut dpo(&sft, &plain, &short));
    let mut sets = short.to_vec();
    sets.push("train.gradient_checkpointing=true");
    ok(&mut dpo(&sft, &ckpt, &sets));
    let (a, b) = (metrics(&plain), metrics(&ckpt));
    assert_eq!(a.len(), b.len());
    let mut compared = 0;
    for (x, y) in a.iter().zip(&b) {
        for (k, v) in x.as_object().unwrap() {
            if k.starts_with("time") || k.contains("per_sec") || k.starts_with("elapsed") {
                continue;
            }
            if let (Some(v), Some(w)) = (v.as_f64(), y[k].as_f64()) {
                assert!((v - w).abs() <= 1e-5 * v.abs().max(1.0), "{k}: {v} vs {w}");
                compared += 1;
            }
        }
    }
    assert!(compared >= 10, "{a:?}");
}

/// Online (iterated) DPO: each round samples from the current policy, ranks with the judge,
/// and runs DPO from that policy again.
#[test]
fn iterated_dpo_runs_in_a_repeat_group() {
    let sft = tiny_sft();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let recipe = tmp.path().join("online-dpo.yaml");
    std::fs::write(
        &recipe,
        format!(
            "out: {}\nseed: 1\ndevice: cpu\nstages:\n  - {{name: sft, kind: model, path: {}}}\n  - name: online\n    repeat: 2\n    \
             carry: {{policy: sft}}\n    next: {{policy: dpo}}\n    stages:\n      \
             - {{name: samples, kind: sample, model: policy, prompts: data/prompts/sentiment-train.jsonl, k: 4, max_prompts: 40, temperature: 0.4, top_k: 20}}\n      \
             - {{name: rankings, kind: rank, input: samples, judge: sentiment}}\n      \
             - {{name: dpo, kind: dpo, config: configs/tiny/dpo.yaml, init: policy, data: rankings, set: [train.steps=3, train.eval_every=0, data.heldout=null, data.heldout_fraction=0.1, eval.max_prompts=8]}}\n",
            out.display(),
            sft.display()
        ),
    )
    .unwrap();
    ok(candor().arg("run").arg(&recipe));
    let round1 = read_json(&out.join("online-1/dpo/candor.json"));
    let round2 = read_json(&out.join("online-2/dpo/candor.json"));
    assert_eq!(round1["complete"], true);
    // round 2 starts from round 1's policy, and samples from it
    assert_eq!(round2["parents"][0]["content_hash"], round1["content_hash"]);
    assert!(out.join("online-2/samples/samples.jsonl").is_file());
    // a second run skips every stage
    let again = ok(candor().arg("run").arg(&recipe));
    assert!(
        !again.contains("online-2/dpo: ran") || again.contains("skip"),
        "{again}"
    );
}

/// Bad input: one clear line naming the file or key, a non-zero exit, nothing written.
#[test]
fn bad_input_is_one_clear_line_and_writes_nothing() {
    let sft = tiny_sft();
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let out = d.join("dpo");
    let (train, _) = rankings();
    let with_data = |file: &Path| format!("data.files=[{}]", file.display());

    // an empty preference file
    let empty = d.join("empty.jsonl");
    std::fs::write(&empty, "").unwrap();
    let e = fails(&mut dpo(
        &sft,
        &out,
        &[&with_data(&empty), "data.heldout=null"],
    ));
    assert!(
        e.contains("empty.jsonl") && e.contains("no preference lines"),
        "{e}"
    );

    // every prompt all ties
    let ties = d.join("ties.jsonl");
    std::fs::write(
        &ties,
        "{\"prompt\": \"a\", \"responses\": [\"x\", \"y\"], \"ranks\": [1, 1]}\n\
         {\"prompt\": \"b\", \"responses\": [\"x\", \"y\", \"z\"], \"ranks\": [2, 2, 2]}\n",
    )
    .unwrap();
    let e = fails(&mut dpo(
        &sft,
        &out,
        &[
            &with_data(&ties),
            "data.heldout=null",
            "data.heldout_fraction=0",
        ],
    ));
    assert!(e.contains("ties.jsonl") && e.contains("all ties"), "{e}");

    // β ≤ 0 and an unknown loss type name their key
    let e = fails(&mut dpo(&sft, &out, &["dpo.beta=0"]));
    assert!(e.contains("dpo.beta") && e.contains("positive"), "{e}");
    let e = fails(&mut dpo(&sft, &out, &["dpo.beta=-0.5"]));
    assert!(e.contains("dpo.beta"), "{e}");
    let e = fails(&mut dpo(&sft, &out, &["dpo.loss_type=kto"]));
    assert!(
        e.contains("dpo.loss_type") && e.contains("kto") && e.contains("sigmoid"),
        "{e}"
    );

    // a reference with another tokenizer
    let other = small_checkpoint(d);
    let mut c = dpo(&sft, &out, &[]);
    c.arg("--reference").arg(&other);
    let e = fails(&mut c);
    assert!(
        e.contains("tokenizer") && e.contains(&other.display().to_string()),
        "{e}"
    );
    assert!(!out.exists(), "a failed run wrote {}", out.display());
    let _ = train;
}
