//! SFT through the real binary: the tiny config lowers held-out response loss, the result
//! answers held-out instructions in the chat format it was trained on, `candor eval`
//! measures it, and bad input fails with one clear line.

mod common;

use std::path::{Path, PathBuf};
use std::time::Instant;

use common::*;
use serde_json::Value;

/// The first `n` held-out instructions (never seen in training) as a prompt file.
fn heldout_prompts(dir: &Path, n: usize) -> (PathBuf, Vec<Value>) {
    let text = std::fs::read_to_string(repo_root().join("data/prompts/instructions-heldout.jsonl"))
        .unwrap();
    let lines: Vec<Value> = text
        .lines()
        .take(n)
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let path = dir.join("prompts.jsonl");
    std::fs::write(
        &path,
        lines
            .iter()
            .map(|l| l.to_string() + "\n")
            .collect::<String>(),
    )
    .unwrap();
    (path, lines)
}

fn eval_json(model: &Path, data: &Path) -> serde_json::Map<String, Value> {
    let out = ok(candor()
        .args(["eval", "--json", "--device", "cpu", "--model"])
        .arg(model)
        .arg("--data")
        .arg(data));
    assert_eq!(out.lines().count(), 1, "--json prints one line: {out:?}");
    match serde_json::from_str::<Value>(&out).unwrap_or_else(|e| panic!("not JSON ({e}): {out:?}"))
    {
        Value::Object(m) => m,
        v => panic!("not a JSON object: {v}"),
    }
}

#[test]
fn tiny_sft_lowers_heldout_response_loss_and_answers_in_the_chat_format() {
    let clock = Instant::now();
    let pre = tiny_pretrained();
    let pretrain_sec = clock.elapsed().as_secs_f64();
    let clock = Instant::now();
    // runs `candor sft --config configs/tiny/sft.yaml --init <tiny pretrain>` (once per build; shared)
    let sft = tiny_sft();
    let sft_sec = clock.elapsed().as_secs_f64();

    // the checkpoint: an lm head, its parent, the chat template and end-of-turn it trained with
    let meta = read_json(&sft.join("candor.json"));
    assert_eq!(
        (
            meta["stage"].as_str(),
            meta["head"].as_str(),
            meta["complete"].as_bool()
        ),
        (Some("sft"), Some("lm"), Some(true))
    );
    assert_eq!(meta["parents"][0]["role"], "init");
    assert_eq!(
        meta["config"]["data"]["packing"], true,
        "the tiny config exercises packing"
    );
    let tok_cfg = read_json(&sft.join("tokenizer_config.json"));
    assert!(
        tok_cfg["chat_template"]
            .as_str()
            .unwrap()
            .contains("<|im_start|>"),
        "{tok_cfg}"
    );
    assert_eq!(tok_cfg["eos_token"], "<|im_end|>");
    // a candor-trained tokenizer carries the default template from the start (so transformers
    // renders what candor renders); SFT keeps the one it trained with
    assert_eq!(
        read_json(&pre.join("tokenizer_config.json"))["chat_template"],
        tok_cfg["chat_template"]
    );

    // held-out response loss falls
    let evals: Vec<f64> = metrics(&sft)
        .iter()
        .filter_map(|r| r.get("eval_loss"))
        .map(|v| v.as_f64().unwrap())
        .collect();
    let (first, last) = (evals[0], *evals.last().unwrap());
    println!(
        "tiny sft: held-out response loss {first:.3} -> {last:.3} over {} evals; training {:.1} s (candor.json); \
         this test waited {pretrain_sec:.1} s for pretrain and {sft_sec:.1} s for sft (0 when cached)",
        evals.len(),
        meta["elapsed_sec"].as_f64().unwrap()
    );
    assert!(evals.len() >= 3);
    assert!(
        last < first - 1.0,
        "held-out response loss fell only from {first} to {last}"
    );

    // generate --chat: held-out instructions answered as one assistant turn that ends on the
    // end-of-turn token; only the response is printed
    let tmp = tempfile::tempdir().unwrap();
    let (prompts, lines) = heldout_prompts(tmp.path(), 12); // additions and comparisons
    let out = ok(candor()
        .args([
            "generate",
            "--chat",
            "--device",
            "cpu",
            "--temperature",
            "0",
            "--max-new-tokens",
            "12",
            "--prompts",
        ])
        .arg(&prompts)
        .arg("--model")
        .arg(&sft));
    let answers: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(answers.len(), lines.len());
    for (a, l) in answers.iter().zip(&lines) {
        println!(
            "  {} -> {} (reference {})",
            l["prompt"], a["response"], l["reference"]
        );
    }
    let numbers = answers
        .iter()
        .filter(|a| {
            a["stopped"] == true
                && a["response"]
                    .as_str()
                    .is_some_and(|r| !r.is_empty() && r.chars().all(|c| c.is_ascii_digit()))
        })
        .count();
    assert!(
        numbers * 4 >= answers.len() * 3,
        "{numbers} of {} answers are a number ending its turn: {out}",
        answers.len()
    );
    // the pretrained model, posed the same way, does not answer in that format
    let base = ok(candor()
        .args([
            "generate",
            "--chat",
            "--device",
            "cpu",
            "--temperature",
            "0",
            "--max-new-tokens",
            "12",
            "--prompts",
        ])
        .arg(&prompts)
        .arg("--model")
        .arg(&pre));
    let base_stopped = base
        .lines()
        .filter(|l| serde_json::from_str::<Value>(l).unwrap()["stopped"] == true)
        .count();
    assert!(
        base_stopped < numbers,
        "the pretrained model already stops ({base_stopped} of {})",
        lines.len()
    );
    let one = ok(candor()
        .args([
            "generate",
            "--chat",
            "--device",
            "cpu",
            "--temperature",
            "0",
            "--max-new-tokens",
            "12",
            "--prompt",
            "What is 15 + 24?",
            "--model",
        ])
        .arg(&sft));
    assert!(
        !one.trim().is_empty() && !one.contains("What is") && !one.contains("<|im"),
        "{one:?}"
    );

    // eval --json: response-only loss on held-out SFT data (the references as responses),
    // lower after SFT; perplexity on text
    let sft_data = tmp.path().join("heldout-sft.jsonl");
    let sft_lines: String = lines
        .iter()
        .map(|l| {
            serde_json::json!({"prompt": l["prompt"], "response": l["reference"]}).to_string()
                + "\n"
        })
        .collect();
    std::fs::write(&sft_data, sft_lines).unwrap();
    let after = eval_json(&sft, &sft_data);
    let before = eval_json(&pre, &sft_data);
    println!(
        "eval on held-out instructions: eval_loss {} (pretrained) -> {} (sft)",
        before["eval_loss"], after["eval_loss"]
    );
    for k in ["eval_loss", "eval_ppl", "tokens", "examples"] {
        assert!(after.contains_key(k), "{k} missing: {after:?}");
    }
    assert_eq!(after["examples"], lines.len());
    let loss = after["eval_loss"].as_f64().unwrap();
    assert!((after["eval_ppl"].as_f64().unwrap() - loss.exp()).abs() < 1e-6 * loss.exp());
    assert!(
        loss < before["eval_loss"].as_f64().unwrap() - 1.0,
        "{before:?} -> {after:?}"
    );
    // response tokens only: each reference's tokens and its <|im_end|>
    let tok = candor_data::Tokenizer::from_dir(&sft).unwrap();
    let expected: usize = lines
        .iter()
        .map(|l| tok.encode(l["reference"].as_str().unwrap()).unwrap().len() + 1)
        .sum();
    assert_eq!(after["tokens"], expected, "{after:?}");

    let text = tmp.path().join("moby.txt");
    let moby = std::fs::read_to_string(repo_root().join("data/corpus/moby-dick.txt")).unwrap();
    std::fs::write(&text, moby.chars().take(4000).collect::<String>()).unwrap();
    let m = eval_json(&pre, &text);
    let (loss, tokens) = (
        m["eval_loss"].as_f64().unwrap(),
        m["tokens"].as_u64().unwrap(),
    );
    println!("eval on 4000 characters of Moby-Dick: eval_loss {loss:.3}, {tokens} tokens");
    assert!(loss > 1.0 && loss < 6.0 && tokens > 500, "{m:?}");
    let human = ok(candor()
        .args(["eval", "--device", "cpu", "--model"])
        .arg(&pre)
        .arg("--data")
        .arg(&text));
    assert!(
        human.starts_with("eval: ") && human.contains("eval_ppl"),
        "{human}"
    );
}

#[test]
fn killed_run_resumes_to_the_same_weights_as_an_uninterrupted_one() {
    let tmp = tempfile::tempdir().unwrap();
    let base = small_checkpoint(tmp.path());
    let run = |out: &Path, extra: &[&str]| {
        candor()
            .args([
                "sft",
                "--config",
                "configs/tiny/sft.yaml",
                "--device",
                "cpu",
            ])
            .args([
                "--set",
                "train.steps=40",
                "--set",
                "train.save_every=5",
                "--set",
                "train.batch_size=4",
                "--set",
                "train.eval_every=10",
            ])
            .arg("--init")
            .arg(&base)
            .arg("--out")
            .arg(out)
            .args(extra)
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap()
    };
    let straight = tmp.path().join("straight");
    assert!(run(&straight, &[]).wait().unwrap().success());
    let killed = tmp.path().join("killed");
    let killed_at = kill_after_checkpoint(&mut run(&killed, &[]), &killed, 5);
    assert_eq!(
        read_json(&killed.join("candor.json"))["complete"],
        false,
        "finished before it could be killed"
    );
    assert!(run(&killed, &["--resume"]).wait().unwrap().success());
    println!("sft killed at step {killed_at} of 40 and resumed");
    for f in [
        "model.safetensors",
        "trainer/optimizer.safetensors",
        "tokenizer_config.json",
    ] {
        assert!(
            std::fs::read(straight.join(f)).unwrap() == std::fs::read(killed.join(f)).unwrap(),
            "{f} differs after resuming at step {killed_at}"
        );
    }
    let evals = |d: &Path| {
        metrics(d)
            .iter()
            .filter_map(|r| r.get("eval_loss").map(|_| r["step"].as_u64().unwrap()))
            .collect::<Vec<_>>()
    };
    assert_eq!(evals(&killed), vec![0, 10, 20, 30, 40]);
}

#[test]
fn bad_input_fails_with_one_clear_line_naming_file_and_line() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let base = small_checkpoint(d);
    let corpus = d.join("corpus.txt");
    let data = d.join("sft.jsonl");
    let cfg = d.join("sft.yaml");
    std::fs::write(
        &cfg,
        format!(
            "data: {{files: [{}]}}\ntrain: {{steps: 2, batch_size: 2}}\n",
            data.display()
        ),
    )
    .unwrap();
    let out = d.join("out");
    let sft = |init: Option<&Path>, lines: &[&str]| {
        std::fs::write(&data, lines.join("\n") + "\n").unwrap();
        let mut c = candor();
        c.args(["sft", "--device", "cpu", "--config"])
            .arg(&cfg)
            .arg("--out")
            .arg(&out);
        if let Some(i) = init {
            c.arg("--init").arg(i);
        }
        let e = fails(&mut c);
        assert!(!out.exists(), "a failed run left {}", out.display());
        e
    };
    let good = r#"{"prompt": "What is 2 + 2?", "response": "4"}"#;
    let at2 = format!("{}:2: ", data.display());

    let e = sft(
        Some(&base),
        &[good, r#"{"prompt": "What is 2 + 3?", "response": "5""#],
    );
    assert!(e.contains(&at2) && e.contains("EOF while parsing"), "{e}");
    let e = sft(
        Some(&base),
        &[good, r#"{"prompt": "What is 2 + 3?", "response": ""}"#],
    );
    assert!(e.contains(&at2) && e.contains("`response` is empty"), "{e}");
    let e = sft(Some(&base), &[good, r#"{"prompt": "What is 2 + 3?"}"#]);
    assert!(
        e.contains(&at2) && e.contains("`prompt` needs a `response`"),
        "{e}"
    );
    let e = sft(
        Some(&base),
        &[
            good,
            r#"{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]}"#,
        ],
    );
    assert!(e.contains(&at2) && e.contains("no assistant turn"), "{e}");
    let passage: String = std::fs::read_to_string(&corpus)
        .unwrap()
        .chars()
        .take(400)
        .collect();
    let long = serde_json::json!({"prompt": format!("Continue the passage: {passage}"), "response": "And so on."}).to_string();
    let e = sft(Some(&base), &[good, &long]);
    assert!(
        e.contains(&at2) && e.contains("longer than the context (32 tokens)"),
        "{e}"
    );

    // the checkpoint to start from: missing, not given, not a checkpoint
    let e = sft(Some(Path::new("/nonexistent/ckpt")), &[good]);
    assert!(
        e.contains("/nonexistent/ckpt") && e.contains("no such checkpoint directory"),
        "{e}"
    );
    let e = sft(None, &[good]);
    assert!(e.contains("sft.yaml: init:") && e.contains("--init"), "{e}");
    let e = sft(Some(d), &[good]);
    assert!(
        e.contains("config.json: missing: place config.json into"),
        "{e}"
    );
    // a data file that is not there, a key that does not exist
    std::fs::write(&cfg, "data: {files: [/nonexistent/sft.jsonl]}\n").unwrap();
    let e = sft(Some(&base), &[good]);
    assert!(e.contains("/nonexistent/sft.jsonl: no such file"), "{e}");
    std::fs::write(&cfg, "data: {files: [x.jsonl], pack: true}\n").unwrap();
    let e = sft(Some(&base), &[good]);
    assert!(
        e.contains("sft.yaml: data") && e.contains("unknown field `pack`"),
        "{e}"
    );

    // eval: an SFT line it cannot read names its line; data of no known kind; a missing model
    let eval = |model: &Path, lines: &[&str]| {
        std::fs::write(&data, lines.join("\n") + "\n").unwrap();
        fails(
            candor()
                .args(["eval", "--json", "--device", "cpu", "--model"])
                .arg(model)
                .arg("--data")
                .arg(&data),
        )
    };
    let e = eval(
        &base,
        &[good, r#"{"prompt": "What is 2 + 3?", "response": " "}"#],
    );
    assert!(e.contains(&at2) && e.contains("`response` is empty"), "{e}");
    let e = eval(&base, &[r#"{"question": "?"}"#]);
    assert!(
        e.contains(&format!(
            "{}:1: cannot tell what data this is",
            data.display()
        )),
        "{e}"
    );
    let e = eval(
        &base,
        &[r#"{"prompt": "p", "chosen": "a", "rejected": "b"}"#],
    );
    assert!(e.contains("preference data measures a reward model"), "{e}");
    let e = eval(Path::new("/nonexistent/ckpt"), &[good]);
    assert!(e.contains("/nonexistent/ckpt"), "{e}");
}
