//! The reward-model stage end to end: the tiny SFT model's samples (`candor sample`, K = 6)
//! ranked by the sentiment judge (`candor rank --judge sentiment`) train the tiny reward
//! model (`candor reward`, configs/tiny/reward.yaml), which must order held-out pairs;
//! `candor score` and `candor eval` read it back. And the stage's clear errors.

mod common;

use std::path::{Path, PathBuf};
use std::time::Instant;

use common::*;

/// Sampling for the rankings: K = 6 responses per prompt. A low temperature with top-k keeps
/// the tiny model to the words it knows best, so the same sentiment words recur across
/// prompts (at temperature 1 its text is mostly non-words, and each sentiment word the judge
/// finds is one the reward model never sees again).
const SAMPLING: [&str; 8] = [
    "--k",
    "6",
    "--max-new-tokens",
    "32",
    "--temperature",
    "0.4",
    "--top-k",
    "20",
];

/// `candor sample` then `candor rank --judge sentiment` on a prompt file; returns the ranked file.
fn sample_and_rank(model: &Path, prompts: &str, dir: &Path, name: &str) -> PathBuf {
    let cand = dir.join(format!("{name}-candidates.jsonl"));
    let ranked = dir.join(format!("{name}-ranked.jsonl"));
    let out = ok(candor()
        .args(["sample", "--device", "cpu", "--model"])
        .arg(model)
        .args(["--prompts", prompts])
        .args(SAMPLING)
        .arg("--out")
        .arg(&cand));
    assert!(out.contains("sample:"), "{out}");
    for line in std::fs::read_to_string(&cand).unwrap().lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let mut r: Vec<&str> = v["responses"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_str().unwrap())
            .collect();
        assert!(r.len() >= 2 && r.len() <= 6, "{line}");
        r.sort();
        r.dedup();
        assert_eq!(
            r.len(),
            v["responses"].as_array().unwrap().len(),
            "distinct responses: {line}"
        );
    }
    ok(candor()
        .args(["rank", "--judge", "sentiment", "--in"])
        .arg(&cand)
        .arg("--out")
        .arg(&ranked));
    ranked
}

#[test]
fn tiny_reward_model_learns_the_sentiment_judges_rankings() {
    let sft = tiny_sft();
    let tmp = tempfile::tempdir().unwrap();
    let train = sample_and_rank(
        &sft,
        "data/prompts/sentiment-train.jsonl",
        tmp.path(),
        "train",
    );
    let heldout = sample_and_rank(
        &sft,
        "data/prompts/sentiment-heldout.jsonl",
        tmp.path(),
        "heldout",
    );
    assert_eq!(
        std::fs::read_to_string(&train).unwrap().lines().count(),
        300
    );

    let rm = tmp.path().join("reward");
    let reward = |extra: &[&str]| {
        ok(candor()
            .args([
                "reward",
                "--config",
                "configs/tiny/reward.yaml",
                "--device",
                "cpu",
                "--init",
            ])
            .arg(&sft)
            .arg("--set")
            .arg(format!("data.files=[{}]", train.display()))
            .arg("--set")
            .arg(format!("data.heldout={}", heldout.display()))
            .arg("--out")
            .arg(&rm)
            .args(extra))
    };
    let t0 = Instant::now();
    let stdout = reward(&[]);
    let secs = t0.elapsed().as_secs_f64();

    // the checkpoint: a sequence classifier with one label, its score head named as in HF
    let meta = read_json(&rm.join("candor.json"));
    let config = read_json(&rm.join("config.json"));
    assert_eq!(
        (
            meta["stage"].as_str(),
            meta["head"].as_str(),
            meta["complete"].as_bool()
        ),
        (Some("reward"), Some("score"), Some(true))
    );
    assert_eq!(
        config["architectures"],
        serde_json::json!(["LlamaForSequenceClassification"])
    );
    assert_eq!(config["num_labels"], 1);
    assert_eq!(meta["parents"][0]["role"], "init");
    let st = std::fs::read(rm.join("model.safetensors")).unwrap();
    let st = safetensors_names(&st);
    assert!(
        st.contains(&"score.weight".to_string()) && !st.contains(&"lm_head.weight".to_string()),
        "{st:?}"
    );

    let m = &meta["metrics"];
    let (acc, margin) = (
        m["eval_accuracy"].as_f64().unwrap(),
        m["eval_margin"].as_f64().unwrap(),
    );
    let (mean, std) = (
        m["reward_mean"].as_f64().unwrap(),
        m["reward_std"].as_f64().unwrap(),
    );
    eprintln!("tiny reward model: held-out eval_accuracy {acc:.4}, eval_margin {margin:.4}, reward_mean {mean:.4}, reward_std {std:.4}, {secs:.1}s; {stdout}");
    let log = metrics(&rm);
    let first = log
        .iter()
        .find(|r| r.get("eval_accuracy").is_some())
        .unwrap();
    assert_eq!(first["step"], 0);
    assert!(log
        .iter()
        .any(|r| r.get("loss").is_some() && r.get("grad_norm").is_some()));
    assert!(
        acc >= 0.75,
        "held-out pairwise accuracy {acc} < 0.75 (step 0: {})",
        first["eval_accuracy"]
    );
    assert!(margin > 0.0 && std > 0.0 && mean.is_finite());

    // `candor eval` reads the same held-out accuracy back from the checkpoint
    let e: serde_json::Value = serde_json::from_str(&ok(candor()
        .args(["eval", "--json", "--device", "cpu", "--model"])
        .arg(&rm)
        .arg("--data")
        .arg(&heldout)))
    .unwrap();
    assert!(
        (e["eval_accuracy"].as_f64().unwrap() - acc).abs() < 1e-9,
        "{e}"
    );
    assert!(
        (e["eval_margin"].as_f64().unwrap() - margin).abs() < 1e-4,
        "{e}"
    );

    // `candor score` gives the ranked-best response more reward than the worst, mostly
    let scored = ok(candor()
        .args(["score", "--json", "--device", "cpu", "--model"])
        .arg(&rm)
        .arg("--data")
        .arg(&train));
    let rows: Vec<serde_json::Value> = scored
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 300);
    let plain = ok(candor()
        .args(["score", "--device", "cpu", "--model"])
        .arg(&rm)
        .arg("--data")
        .arg(&heldout));
    assert!(
        plain.lines().last().unwrap().starts_with("score: "),
        "{plain}"
    );

    // finished: a rerun with --resume has nothing to do and changes nothing
    let hash = meta["content_hash"].clone();
    reward(&["--resume"]);
    assert_eq!(read_json(&rm.join("candor.json"))["content_hash"], hash);
}

/// Tensor names in a safetensors file (its JSON header).
fn safetensors_names(bytes: &[u8]) -> Vec<String> {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    header
        .as_object()
        .unwrap()
        .keys()
        .filter(|k| *k != "__metadata__")
        .cloned()
        .collect()
}

#[test]
fn bad_input_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    // sample: K < 2, greedy, a missing model
    let e = fails(
        candor()
            .args([
                "sample",
                "--model",
                "nowhere",
                "--prompts",
                "data/prompts/sentiment-heldout.jsonl",
                "--k",
                "1",
                "--out",
            ])
            .arg(t.join("c.jsonl")),
    );
    assert!(
        e.contains("--k 1: a ranking needs at least 2 responses"),
        "{e}"
    );
    let e = fails(
        candor()
            .args([
                "sample",
                "--model",
                "nowhere",
                "--prompts",
                "data/prompts/sentiment-heldout.jsonl",
                "--temperature",
                "0",
                "--out",
            ])
            .arg(t.join("c.jsonl")),
    );
    assert!(
        e.contains("greedy decoding gives the same response every time"),
        "{e}"
    );
    let e = fails(
        candor()
            .args([
                "sample",
                "--model",
                "nowhere",
                "--prompts",
                "data/prompts/sentiment-heldout.jsonl",
                "--out",
            ])
            .arg(t.join("c.jsonl")),
    );
    assert!(e.contains("nowhere"), "{e}");

    // reward: no --init; a bad preference line names file and line
    let prefs = t.join("prefs.jsonl");
    std::fs::write(
        &prefs,
        "{\"prompt\": \"p\", \"responses\": [\"a\", \"b\", \"c\"], \"ranks\": [1, 3, 2]}\n",
    )
    .unwrap();
    let set = format!("data.files=[{}]", prefs.display());
    let e = fails(
        candor()
            .args([
                "reward",
                "--config",
                "configs/tiny/reward.yaml",
                "--set",
                &set,
                "--out",
            ])
            .arg(t.join("rm")),
    );
    assert!(
        e.contains("configs/tiny/reward.yaml: init: give the starting checkpoint"),
        "{e}"
    );
    let init = tiny_pretrained();
    let e = fails(
        candor()
            .args([
                "reward",
                "--config",
                "configs/tiny/reward.yaml",
                "--device",
                "cpu",
                "--set",
                &set,
                "--init",
            ])
            .arg(&init)
            .arg("--out")
            .arg(t.join("rm")),
    );
    assert!(
        e.contains("prefs.jsonl:1: `ranks` decreases at position 3"),
        "{e}"
    );
    for (line, want) in [
        (
            r#"{"prompt": "p", "responses": ["a"]}"#,
            "prefs.jsonl:1: `responses` has 1 response(s)",
        ),
        (
            r#"{"prompt": "p", "responses": ["a", "b", "a"]}"#,
            "prefs.jsonl:1: responses 1 and 3 are the same text",
        ),
        (
            r#"{"prompt": "p", "chosen": "a", "rejected": "a"}"#,
            "prefs.jsonl:1: `chosen` and `rejected` are the same text",
        ),
        (
            r#"{"prompt": "p", "responses": ["a", "b"], "ranks": [1, 1]}"#,
            "no training pairs",
        ),
    ] {
        std::fs::write(&prefs, format!("{line}\n")).unwrap();
        let e = fails(
            candor()
                .args([
                    "reward",
                    "--config",
                    "configs/tiny/reward.yaml",
                    "--device",
                    "cpu",
                    "--set",
                    &set,
                    "--set",
                    "data.heldout=null",
                    "--set",
                    "data.heldout_fraction=0",
                    "--init",
                ])
                .arg(&init)
                .arg("--out")
                .arg(t.join("rm")),
        );
        assert!(e.contains(want), "{line}: {e}");
    }
    assert!(!t.join("rm").exists(), "no checkpoint from bad input");
    let e = fails(
        candor()
            .args([
                "reward",
                "--config",
                "configs/tiny/reward.yaml",
                "--set",
                "data.heldout_fraction=0.9",
                "--set",
                &set,
                "--init",
            ])
            .arg(&init),
    );
    assert!(
        e.contains("data.heldout_fraction: must be in [0, 0.5]"),
        "{e}"
    );
    let e = fails(
        candor()
            .args([
                "reward",
                "--config",
                "configs/tiny/reward.yaml",
                "--set",
                "data.file=x",
                "--init",
            ])
            .arg(&init),
    );
    assert!(
        e.contains("data.file") && e.contains("unknown field"),
        "{e}"
    );

    // score: an lm checkpoint is not a reward model; a line without a response
    let lines = t.join("s.jsonl");
    std::fs::write(
        &lines,
        "{\"prompt\": \"p\", \"response\": \"r\"}\n{\"prompt\": \"q\"}\n",
    )
    .unwrap();
    let e = fails(
        candor()
            .args(["score", "--device", "cpu", "--model"])
            .arg(&init)
            .arg("--data")
            .arg(&lines),
    );
    assert!(
        e.contains("s.jsonl:2: expected `response` (or `responses`"),
        "{e}"
    );
    std::fs::write(&lines, "{\"prompt\": \"p\", \"response\": \"r\"}\n").unwrap();
    let e = fails(
        candor()
            .args(["score", "--device", "cpu", "--model"])
            .arg(&init)
            .arg("--data")
            .arg(&lines),
    );
    assert!(
        e.contains("holds a language model (`lm` head), not a reward model"),
        "{e}"
    );
}
