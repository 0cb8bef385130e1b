//! Pretraining through the real binary: learning, generation, exact resume, bad input.

mod common;

use std::path::Path;

use common::*;

#[test]
fn tiny_config_beats_the_unigram_baseline_and_generates() {
    // runs `candor pretrain --config configs/tiny/pretrain.yaml` (once per build; shared)
    let out = tiny_pretrained();
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "candor.json",
        "metrics.jsonl",
        "trainer/optimizer.safetensors",
        "trainer/trainer_state.json",
    ] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    let meta = read_json(&out.join("candor.json"));
    assert_eq!(meta["stage"], "pretrain");
    assert_eq!(meta["head"], "lm");
    assert_eq!(meta["complete"], true);
    let eval = meta["metrics"]["eval_loss"].as_f64().unwrap();
    let unigram = meta["metrics"]["unigram_loss"].as_f64().unwrap();
    println!("tiny pretrain: eval_loss {eval:.3} vs unigram {unigram:.3}");
    assert!(
        eval < unigram - 0.5,
        "eval_loss {eval} not clearly below unigram {unigram}"
    );
    let m = metrics(&out);
    let first_eval = m
        .iter()
        .find_map(|r| r.get("eval_loss"))
        .unwrap()
        .as_f64()
        .unwrap();
    assert!(
        eval < first_eval - 1.0,
        "held-out loss fell only from {first_eval} to {eval}"
    );
    assert!(m.iter().any(|r| r.get("tokens_per_sec").is_some()
        && r.get("lr").is_some()
        && r.get("grad_norm").is_some()));
    let cfg = read_json(&out.join("config.json"));
    assert_eq!(cfg["architectures"][0], "LlamaForCausalLM");

    let text = ok(candor()
        .args([
            "generate",
            "--device",
            "cpu",
            "--max-new-tokens",
            "20",
            "--prompt",
            "The sea",
            "--model",
        ])
        .arg(&out));
    assert!(
        text.starts_with("The sea") && text.trim().len() > "The sea".len() + 5,
        "{text:?}"
    );
}

fn run_small(dir: &Path, out: &Path, extra: &[&str]) -> std::process::Child {
    let corpus = small_corpus(dir);
    let cfg = small_pretrain_config(dir, &corpus, 80);
    candor()
        .args([
            "pretrain",
            "--device",
            "cpu",
            "--set",
            "train.save_every=10",
            "--config",
        ])
        .arg(&cfg)
        .arg("--out")
        .arg(out)
        .args(extra)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap()
}

#[test]
fn killed_run_resumes_to_the_same_weights_as_an_uninterrupted_one() {
    let tmp = tempfile::tempdir().unwrap();
    let straight = tmp.path().join("straight");
    assert!(run_small(tmp.path(), &straight, &[])
        .wait()
        .unwrap()
        .success());

    let killed = tmp.path().join("killed");
    let mut child = run_small(tmp.path(), &killed, &[]);
    // wait for an intermediate checkpoint, then kill -9
    let killed_at = kill_after_checkpoint(&mut child, &killed, 10);
    let meta = read_json(&killed.join("candor.json"));
    assert_eq!(
        meta["complete"], false,
        "run finished before it could be killed"
    );
    assert!(killed_at < 80);

    assert!(run_small(tmp.path(), &killed, &["--resume"])
        .wait()
        .unwrap()
        .success());
    let a = std::fs::read(straight.join("model.safetensors")).unwrap();
    let b = std::fs::read(killed.join("model.safetensors")).unwrap();
    assert!(
        a == b,
        "resumed weights differ from the uninterrupted run's (killed at step {killed_at})"
    );
    assert_eq!(
        std::fs::read(straight.join("trainer/optimizer.safetensors")).unwrap(),
        std::fs::read(killed.join("trainer/optimizer.safetensors")).unwrap()
    );
    // the log continues without gaps or repeats
    let steps: Vec<u64> = metrics(&killed)
        .iter()
        .filter(|r| r.get("loss").is_some())
        .map(|r| r["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, (1..=16).map(|i| i * 5).collect::<Vec<_>>());
    // resuming a finished run does nothing and succeeds
    assert!(run_small(tmp.path(), &killed, &["--resume"])
        .wait()
        .unwrap()
        .success());
    // an existing checkpoint is not overwritten without asking
    let e = fails(
        candor()
            .args(["pretrain", "--device", "cpu", "--config"])
            .arg(small_pretrain_config(
                tmp.path(),
                &tmp.path().join("corpus.txt"),
                80,
            ))
            .arg("--out")
            .arg(&killed),
    );
    assert!(
        e.contains("already holds a checkpoint") && e.contains("--resume"),
        "{e}"
    );
}

#[test]
fn bad_input_fails_with_one_clear_line_and_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let corpus = small_corpus(d);
    let good = small_pretrain_config(d, &corpus, 2);
    let out = d.join("out");
    let run = |cfg: &Path, sets: &[&str]| {
        let mut c = candor();
        c.args(["pretrain", "--device", "cpu", "--config"])
            .arg(cfg)
            .arg("--out")
            .arg(&out);
        for s in sets {
            c.args(["--set", s]);
        }
        let e = fails(&mut c);
        assert!(!out.exists(), "a failed run left {}", out.display());
        e
    };

    // missing config file
    let e = run(&d.join("nope.yaml"), &[]);
    assert!(e.contains("nope.yaml: cannot read config file"), "{e}");

    // malformed YAML names file and line
    let bad = d.join("bad.yaml");
    std::fs::write(&bad, "train:\n  steps: [1\nseed: 2\n").unwrap();
    let e = run(&bad, &[]);
    assert!(
        e.contains("bad.yaml:") && e.contains("malformed YAML"),
        "{e}"
    );

    // unknown key, in the file and by --set
    std::fs::write(&bad, "train: {stepz: 3}\n").unwrap();
    let e = run(&bad, &[]);
    assert!(
        e.contains("bad.yaml: train") && e.contains("unknown field `stepz`"),
        "{e}"
    );
    let e = run(&good, &["model.widht=3"]);
    assert!(e.contains("unknown field `widht`"), "{e}");

    // empty corpus
    let empty = d.join("empty.jsonl");
    std::fs::write(&empty, "\n").unwrap();
    let e = run(&good, &[&format!("data.files=[{}]", empty.display())]);
    assert!(
        e.contains("corpus is empty") && e.contains("empty.jsonl"),
        "{e}"
    );

    // a JSONL line without text
    std::fs::write(&empty, "{\"text\": \"ok\"}\n{\"body\": \"x\"}\n").unwrap();
    let e = run(&good, &[&format!("data.files=[{}]", empty.display())]);
    assert!(e.contains("empty.jsonl:2: missing field `text`"), "{e}");

    // missing corpus file
    let e = run(&good, &["data.files=[/nonexistent/corpus.txt]"]);
    assert!(e.contains("/nonexistent/corpus.txt: no such file"), "{e}");

    // a corpus too small for the context
    let e = run(&good, &["model.ctx=100000"]);
    assert!(e.contains("too few for ctx 100000"), "{e}");

    let base = small_checkpoint(d);
    let init = format!("init={}", base.display());

    // ctx larger than the model's positions
    let e = run(&good, &[&init, "model.ctx=64"]);
    assert!(
        e.contains("model.ctx 64 is larger than the model's max_position_embeddings 32"),
        "{e}"
    );

    // tokenizer / model vocabulary mismatch
    let big_tok = d.join("tok").join("tokenizer.json");
    ok(candor()
        .args(["tokenizer", "train", "--vocab-size", "600", "--corpus"])
        .arg(&corpus)
        .arg("--out")
        .arg(&big_tok));
    let e = run(
        &good,
        &[&init, &format!("data.tokenizer={}", big_tok.display())],
    );
    assert!(
        e.contains("config.json: vocab_size") && e.contains("tokenizer and model do not match"),
        "{e}"
    );

    // truncated safetensors
    let st = base.join("model.safetensors");
    let bytes = std::fs::read(&st).unwrap();
    std::fs::write(&st, &bytes[..bytes.len() - 100]).unwrap();
    let e = run(&good, &[&init]);
    assert!(
        e.contains("model.safetensors: not a valid safetensors file"),
        "{e}"
    );

    // weights of the wrong shape for config.json
    std::fs::write(&st, &bytes).unwrap();
    let cfg_path = base.join("config.json");
    let mut cfg = read_json(&cfg_path);
    cfg["intermediate_size"] = serde_json::json!(128);
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let e = run(&good, &[&init]);
    assert!(
        e.contains("model.safetensors: tensor `model.layers.0.mlp.down_proj.weight` has shape"),
        "{e}"
    );

    // a missing --init checkpoint
    let e = run(&good, &["init=/nonexistent/ckpt"]);
    assert!(e.contains("/nonexistent/ckpt"), "{e}");

    // bad --device
    let mut c = candor();
    c.args(["pretrain", "--device", "tpu", "--config"])
        .arg(&good)
        .arg("--out")
        .arg(&out);
    let e = fails(&mut c);
    assert!(e.contains("--device") && e.contains("tpu"), "{e}");
}
