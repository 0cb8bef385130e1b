//! Users' own judges through the real binary: a program (`command:`) and a reward server
//! (`http://`), both the examples of examples/judges/, give the same scores as the built-in
//! `reference` judge they re-implement, in `rank` and in PPO; a judge killed mid-run stops
//! PPO with one clear error and a loadable last checkpoint.

mod common;

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use common::*;

const PROGRAM: &str = "command:python3 examples/judges/reference_judge.py";

/// examples/judges/reward_server.py on a free loopback port, stopped when dropped.
struct Server {
    child: Child,
    url: String,
}

impl Server {
    fn start() -> Server {
        let mut child = Command::new("python3")
            .args(["examples/judges/reward_server.py", "--port", "0"])
            .current_dir(repo_root())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start python3 examples/judges/reward_server.py");
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port: u16 = line.trim().parse().expect("the server prints its port");
        Server {
            child,
            url: format!("http://127.0.0.1:{port}/score"),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Candidates whose responses agree more or less with each prompt's reference.
fn candidates(dir: &Path) -> PathBuf {
    let path = dir.join("candidates.jsonl");
    std::fs::write(
        &path,
        [
            r#"{"prompt": "What is 15 + 24?", "responses": ["39", "It is 39.", "41", "39 or 40"], "reference": "39"}"#,
            r#"{"prompt": "Name a colour.", "responses": ["blue sky", "Blue!", "the sky is blue", "red"], "reference": "blue"}"#,
        ]
        .join("\n"),
    )
    .unwrap();
    path
}

/// The ranked lines of `rank --judge SPEC`, without the judge's name.
fn rank_with(dir: &Path, input: &Path, judges: &[&str], name: &str) -> Vec<serde_json::Value> {
    let out = dir.join(format!("{name}.jsonl"));
    let mut cmd = candor();
    cmd.args(["rank", "--in"]).arg(input).arg("--out").arg(&out);
    for j in judges {
        cmd.args(["--judge", j]);
    }
    ok(&mut cmd);
    std::fs::read_to_string(&out)
        .unwrap()
        .lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            v.as_object_mut().unwrap().remove("judge");
            v
        })
        .collect()
}

#[test]
fn program_and_server_judges_rank_as_the_builtin_they_wrap() {
    let tmp = tempfile::tempdir().unwrap();
    let input = candidates(tmp.path());
    let want = rank_with(tmp.path(), &input, &["reference"], "builtin");
    assert!(want[0]["scores"][0].as_f64().unwrap() == 1.0, "{want:?}");
    let server = Server::start();
    assert_eq!(rank_with(tmp.path(), &input, &[PROGRAM], "program"), want);
    assert_eq!(rank_with(tmp.path(), &input, &[&server.url], "http"), want);
    // a weighted sum: 2 × reference − 1 × the same through the server = reference
    let sum = rank_with(
        tmp.path(),
        &input,
        &["reference=2", &format!("{}=-1", server.url)],
        "sum",
    );
    for (s, w) in sum.iter().zip(&want) {
        assert_eq!(s["responses"], w["responses"]);
        assert_eq!(s["scores"], w["scores"]);
    }
}

#[test]
fn a_judge_that_answers_badly_is_one_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let input = candidates(tmp.path());
    // a slow start under load must not read as a timeout: only the sleeper gets a short one
    let rank = |judge: &str| {
        let timeout = if judge.contains("sleep") { "2" } else { "60" };
        fails(
            candor()
                .env("CANDOR_JUDGE_TIMEOUT", timeout)
                .args(["rank", "--in"])
                .arg(&input)
                .arg("--out")
                .arg(tmp.path().join("out.jsonl"))
                .args(["--judge", judge]),
        )
    };
    let py = |code: &str| format!("command:python3 -c '{code}'");
    let cases = [
        (
            py("import sys; print(\"nan\", flush=True)"),
            "cannot read `nan`",
        ),
        (
            py("import sys; [print(\"NaN\", flush=True) for l in sys.stdin]"),
            "score is not finite",
        ),
        (
            py("import sys; sys.stderr.write(\"boom\\n\"); sys.exit(3)"),
            "exited (exit status: 3)",
        ),
        (py("import time; time.sleep(30)"), "no answer within 2 s"),
        ("command:no-such-program-here".to_string(), "cannot start"),
        ("http://127.0.0.1:9/score".to_string(), "after 4 tries"),
    ];
    for (judge, want) in cases {
        let e = rank(&judge);
        assert!(
            e.contains(&format!("judge `{judge}`"))
                && e.contains(want)
                && (want == "cannot start" || e.contains("\"What is 15 + 24?\"")),
            "{judge}: {e}"
        );
    }
}

fn ppo(out: &Path, judge: &str, extra: &[&str]) -> Command {
    let prompts = repo_root().join("tests/fixtures/formats/prompts_standard.jsonl");
    let mut c = candor();
    c.args([
        "ppo",
        "--config",
        "configs/tiny/ppo.yaml",
        "--device",
        "cpu",
        "--policy",
    ])
    .arg(tiny_sft())
    .arg("--out")
    .arg(out);
    let judge = format!("score.judge={judge}");
    let prompts = format!("data.prompts={}", prompts.display());
    for s in [
        "score.reward_model_weight=0",
        "score.judge_weight=1",
        "data.heldout_prompts=null",
        "eval.judge=null",
        "train.eval_every=0",
        "critic.init=policy",
        "rollout.prompts_per_iteration=6",
        "train.batch_size=6",
        "ppo.epochs=1",
        "train.log_every=1",
        &judge,
        &prompts,
    ]
    .iter()
    .chain(extra)
    {
        c.args(["--set", s]);
    }
    c
}

/// What a PPO run's metrics say, less the clock.
fn run_metrics(out: &Path) -> Vec<serde_json::Value> {
    metrics(out)
        .into_iter()
        .map(|mut m| {
            let o = m.as_object_mut().unwrap();
            o.retain(|k, _| !k.starts_with("time") && !k.contains("per_s") && k != "elapsed");
            m
        })
        .collect()
}

#[test]
fn ppo_with_a_program_or_server_judge_scores_as_the_builtin() {
    let tmp = tempfile::tempdir().unwrap();
    let run = |name: &str, judge: &str| {
        let out = tmp.path().join(name);
        ok(&mut ppo(&out, judge, &["train.steps=2"]));
        run_metrics(&out)
    };
    let want = run("builtin", "reference");
    assert!(
        want.iter().any(|m| m.get("reward_mean").is_some()),
        "{want:?}"
    );
    assert_eq!(run("program", PROGRAM), want);
    let server = Server::start();
    assert_eq!(run("http", &server.url), want);
    // score.judges: the built-in and the program, half each, add up to the same reward,
    // and each is logged on its own, equal
    let out = tmp.path().join("both");
    let judges = format!(
        "score.judges=[{{name: reference, weight: 0.5}}, {{name: \"{PROGRAM}\", weight: 0.5, label: program}}]"
    );
    ok(&mut ppo(
        &out,
        "null",
        &["train.steps=2", "score.judge_weight=0", &judges],
    ));
    let mut both = run_metrics(&out);
    for m in &mut both {
        let o = m.as_object_mut().unwrap();
        let (a, b) = (o.remove("reward_reference"), o.remove("reward_program"));
        assert!(a.is_some() && a == b, "{a:?} {b:?}");
    }
    assert_eq!(both, want);
}

/// The judge program's pid: the `python3` child of `parent`.
fn child_pid(parent: u32) -> Option<u32> {
    let task = format!("/proc/{parent}/task");
    for t in std::fs::read_dir(task).ok()? {
        let children = std::fs::read_to_string(t.ok()?.path().join("children")).ok()?;
        if let Some(pid) = children.split_whitespace().next() {
            return pid.parse().ok();
        }
    }
    None
}

#[test]
fn killing_the_judge_program_stops_ppo_with_a_loadable_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("ppo");
    let run = ppo(&out, PROGRAM, &["train.steps=40", "train.save_every=1"])
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    // wait for the first checkpoint, then kill the judge (not candor)
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(300);
    while !out.join("candor.json").is_file() {
        assert!(std::time::Instant::now() < deadline, "no checkpoint");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let judge = child_pid(run.id()).expect("the judge program runs as candor's child");
    Command::new("kill")
        .args(["-9", &judge.to_string()])
        .status()
        .unwrap();
    let output = run.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "{stderr}");
    assert!(
        errors[0].contains(&format!("judge `{PROGRAM}`"))
            && errors[0].contains("exited (signal: 9")
            && errors[0].contains("last good checkpoint"),
        "{}",
        errors[0]
    );
    let meta = read_json(&out.join("candor.json"));
    assert_eq!(meta["complete"], false);
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
