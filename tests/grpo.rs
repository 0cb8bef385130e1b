//! GRPO through the real binary: kill and resume, per-judge rewards in the log and the
//! report, run-health warnings, and bad input refused with one line.

mod common;

use std::path::Path;

use common::*;

fn grpo(policy: &Path, out: &Path, sets: &[&str]) -> std::process::Command {
    let mut c = candor();
    c.args([
        "grpo",
        "--config",
        "configs/tiny/grpo.yaml",
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

/// Small and quick: 4 prompts × 4 completions, two updates per pass, two passes (so the
/// sampling policy's log-probs are used), the reference loaded (β > 0).
const QUICK: [&str; 7] = [
    "train.steps=4",
    "train.eval_every=0",
    "rollout.prompts_per_step=4",
    "rollout.group_size=4",
    "train.batch_size=8",
    "grpo.num_iterations=2",
    "grpo.beta=0.04",
];

/// A run killed after its step-2 checkpoint and resumed ends with the weights and optimiser
/// state of a run that was never interrupted.
#[test]
fn kill_and_resume_gives_the_weights_of_an_uninterrupted_run() {
    let sft = tiny_sft();
    let tmp = tempfile::tempdir().unwrap();
    let mut sets = QUICK.to_vec();
    sets.push("train.save_every=2");
    let straight = tmp.path().join("straight");
    ok(&mut grpo(&sft, &straight, &sets));
    let m = metrics(&straight);
    let kls: Vec<f64> = m.iter().filter_map(|r| r["kl"].as_f64()).collect();
    assert_eq!(kls.len(), 4, "{m:?}");
    assert!(kls.iter().all(|k| k.is_finite() && *k >= 0.0), "{kls:?}");

    let partial = tmp.path().join("partial");
    let mut child = grpo(&sft, &partial, &sets)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let step = kill_after_checkpoint(&mut child, &partial, 2);
    assert!(step < 4, "the run finished before it was killed");
    assert_eq!(read_json(&partial.join("candor.json"))["complete"], false);
    ok(grpo(&sft, &partial, &sets).arg("--resume"));
    for f in ["model.safetensors", "trainer/optimizer.safetensors"] {
        assert!(
            std::fs::read(straight.join(f)).unwrap() == std::fs::read(partial.join(f)).unwrap(),
            "{f} differs after resume"
        );
    }
    let a: Vec<String> = metrics(&straight)
        .iter()
        .map(|r| format!("{}", r["reward_mean"]))
        .collect();
    let b: Vec<String> = metrics(&partial)
        .iter()
        .map(|r| format!("{}", r["reward_mean"]))
        .collect();
    assert_eq!(a, b, "metrics differ after resume");
}

/// Each bad input gives one `error:` line naming what is wrong (`fails` checks there is
/// exactly one), exit status 1, and no output directory.
#[test]
fn bad_input_is_refused_with_one_line_and_nothing_written() {
    let sft = tiny_sft();
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let out = d.join("grpo");

    let e = fails(&mut grpo(&sft, &out, &["rollout.group_size=1"]));
    assert!(
        e.contains("rollout.group_size: is 1; a group needs at least 2 completions"),
        "{e}"
    );

    // the sampling settings get the one check PPO, sample and generate use, before anything loads
    let e = fails(&mut grpo(&sft, &out, &["rollout.temperature=-1"]));
    assert!(
        e.contains("rollout.temperature: -1: expected a finite number >= 0"),
        "{e}"
    );

    let e = fails(&mut grpo(
        &sft,
        &out,
        &["grpo.epsilon=0.2", "grpo.epsilon_high=0.1"],
    ));
    assert!(
        e.contains("grpo.epsilon_high: is 0.1, below grpo.epsilon 0.2"),
        "{e}"
    );

    // the third line lacks the `reference` the math judge reads
    let prompts = d.join("no-ref.jsonl");
    std::fs::write(
        &prompts,
        "{\"prompt\": \"What is 1 + 1?\", \"reference\": \"2\"}\n{\"prompt\": \"What is 2 + 2?\", \"reference\": 4}\n{\"prompt\": \"What is 3 + 3?\"}\n",
    )
    .unwrap();
    let p = format!("data.prompts={}", prompts.display());
    let e = fails(&mut grpo(&sft, &out, &[p.as_str()]));
    assert!(
        e.contains("no-ref.jsonl:3:") && e.contains("`math`") && e.contains("`reference`"),
        "{e}"
    );

    // a reward model with another tokenizer
    let corpus = small_corpus(d);
    let cfg = small_pretrain_config(d, &corpus, 2);
    let other = d.join("other");
    ok(candor()
        .args(["pretrain", "--device", "cpu", "--config"])
        .arg(&cfg)
        .arg("--out")
        .arg(&other));
    let mut c = grpo(&sft, &out, &["score.reward_model_weight=1"]);
    c.arg("--reward").arg(&other);
    let e = fails(&mut c);
    assert!(e.contains("use different tokenizers"), "{e}");

    let e = fails(&mut grpo(&sft, &out, &["health.zero_spread=2"]));
    assert!(
        e.contains("health.zero_spread: 2: expected a fraction in [0, 1]"),
        "{e}"
    );

    let e = fails(&mut grpo(&sft, &out, &["grpo.loss_typo=dapo"]));
    assert!(e.contains("grpo.loss_typo"), "{e}");
    assert!(!out.exists(), "a refused run wrote {}", out.display());
}

/// `score.judges`: each judge's batch mean is logged as `reward_<label>` and drawn by
/// `candor report`. A reward that cannot tell completions apart (the `length` judge with a
/// band every completion is in: every group scores alike) trips the zero-spread health
/// signal: one warning line, `health_zero_spread` in the log and the report; with
/// `train.stop_on_health` the run stops with one error line, keeping the last checkpoint.
#[test]
fn per_judge_rewards_are_logged_and_drawn_and_a_flat_reward_trips_health() {
    let sft = tiny_sft();
    let tmp = tempfile::tempdir().unwrap();
    let sets = [
        "train.steps=3",
        "train.eval_every=0",
        "rollout.prompts_per_step=2",
        "rollout.group_size=3",
        "train.batch_size=6",
        "score.judge=null",
        // two judges no completion can tell apart: `never` scores every one 0 (no response
        // is that long), `any` every one 1 (the tiny SFT model answers some arithmetic
        // questions right, so `math` would not be flat)
        "score.judges=[{name: \"length:100000-200000\", label: never}, {name: \"length:0-100000\", weight: 0.5, label: any}]",
        "health.window=2",
    ];
    let out = tmp.path().join("grpo");
    let mut c = grpo(&sft, &out, &sets);
    let run = c.output().unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{stderr}");
    let m = metrics(&out);
    let trained: Vec<&serde_json::Value> = m
        .iter()
        .filter(|r| r.get("policy_loss").is_some())
        .collect();
    assert_eq!(trained.len(), 3, "{m:?}");
    for r in &trained {
        // the reward is never + 0.5·any = 0.5, and the raw reward (no reward model, no
        // score.judge) the same weighted sum
        let (never, any) = (
            r["reward_never"].as_f64().unwrap(),
            r["reward_any"].as_f64().unwrap(),
        );
        assert_eq!((never, any), (0.0, 1.0), "{r}");
        assert!(
            (r["reward_raw_mean"].as_f64().unwrap() - 0.5).abs() < 1e-12,
            "{r}"
        );
        assert_eq!(r["zero_spread"].as_f64(), Some(1.0), "{r}");
    }
    // the signal trips at steps 2 and 3 (window 2), warns once
    let tripped: Vec<u64> = m
        .iter()
        .filter(|r| r.get("health_zero_spread").is_some())
        .map(|r| r["step"].as_u64().unwrap())
        .collect();
    assert_eq!(tripped, [2, 3], "{m:?}");
    assert_eq!(
        stderr.matches("warning: no learning signal").count(),
        1,
        "{stderr}"
    );
    ok(candor().arg("report").arg(&out));
    let report = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(
        report.contains("reward per judge (score.judges)"),
        "{report}"
    );
    assert!(
        report.contains("| health_zero_spread | 2 | 3 | 2 |"),
        "{report}"
    );
    let svg = std::fs::read_to_string(out.join("plots/grpo-judges.svg"))
        .or_else(|_| {
            // the plot is named after the stage's id in the run directory
            let p = std::fs::read_dir(out.join("plots"))
                .unwrap()
                .map(|e| e.unwrap().path())
                .find(|p| p.to_string_lossy().ends_with("-judges.svg"))
                .expect("a judges plot");
            std::fs::read_to_string(p)
        })
        .unwrap();
    assert!(svg.contains("reward_never") && svg.contains("reward_any"));

    // train.stop_on_health: stops at step 2 with one error line; step 1's checkpoint stays
    let stopped = tmp.path().join("stopped");
    let mut sets = sets.to_vec();
    sets.extend(["train.stop_on_health=true", "train.save_every=1"]);
    let e = fails(&mut grpo(&sft, &stopped, &sets));
    assert!(
        e.contains("run health: no learning signal") && e.contains("stopped at step 2"),
        "{e}"
    );
    let meta = read_json(&stopped.join("candor.json"));
    assert_eq!(
        (meta["step"].as_u64(), meta["complete"].as_bool()),
        (Some(1), Some(false))
    );
}
