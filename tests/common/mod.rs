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
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
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
    assert!(
        !out.status.success(),
        "expected failure, got success; stderr: {stderr}"
    );
    assert_eq!(
        out.status.code(),
        Some(1),
        "exit status {:?}; stderr: {stderr}",
        out.status
    );
    assert!(
        !stderr.contains("panicked") && !stderr.contains("internal error"),
        "panic: {stderr}"
    );
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(
        errors.len(),
        1,
        "want exactly one error line, got: {stderr}"
    );
    errors[0].to_string()
}

pub fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_str(
        &std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())),
    )
    .unwrap()
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

/// A 2-step checkpoint of [`small_pretrain_config`] (a 32-token context) in `dir/base`, to
/// start other runs from.
pub fn small_checkpoint(dir: &Path) -> PathBuf {
    let corpus = small_corpus(dir);
    let cfg = small_pretrain_config(dir, &corpus, 2);
    let out = dir.join("base");
    ok(candor()
        .args(["pretrain", "--device", "cpu", "--config"])
        .arg(&cfg)
        .arg("--out")
        .arg(&out));
    out
}

/// Wait until the run writing `out` has saved a checkpoint at step `min_step` or later,
/// kill it (SIGKILL) and return the checkpoint's step.
pub fn kill_after_checkpoint(child: &mut std::process::Child, out: &Path, min_step: u64) -> u64 {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(300);
    loop {
        if let Ok(text) = std::fs::read_to_string(out.join("candor.json")) {
            let meta: serde_json::Value = serde_json::from_str(&text).unwrap();
            if meta["step"].as_u64().unwrap() >= min_step {
                child.kill().unwrap();
                child.wait().unwrap();
                return meta["step"].as_u64().unwrap();
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no checkpoint appeared in {}",
            out.display()
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// A checkpoint made once per build of `candor` and shared by every test (and test binary)
/// that asks for it: `make(out)` runs under an exclusive file lock the first time; later
/// callers reuse the finished directory. The key includes the binary's size and mtime, so
/// a rebuilt candor never reuses a stale checkpoint.
pub fn cached_checkpoint(name: &str, make: impl FnOnce(&Path)) -> PathBuf {
    let bin = std::fs::metadata(env!("CARGO_BIN_EXE_candor")).unwrap();
    let stamp = format!(
        "{}-{}",
        bin.len(),
        bin.modified()
            .unwrap()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    );
    let root = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("candor-test-cache")
        .join(stamp);
    std::fs::create_dir_all(&root).unwrap();
    let lock = std::fs::File::create(root.join(format!("{name}.lock"))).unwrap();
    lock.lock().unwrap();
    let out = root.join(name);
    let done = out.join("candor.json").is_file()
        && read_json(&out.join("candor.json"))["complete"] == serde_json::Value::Bool(true);
    if !done {
        let _ = std::fs::remove_dir_all(&out);
        make(&out);
        assert!(
            out.join("candor.json").is_file(),
            "{name}: make() wrote no checkpoint"
        );
    }
    lock.unlock().unwrap();
    out
}

/// The tiny pretrained checkpoint (configs/tiny/pretrain.yaml), shared across tests.
pub fn tiny_pretrained() -> PathBuf {
    cached_checkpoint("tiny-pretrain", |out| {
        ok(candor()
            .args([
                "pretrain",
                "--config",
                "configs/tiny/pretrain.yaml",
                "--device",
                "cpu",
                "--out",
            ])
            .arg(out));
    })
}

/// The tiny SFT checkpoint (configs/tiny/sft.yaml from [`tiny_pretrained`]), shared across tests.
pub fn tiny_sft() -> PathBuf {
    let init = tiny_pretrained();
    cached_checkpoint("tiny-sft", |out| {
        ok(candor()
            .args([
                "sft",
                "--config",
                "configs/tiny/sft.yaml",
                "--device",
                "cpu",
                "--init",
            ])
            .arg(&init)
            .arg("--out")
            .arg(out));
    })
}
