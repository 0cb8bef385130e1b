//! Helpers for the end-to-end tests: run the real `candor` binary, read checkpoints.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn candor() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_candor"));
    c.current_dir(repo_root());
    c
}

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().unwrap()
}

/// Run and require success; returns stdout.
pub fn ok(cmd: &mut Command) -> String {
    let out = cmd.output().expect("run candor");
    assert!(
        out.status.success(),
        "candor failed ({:?}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Run and require a clean failure: non-zero exit, no panic, one `error:` line. Returns it.
pub fn fails(cmd: &mut Command) -> String {
    let out: Output = cmd.output().expect("run candor");
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "expected failure, got success; stderr: {stderr}");
    assert_eq!(out.status.code(), Some(1), "exit status {:?}; stderr: {stderr}", out.status);
    assert!(!stderr.contains("panicked") && !stderr.contains("internal error"), "panic: {stderr}");
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "want exactly one error line, got: {stderr}");
    errors[0].to_string()
}

pub fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))).unwrap()
}

pub fn metrics(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// A small corpus (a few fortunes and a chapter of Moby Dick) for fast tests.
pub fn small_corpus(dir: &Path) -> PathBuf {
    let text = std::fs::read_to_string(repo_root().join("data/corpus/moby-dick.txt")).unwrap();
    let path = dir.join("corpus.txt");
    std::fs::write(&path, &text[..60_000]).unwrap();
    path
}

/// Write a pretrain config for a very small, fast model over `corpus`.
pub fn small_pretrain_config(dir: &Path, corpus: &Path, steps: usize) -> PathBuf {
    let path = dir.join("pretrain.yaml");
    std::fs::write(
        &path,
        format!(
            "seed: 3\ndata: {{files: [{}], vocab_size: 300, heldout_fraction: 0.05}}\n\
             model: {{hidden_size: 32, layers: 2, heads: 2, ctx: 32}}\n\
             train: {{steps: {steps}, batch_size: 8, lr: 3.0e-3, warmup_steps: 2, eval_every: 0, eval_batches: 2, log_every: 5}}\n",
            corpus.display()
        ),
    )
    .unwrap();
    path
}
