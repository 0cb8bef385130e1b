//! `candor chat` driven through its stdin (a pipe, as a script would) on a small pretrained
//! checkpoint: the conversation carried from turn to turn, trimmed when the context fills,
//! `/reset`, `/system`, `/save` lines the SFT loader reads, seeded replies, clear errors.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};

use candor_data::chat::ChatTemplate;
use candor_data::sft::load_sft;
use candor_data::Tokenizer;
use common::*;

/// Context of the test model, in tokens.
const CTX: usize = 256;

/// A 60-step pretrained model with a 256-token context (a ChatML chat template, as every
/// candor tokenizer has), made once per build.
fn model() -> PathBuf {
    cached_checkpoint("chat-base-256", |out| {
        let dir = out.parent().unwrap().join("chat-base-256-src");
        std::fs::create_dir_all(&dir).unwrap();
        let corpus = small_corpus(&dir);
        let cfg = dir.join("pretrain.yaml");
        std::fs::write(
            &cfg,
            format!(
                "seed: 3\ndata: {{files: [{}], vocab_size: 300, heldout_fraction: 0.05}}\n\
                 model: {{hidden_size: 32, layers: 2, heads: 2, ctx: {CTX}}}\n\
                 train: {{steps: 60, batch_size: 8, lr: 1.0e-2, warmup_steps: 5, eval_every: 0, eval_batches: 1, log_every: 10}}\n",
                corpus.display()
            ),
        )
        .unwrap();
        ok(candor()
            .args(["pretrain", "--device", "cpu", "--config"])
            .arg(&cfg)
            .arg("--out")
            .arg(out));
    })
}

/// Run `candor chat --model MODEL ARGS` with `input` on its stdin.
fn chat(model: &Path, args: &[&str], input: &str) -> Output {
    let mut child = candor()
        .args(["chat", "--device", "cpu", "--model"])
        .arg(model)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // a chat that fails before reading its stdin closes the pipe: not an error here
    let _ = child.stdin.take().unwrap().write_all(input.as_bytes());
    child.wait_with_output().unwrap()
}

fn succeeded(out: &Output) -> (String, String) {
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    );
    assert!(out.status.success(), "chat failed: {stderr}");
    assert!(!stderr.contains("error:"), "{stderr}");
    (stdout, stderr)
}

/// Like [`fails`] for a chat fed `input`: exit 1, one `error:` line, no panic.
fn chat_fails(model: &Path, args: &[&str], input: &str) -> String {
    let out = chat(model, args, input);
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        !stderr.contains("panicked") && !stderr.contains("internal error"),
        "{stderr}"
    );
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "{stderr}");
    errors[0].to_string()
}

/// The prompts `--verbose` printed: (token count, text as posed to the model).
fn prompts(stderr: &str) -> Vec<(usize, String)> {
    let mut out = vec![];
    let mut rest = stderr;
    while let Some(i) = rest.find("chat: prompt of ") {
        rest = &rest[i + "chat: prompt of ".len()..];
        let n: usize = rest[..rest.find(' ').unwrap()].parse().unwrap();
        let body = &rest[rest.find("):\n").unwrap() + 3..];
        let end = body.find("\nchat: ").unwrap();
        out.push((n, body[..end].to_string()));
        rest = &body[end..];
    }
    out
}

fn saved(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn assistant_replies(line: &serde_json::Value) -> Vec<String> {
    line["messages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["role"] == "assistant")
        .map(|m| m["content"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn chat_carries_the_conversation_resets_and_saves_sft_lines() {
    let model = model();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("chats.jsonl");
    let input = format!(
        "/system You are terse.\nCall me Ishmael.\nSome years ago.\n/save {f}\n/reset\n\
         Never mind how long.\n/save {f}\n/system\nHow long?\n/quit\nNot read: the chat has ended.\n",
        f = file.display()
    );
    let args = [
        "--seed",
        "1",
        "--max-new-tokens",
        "8",
        "--temperature",
        "1",
        "--verbose",
    ];
    let (stdout, stderr) = succeeded(&chat(&model, &args, &input));
    let p = prompts(&stderr);
    assert_eq!(p.len(), 4, "four turns, none after /quit: {stderr}");
    // turn 2 is posed with turn 1's exchange before it; after /reset only the system message
    assert!(p[0].1.contains("You are terse.") && p[0].1.contains("Call me Ishmael."));
    assert!(p[1].0 > p[0].0 + 8, "{p:?}");
    assert!(p[1]
        .1
        .starts_with(&p[0].1[..p[0].1.find("Call me").unwrap()]));
    assert!(p[1].1.contains("Call me Ishmael.") && p[1].1.contains("Some years ago."));
    assert!(p[2].1.contains("You are terse.") && p[2].1.contains("Never mind how long."));
    assert!(!p[2].1.contains("Ishmael") && p[2].0 < p[1].0, "{p:?}");
    assert!(stderr.contains("chat: new conversation (the system message is kept)"));
    // `/system` alone removes the system message and keeps the turns
    assert!(
        p[3].1.starts_with("<|im_start|>user\nNever mind how long."),
        "{p:?}"
    );
    assert!(!p[3].1.contains("You are terse.") && p[3].1.contains("How long?"));

    // two SFT lines, the whole conversations, each reply as streamed to stdout
    let lines = saved(&file);
    assert_eq!(lines.len(), 2);
    let roles = |l: &serde_json::Value| -> Vec<String> {
        l["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["role"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(
        roles(&lines[0]),
        ["system", "user", "assistant", "user", "assistant"]
    );
    assert_eq!(roles(&lines[1]), ["system", "user", "assistant"]);
    assert_eq!(lines[0]["messages"][0]["content"], "You are terse.");
    assert_eq!(lines[0]["messages"][3]["content"], "Some years ago.");
    assert_eq!(lines[1]["messages"][1]["content"], "Never mind how long.");
    let replies: Vec<String> = lines.iter().flat_map(assistant_replies).collect();
    assert_eq!(replies.len(), 3);
    let mut at = 0;
    for r in &replies {
        assert!(!r.is_empty());
        let found = stdout[at..]
            .find(r.as_str())
            .unwrap_or_else(|| panic!("{r:?} not in {stdout:?}"));
        at += found + r.len();
    }
    // turn 1's reply is in turn 2's prompt, as the template renders it
    assert!(p[1].1.contains(&replies[0]), "{p:?} {replies:?}");

    // the SFT loader reads the file, with the model's own tokenizer and template
    let tok = Tokenizer::from_dir(&model).unwrap();
    let set = load_sft(
        &[file],
        &tok,
        &ChatTemplate::for_tokenizer(&tok),
        4096,
        false,
    )
    .unwrap();
    assert_eq!(set.examples.len(), 2);
    assert!(set
        .examples
        .iter()
        .all(|(ex, _, _)| ex.trained.iter().any(|&t| t)));
}

#[test]
fn chat_trims_the_oldest_turns_when_the_context_fills() {
    let model = model();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("long.jsonl");
    let questions: Vec<String> = (1..=8)
        .map(|i| format!("Question number {i}, call me Ishmael?"))
        .collect();
    let input = format!("{}\n/save {}\n", questions.join("\n"), file.display());
    let max_new = 16;
    let args = [
        "--seed",
        "2",
        "--max-new-tokens",
        "16",
        "--system",
        "Be a whale.",
        "--verbose",
    ];
    let (_, stderr) = succeeded(&chat(&model, &args, &input));
    let p = prompts(&stderr);
    assert_eq!(p.len(), 8);
    assert!(p.iter().all(|(n, _)| n + max_new <= CTX), "{p:?}");
    assert!(stderr.contains("chat: the conversation outgrew the model's context (256 tokens, 16 kept for the reply)"), "{stderr}");
    assert!(stderr.contains("the system message is kept"));
    let last = &p[7].1;
    assert!(last.contains("Be a whale.") && last.contains(&questions[7]));
    assert!(!last.contains(&questions[0]), "{last}");
    // the shown part starts at a user turn, right after the system message
    let after_system = &last[last.find("Be a whale.").unwrap()..];
    assert!(
        after_system.contains("<|im_end|>\n<|im_start|>user\n"),
        "{after_system}"
    );
    // /save keeps the whole conversation, turns out of the model's view included
    let lines = saved(&file);
    let users: Vec<&str> = lines[0]["messages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["role"] == "user")
        .map(|m| m["content"].as_str().unwrap())
        .collect();
    assert_eq!(users, questions);
}

#[test]
fn chat_replies_follow_the_seed() {
    let model = model();
    let input = "Call me Ishmael.\nSome years ago.\n";
    let run = |seed: &str| {
        succeeded(&chat(
            &model,
            &[
                "--seed",
                seed,
                "--max-new-tokens",
                "12",
                "--temperature",
                "1",
            ],
            input,
        ))
        .0
    };
    let a = run("5");
    assert!(a.len() > 4, "{a:?}");
    assert_eq!(a, run("5"));
    assert_ne!(a, run("6"));
    // greedy replies do not depend on the seed
    let greedy = |seed: &str| {
        succeeded(&chat(
            &model,
            &[
                "--seed",
                seed,
                "--max-new-tokens",
                "6",
                "--temperature",
                "0",
            ],
            input,
        ))
        .0
    };
    assert_eq!(greedy("1"), greedy("2"));
}

#[test]
fn bad_flags_and_lines_give_one_clear_error() {
    let model = model();
    let e = chat_fails(&model, &["--temperature", "-1"], "Hi\n");
    assert!(
        e.contains("--temperature -1: expected a finite number >= 0"),
        "{e}"
    );
    let e = chat_fails(&model, &["--top-p", "1.5"], "Hi\n");
    assert!(
        e.contains("--top-p 1.5: expected a probability in (0, 1]"),
        "{e}"
    );
    let e = chat_fails(&model, &["--max-new-tokens", "0"], "Hi\n");
    assert!(e.contains("--max-new-tokens 0: expected at least 1"), "{e}");
    let e = chat_fails(&model, &["--max-new-tokens", "256"], "Hi\n");
    assert!(
        e.contains("--max-new-tokens 256: expected fewer than the model's context of 256 tokens"),
        "{e}"
    );
    let e = fails(
        candor()
            .args(["chat", "--model", "/nowhere/model"])
            .stdin(Stdio::null()),
    );
    assert!(
        e.contains("/nowhere/model") && e.contains("no such checkpoint directory"),
        "{e}"
    );
    // lines: the first bad one ends a piped chat, naming its line
    let e = chat_fails(
        &model,
        &["--max-new-tokens", "4"],
        "Hi\n/frobnicate\nHi again\n",
    );
    assert!(
        e.contains("stdin line 2: unknown command /frobnicate"),
        "{e}"
    );
    // the default reply length fits the context: half of it here
    let (_, stderr) = succeeded(&chat(&model, &["--verbose"], "Hi\n"));
    assert!(
        stderr.contains("(context 256, 128 kept for the reply)"),
        "{stderr}"
    );
    let e = chat_fails(&model, &[], "/save\n");
    assert!(e.contains("stdin line 1: /save needs a FILE"), "{e}");
    let dir = tempfile::tempdir().unwrap();
    let e = chat_fails(
        &model,
        &[],
        &format!("/save {}/x.jsonl\n", dir.path().display()),
    );
    assert!(e.contains("nothing to save yet"), "{e}");
    assert!(!dir.path().join("x.jsonl").exists());
    let blocker = dir.path().join("file");
    std::fs::write(&blocker, "").unwrap();
    let e = chat_fails(
        &model,
        &["--max-new-tokens", "4"],
        &format!("Hi\n/save {}/x.jsonl\n", blocker.display()),
    );
    assert!(
        e.contains(&format!("/save {}/x.jsonl", blocker.display())),
        "{e}"
    );
    let long = "Call me Ishmael. ".repeat(60);
    let e = chat_fails(&model, &["--max-new-tokens", "8"], &format!("{long}\n"));
    assert!(
        e.contains("the message is too long") && e.contains("context of 256 tokens"),
        "{e}"
    );

    // a model whose tokenizer has no chat template: refused, unless one is given
    let bare = dir.path().join("bare");
    std::fs::create_dir(&bare).unwrap();
    for f in std::fs::read_dir(&model).unwrap() {
        let f = f.unwrap().path();
        if f.is_file() {
            std::fs::copy(&f, bare.join(f.file_name().unwrap())).unwrap();
        }
    }
    let cfg_path = bare.join("tokenizer_config.json");
    let mut cfg = read_json(&cfg_path);
    cfg.as_object_mut().unwrap().remove("chat_template");
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let e = chat_fails(&bare, &[], "Hi\n");
    assert!(
        e.contains("no chat template") && e.contains("--chat-template FILE"),
        "{e}"
    );
    let template = dir.path().join("plain.jinja");
    std::fs::write(
        &template,
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}",
    )
    .unwrap();
    let arg = template.to_str().unwrap();
    let (_, stderr) = succeeded(&chat(
        &bare,
        &["--chat-template", arg, "--max-new-tokens", "4", "--verbose"],
        "Hi\n",
    ));
    assert!(stderr.contains("user: Hi\nassistant:"), "{stderr}");
    let strict = dir.path().join("strict.jinja");
    std::fs::write(
        &strict,
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}{{ m['content'] }}\n{% endfor %}",
    )
    .unwrap();
    let strict = strict.to_str().unwrap();
    let e = chat_fails(
        &bare,
        &["--chat-template", strict, "--system", "Be kind."],
        "Hi\n",
    );
    assert!(
        e.contains("--system: the chat template refuses a system message")
            && e.contains("System role not supported"),
        "{e}"
    );
    let e = chat_fails(
        &bare,
        &["--chat-template", strict, "--max-new-tokens", "4"],
        "Hi\n/system Be kind.\n",
    );
    assert!(
        e.contains("stdin line 2: /system: the chat template refuses"),
        "{e}"
    );
    std::fs::write(&template, "{% for %}").unwrap();
    let e = chat_fails(&bare, &["--chat-template", arg], "Hi\n");
    assert!(
        e.contains("--chat-template") && e.contains("does not parse"),
        "{e}"
    );
}
