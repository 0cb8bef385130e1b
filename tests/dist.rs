//! Data parallel through the real binary on the CPU: `--nproc 2` (ranks as processes over
//! TCP) in every training stage, the torchrun environment, and failures that stop every rank;
//! and `train.dtype: bf16` in the stages besides pretraining (which crates/candor-pretrain's
//! tests cover).

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::process::Stdio;

use common::*;

fn weights(dir: &Path) -> HashMap<String, candle_core::Tensor> {
    candle_core::safetensors::load(dir.join("model.safetensors"), &candle_core::Device::Cpu)
        .unwrap()
}

fn worst_difference(a: &Path, b: &Path) -> f32 {
    let (a, b) = (weights(a), weights(b));
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

fn losses(dir: &Path) -> Vec<f64> {
    metrics(dir)
        .iter()
        .filter_map(|r| r.get("loss").and_then(|v| v.as_f64()))
        .collect()
}

fn worst_loss_difference(a: &Path, b: &Path) -> f64 {
    let (l1, l2) = (losses(a), losses(b));
    assert_eq!(l1.len(), l2.len());
    assert!(!l1.is_empty());
    l1.iter()
        .zip(&l2)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

/// `--nproc 2`: two processes, each on half of every batch, train the same model as one
/// process on whole batches; one output, one summary line, rank 1 silent.
#[test]
fn nproc_2_trains_the_same_model_as_one_process() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = small_corpus(tmp.path());
    let cfg = small_pretrain_config(tmp.path(), &corpus, 10);
    let (one, two) = (tmp.path().join("one"), tmp.path().join("two"));
    one_and_two("pretrain", &["--config", cfg.to_str().unwrap()], &one, &two);
    let (diff, loss_diff) = (
        worst_difference(&one, &two),
        worst_loss_difference(&one, &two),
    );
    println!("--nproc 2 vs 1 process: worst weight difference {diff:.2e}, worst logged loss difference {loss_diff:.2e}");
    assert!(
        diff < 1e-5 && loss_diff < 1e-5,
        "weights differ by {diff}, losses by {loss_diff}"
    );
}

/// Ranks started by another launcher (here: by hand, with torchrun's variables) join the
/// same way; a rank that cannot start its part stops the others with one error.
#[test]
fn torchrun_environment_and_failing_ranks() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = small_corpus(tmp.path());
    let cfg = small_pretrain_config(tmp.path(), &corpus, 4);
    let out = tmp.path().join("env");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
        .to_string();
    let ranks: Vec<_> = (0..2)
        .map(|r| {
            candor()
                .args(["pretrain", "--device", "cpu", "--config"])
                .arg(&cfg)
                .arg("--out")
                .arg(&out)
                .envs([
                    ("RANK", r.to_string()),
                    ("WORLD_SIZE", "2".into()),
                    ("LOCAL_RANK", r.to_string()),
                ])
                .envs([("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", port.as_str())])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let outs: Vec<_> = ranks
        .into_iter()
        .map(|c| c.wait_with_output().unwrap())
        .collect();
    for o in &outs {
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    assert_eq!(read_json(&out.join("candor.json"))["step"], 4);
    assert!(String::from_utf8_lossy(&outs[1].stdout).is_empty());

    // a global batch smaller than the world: every rank refuses; one error line
    let e = fails(
        candor()
            .args([
                "pretrain",
                "--device",
                "cpu",
                "--nproc",
                "2",
                "--set",
                "train.batch_size=1",
                "--config",
            ])
            .arg(&cfg)
            .arg("--out")
            .arg(tmp.path().join("bad")),
    );
    assert!(
        e.contains("train.batch_size: 1 is smaller than the 2 ranks"),
        "{e}"
    );
    // a launcher environment that does not add up
    let e = fails(
        candor()
            .args(["pretrain", "--device", "cpu", "--config"])
            .arg(&cfg)
            .arg("--out")
            .arg(tmp.path().join("bad"))
            .envs([("RANK", "0"), ("WORLD_SIZE", "2")]),
    );
    assert!(e.contains("needs MASTER_ADDR"), "{e}");
    assert!(!tmp.path().join("bad").exists());
}

/// Run a stage command once in one process and once as `--nproc 2`; both must succeed, the
/// two-rank run print one summary line (rank 1 silent) and name its 2 TCP ranks.
fn one_and_two(stage: &str, args: &[&str], one: &Path, two: &Path) {
    ok(candor()
        .arg(stage)
        .args(args)
        .args(["--device", "cpu", "--out"])
        .arg(one));
    let out = candor()
        .arg(stage)
        .args(args)
        .args(["--device", "cpu", "--nproc", "2", "--out"])
        .arg(two)
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stderr}");
    assert_eq!(
        stdout
            .lines()
            .filter(|l| l.starts_with(&format!("{stage}:")))
            .count(),
        1,
        "{stdout}"
    );
    assert!(stderr.contains("2 ranks (tcp)"), "{stderr}");
    assert!(!stderr.contains("[rank 1]"), "rank 1 printed: {stderr}");
    assert_eq!(read_json(&two.join("candor.json"))["complete"], true);
}

/// SFT (the loop it shares with pretraining: masked targets, packed rows) and the reward
/// model (each prompt's pairs on one rank, the loss per pair of the whole batch) train the
/// same weights on 2 ranks as on one.
#[test]
fn sft_and_reward_with_nproc_2_train_the_same_model_as_one_process() {
    let tmp = tempfile::tempdir().unwrap();
    let base = small_checkpoint(tmp.path());
    let sets = [
        "--set",
        "train.steps=6",
        "--set",
        "train.batch_size=5",
        "--set",
        "train.eval_every=3",
        "--set",
        "train.save_every=3",
    ];
    let (one, two) = (tmp.path().join("sft1"), tmp.path().join("sft2"));
    let mut args = vec![
        "--config",
        "configs/tiny/sft.yaml",
        "--init",
        base.to_str().unwrap(),
    ];
    args.extend(sets);
    one_and_two("sft", &args, &one, &two);
    let (diff, loss_diff) = (
        worst_difference(&one, &two),
        worst_loss_difference(&one, &two),
    );
    println!("sft --nproc 2 vs 1 process: worst weight difference {diff:.2e}, worst logged loss difference {loss_diff:.2e}");
    assert!(
        diff < 1e-5 && loss_diff < 1e-5,
        "weights differ by {diff}, losses by {loss_diff}"
    );

    // preferences: 7 prompts, rankings of 2 to 4 responses (1 to 6 pairs each)
    let prefs = tmp.path().join("prefs.jsonl");
    let words = [
        "good", "fine", "bad", "awful", "great", "dull", "kind", "cold",
    ];
    let lines: Vec<String> = (0..7)
        .map(|i| {
            let k = 2 + i % 3;
            let responses: Vec<String> = (0..k).map(|j| format!("It was {} and {}.", words[(i + j) % 8], words[(3 * i + j) % 8])).collect();
            serde_json::json!({"prompt": format!("Say something about day {i}."), "responses": responses}).to_string()
        })
        .collect();
    std::fs::write(&prefs, lines.join("\n") + "\n").unwrap();
    let (one, two) = (tmp.path().join("rm1"), tmp.path().join("rm2"));
    let files = format!("data.files=[{}]", prefs.display());
    let args = [
        "--config",
        "configs/tiny/reward.yaml",
        "--init",
        base.to_str().unwrap(),
        "--set",
        &files,
        "--set",
        "data.heldout_fraction=0.3",
    ]
    .into_iter()
    .chain([
        "--set",
        "data.heldout=null",
        "--set",
        "train.steps=5",
        "--set",
        "train.batch_size=3",
        "--set",
        "train.grad_accum=2",
    ])
    .collect::<Vec<_>>();
    one_and_two("reward", &args, &one, &two);
    let (diff, loss_diff) = (
        worst_difference(&one, &two),
        worst_loss_difference(&one, &two),
    );
    let m = |d: &Path| {
        read_json(&d.join("candor.json"))["metrics"]["reward_mean"]
            .as_f64()
            .unwrap()
    };
    println!("reward --nproc 2 vs 1 process: worst weight difference {diff:.2e}, worst logged loss difference {loss_diff:.2e}");
    assert!(
        diff < 1e-5 && loss_diff < 1e-5,
        "weights differ by {diff}, losses by {loss_diff}"
    );
    assert!(
        (m(&one) - m(&two)).abs() < 1e-4,
        "reward_mean {} vs {}",
        m(&one),
        m(&two)
    );

    // bf16 (f32 master weights): the same pairwise losses to bf16's resolution
    let bf16 = tmp.path().join("rm-bf16");
    let out = candor()
        .arg("reward")
        .args(&args)
        .args(["--set", "train.dtype=bf16", "--device", "cpu", "--out"])
        .arg(&bf16)
        .output()
        .unwrap();
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stderr).contains("bf16 on cpu"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let loss_diff = worst_loss_difference(&one, &bf16);
    println!("reward bf16 vs f32: worst logged loss difference {loss_diff:.4}");
    assert!(
        loss_diff < 0.02 && loss_diff > 0.0,
        "bf16 losses differ from f32's by {loss_diff}"
    );
    assert_f32_optimizer(&bf16);
}

fn assert_f32_optimizer(dir: &Path) {
    let opt = candle_core::safetensors::load(
        dir.join("trainer/optimizer.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    assert!(
        !opt.is_empty() && opt.values().all(|t| t.dtype() == candle_core::DType::F32),
        "optimizer state is not all f32"
    );
}

/// PPO with `--nproc 2`: each rank rolls out half of every prompt batch, the rows are
/// gathered, every minibatch is split over the ranks. With greedy rollouts (no randomness
/// in the responses) it must train the same policy and critic as one process.
#[test]
fn ppo_with_nproc_2_shards_rollouts_and_trains_the_same_policy_as_one_process() {
    let tmp = tempfile::tempdir().unwrap();
    // a policy that knows the chat template: 2 pretraining steps (128-token context), 2 of SFT
    let corpus = small_corpus(tmp.path());
    let cfg = small_pretrain_config(tmp.path(), &corpus, 2);
    let pre = tmp.path().join("pre");
    ok(candor()
        .args([
            "pretrain",
            "--device",
            "cpu",
            "--set",
            "model.ctx=128",
            "--config",
        ])
        .arg(&cfg)
        .arg("--out")
        .arg(&pre));
    let base = tmp.path().join("sft");
    ok(candor()
        .args([
            "sft",
            "--config",
            "configs/tiny/sft.yaml",
            "--device",
            "cpu",
            "--set",
            "train.steps=2",
            "--set",
            "train.batch_size=4",
            "--init",
        ])
        .arg(&pre)
        .arg("--out")
        .arg(&base));
    let sets = [
        "score.reward_model_weight=0",
        "score.judge=sentiment",
        "score.judge_weight=1",
        "rollout.temperature=0",
        "rollout.prompts_per_iteration=5",
        "rollout.max_new_tokens=6",
        "train.batch_size=3",
        "ppo.epochs=2",
        "ppo.entropy_coef=0.01",
        "train.steps=3",
        "train.eval_every=0",
        "train.save_every=2",
        "eval.max_prompts=4",
    ];
    let mut args = vec![
        "--config",
        "configs/tiny/ppo.yaml",
        "--policy",
        base.to_str().unwrap(),
    ];
    for s in &sets {
        args.extend(["--set", s]);
    }
    let (one, two) = (tmp.path().join("ppo1"), tmp.path().join("ppo2"));
    one_and_two("ppo", &args, &one, &two);
    let diff = worst_difference(&one, &two)
        .max(worst_difference(&one.join("critic"), &two.join("critic")));
    let series = |d: &Path, k: &str| {
        metrics(d)
            .iter()
            .filter_map(|r| r.get(k).and_then(|v| v.as_f64()))
            .collect::<Vec<_>>()
    };
    for k in [
        "reward_mean",
        "kl",
        "policy_loss",
        "value_loss",
        "response_len",
    ] {
        let (a, b) = (series(&one, k), series(&two, k));
        assert_eq!(a.len(), b.len(), "{k}");
        for (x, y) in a.iter().zip(&b) {
            assert!(
                (x - y).abs() < 1e-4 * x.abs().max(1.0),
                "{k}: {a:?} vs {b:?}"
            );
        }
    }
    println!("ppo --nproc 2 vs 1 process (greedy rollouts): worst weight difference {diff:.2e}");
    assert!(diff < 1e-4, "policy/critic weights differ by {diff}");

    // bf16 on 2 ranks: rollouts, reference and judge scoring and updates in bf16, f32 state
    let bf16 = tmp.path().join("ppo-bf16");
    let out = candor()
        .arg("ppo")
        .args(&args)
        .args([
            "--set",
            "train.dtype=bf16",
            "--device",
            "cpu",
            "--nproc",
            "2",
            "--out",
        ])
        .arg(&bf16)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stderr.contains("bf16 on cpu, 2 ranks (tcp)"),
        "{stderr}"
    );
    let (a, b) = (series(&one, "kl"), series(&bf16, "kl"));
    println!(
        "ppo bf16 on 2 ranks: kl {b:?} (f32: {a:?}), policy_loss {:?}",
        series(&bf16, "policy_loss")
    );
    assert_eq!(a.len(), b.len());
    assert!(b
        .iter()
        .chain(&series(&bf16, "value_loss"))
        .all(|x| x.is_finite()));
    assert_f32_optimizer(&bf16);
}

/// GRPO with `--nproc 2`: each rank samples half of every step's groups (each completion
/// from its own random stream, numbered in the whole batch), the rows are gathered, every
/// update is split over the ranks. Sampled at temperature 1 with the reference loaded and two
/// passes of two updates each (so the sampling policy's log-probs are used), it trains the
/// same policy and logs the same metrics as one process with the same global batch.
#[test]
fn grpo_with_nproc_2_samples_and_trains_as_one_process() {
    let tmp = tempfile::tempdir().unwrap();
    let sft = tiny_sft();
    let sets = [
        "data.prompts=data/prompts/sentiment-train.jsonl",
        "data.heldout_prompts=null",
        "eval.judge=null",
        "score.judge=null",
        "score.judges=[{name: sentiment, label: mood}, {name: \"regex:t\", label: has_t}]",
        "rollout.prompts_per_step=4",
        "rollout.group_size=3",
        "rollout.max_new_tokens=6",
        "rollout.temperature=1.0",
        "train.batch_size=6",
        "grpo.num_iterations=2",
        "grpo.beta=0.04",
        "train.steps=3",
        "train.eval_every=0",
        "train.save_every=2",
    ];
    let mut args = vec![
        "--config",
        "configs/tiny/grpo.yaml",
        "--policy",
        sft.to_str().unwrap(),
    ];
    for s in &sets {
        args.extend(["--set", s]);
    }
    let (one, two) = (tmp.path().join("grpo1"), tmp.path().join("grpo2"));
    one_and_two("grpo", &args, &one, &two);
    let series = |d: &Path, k: &str| {
        metrics(d)
            .iter()
            .filter_map(|r| r.get(k).and_then(|v| v.as_f64()))
            .collect::<Vec<_>>()
    };
    for k in [
        "reward_mean",
        "reward_mood",
        "reward_has_t",
        "zero_spread",
        "kl",
        "policy_loss",
        "entropy",
        "response_len",
    ] {
        let (a, b) = (series(&one, k), series(&two, k));
        assert_eq!(a.len(), 3, "{k}: {a:?}");
        assert_eq!(a.len(), b.len(), "{k}");
        for (x, y) in a.iter().zip(&b) {
            assert!(
                (x - y).abs() < 1e-4 * x.abs().max(1.0),
                "{k}: {a:?} vs {b:?}"
            );
        }
    }
    // every step had groups with a spread, so a gradient to follow: with every group flat
    // and the policy still at the reference, the gradient is rounding noise that AdamW's
    // normalisation turns into a full step, different for two batch layouts
    assert!(series(&one, "zero_spread").iter().all(|&z| z < 1.0));
    let diff = worst_difference(&one, &two);
    println!("grpo --nproc 2 vs 1 process (sampled rollouts): worst weight difference {diff:.2e}");
    assert!(diff < 1e-4, "policy weights differ by {diff}");
    assert!(
        worst_difference(&one, &sft) > 1e-4,
        "the policy did not move"
    );
}
