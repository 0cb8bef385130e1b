//! `candor label` as a process: `kill -9` of the server between two submissions loses
//! nothing; `label stats` on the result; unsafe or bad options fail with one clear line.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Stdio};

use common::*;
use serde_json::{json, Value};

/// Start `candor label serve` on a free port; returns the process and the page's URL.
fn serve(input: &Path, out: &Path) -> (Child, String) {
    serve_with(input, out, &[])
}

fn serve_with(input: &Path, out: &Path, more: &[&str]) -> (Child, String) {
    let mut child = candor()
        .args(["label", "serve", "--bind", "127.0.0.1:0", "--in"])
        .arg(input)
        .arg("--out")
        .arg(out)
        .args(more)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    // keep reading the server's output (a closed pipe would end it) and hand on line one
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let _ = tx.send(line.unwrap_or_default());
        }
    });
    let first = rx.recv().unwrap_or_default();
    let url = first
        .trim()
        .strip_prefix("label: serving ")
        .unwrap_or_else(|| panic!("unexpected first line: {first}"))
        .to_string();
    (child, url)
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into()
}

fn next(url: &str) -> Value {
    agent()
        .get(format!("{url}api/next"))
        .call()
        .unwrap()
        .body_mut()
        .read_json()
        .unwrap()
}

fn answer(url: &str, a: &Value) -> u16 {
    agent()
        .post(format!("{url}api/answer"))
        .header("Content-Type", "application/json")
        .send(a.to_string())
        .unwrap()
        .status()
        .as_u16()
}

#[test]
fn kill_9_between_two_submissions_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("cand.jsonl");
    std::fs::write(
        &input,
        "{\"prompt\": \"p0\", \"responses\": [\"a\", \"b\"]}\n{\"prompt\": \"p1\", \"responses\": [\"c\", \"d\", \"e\"]}\n",
    )
    .unwrap();
    let out = dir.path().join("ranked.jsonl");

    let (mut server, url) = serve(&input, &out);
    assert_eq!(next(&url)["item"]["id"], 0);
    assert_eq!(
        answer(&url, &json!({"id": 0, "order": [[1], [0]], "seconds": 2})),
        200
    );
    server.kill().unwrap(); // SIGKILL: no shutdown code runs
    server.wait().unwrap();

    let (mut server, url) = serve(&input, &out);
    let v = next(&url);
    assert_eq!(
        (v["item"]["id"].clone(), v["progress"]["mine"].clone()),
        (json!(1), json!(1))
    );
    assert_eq!(
        answer(
            &url,
            &json!({"id": 1, "order": [[2, 0], [1]], "seconds": 5})
        ),
        200
    );
    server.kill().unwrap();
    server.wait().unwrap();

    let lines: Vec<Value> = std::fs::read_to_string(&out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        lines,
        vec![
            json!({"prompt": "p0", "responses": ["b", "a"], "ranks": [1, 2], "labeller": "local", "seconds": 2.0, "flags": [[], []], "comment": ""}),
            json!({"prompt": "p1", "responses": ["e", "c", "d"], "ranks": [1, 1, 2], "labeller": "local", "seconds": 5.0, "flags": [[], [], []], "comment": ""}),
        ]
    );

    let report = ok(candor().args(["label", "stats"]).arg(&out));
    assert!(
        report.starts_with("2 rankings of 2 prompts by 1 labellers"),
        "{report}"
    );
    assert!(
        report.contains("no prompt was ranked by two labellers"),
        "{report}"
    );
}

#[test]
fn label_refuses_unsafe_or_bad_options_in_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("cand.jsonl");
    std::fs::write(
        &input,
        "{\"prompt\": \"p0\", \"responses\": [\"a\", \"b\"]}\n",
    )
    .unwrap();
    let out = dir.path().join("ranked.jsonl");
    let e = fails(
        candor()
            .args(["label", "serve", "--bind", "0.0.0.0:0", "--in"])
            .arg(&input)
            .arg("--out")
            .arg(&out),
    );
    assert!(
        e.contains("--bind 0.0.0.0:0") && e.contains("--labellers"),
        "{e}"
    );
    std::fs::write(
        &out,
        "{\"prompt\": \"p0\", \"responses\": [\"a\", \"b\"]}\nnot json\n",
    )
    .unwrap();
    let e = fails(
        candor()
            .args(["label", "serve", "--bind", "127.0.0.1:0", "--in"])
            .arg(&input)
            .arg("--out")
            .arg(&out),
    );
    assert!(e.contains("ranked.jsonl:2: not a ranking"), "{e}");
    let e = fails(candor().args(["label", "stats"]).arg(&out));
    assert!(e.contains("ranked.jsonl:2:"), "{e}");
}

/// A labeller's answer through the API, with their token.
fn answer_as(url: &str, token: &str, order: Value) -> u16 {
    let next: Value = agent()
        .get(format!("{url}api/next"))
        .header("Authorization", format!("Bearer {token}"))
        .call()
        .unwrap()
        .body_mut()
        .read_json()
        .unwrap();
    let id = next["item"]["id"].clone();
    agent()
        .post(format!("{url}api/answer"))
        .header("Content-Type", "application/json")
        .header("Authorization", format!("Bearer {token}"))
        .send(json!({"id": id, "order": order, "seconds": 1}).to_string())
        .unwrap()
        .status()
        .as_u16()
}

/// A recipe whose `rank` stage has `labellers:` stops there (exit 75) and says how to serve
/// the page and how many rankings are missing; it stops again while some are, and goes on
/// to the reward model once the team is done, with every ranking kept.
#[test]
fn a_recipe_waits_at_a_team_rank_stage_and_goes_on_when_it_is_done() {
    let sft = tiny_sft();
    let dir = tempfile::tempdir().unwrap();
    let prompts = dir.path().join("prompts.jsonl");
    std::fs::write(
        &prompts,
        "{\"prompt\": \"The film was\"}\n{\"prompt\": \"My day\"}\n",
    )
    .unwrap();
    let team = dir.path().join("team.yaml");
    std::fs::write(
        &team,
        "- {name: ana, token: ana-0123456789abcdef}\n- {name: ben, token: ben-0123456789abcdef}\n",
    )
    .unwrap();
    let out = dir.path().join("run");
    let recipe = dir.path().join("team.yaml.recipe");
    std::fs::write(
        &recipe,
        format!(
            "out: {}\nseed: 1\ndevice: cpu\nstages:\n  \
             - {{name: base, kind: model, path: {}}}\n  \
             - {{name: samples, kind: sample, model: base, prompts: {}, k: 3, max_new_tokens: 8}}\n  \
             - {{name: rankings, kind: rank, input: samples, labellers: {}, overlap: 2}}\n  \
             - {{name: reward, kind: reward, config: configs/tiny/reward.yaml, init: base, data: rankings, set: [train.steps=2, train.eval_every=0, data.heldout=null, data.heldout_fraction=0.0]}}\n",
            out.display(),
            sft.display(),
            prompts.display(),
            team.display()
        ),
    )
    .unwrap();
    let run = || candor().arg("run").arg(&recipe).output().unwrap();

    let first = run();
    let stdout = String::from_utf8_lossy(&first.stdout);
    assert_eq!(first.status.code(), Some(75), "{stdout}");
    assert!(
        stdout.contains("rankings") && stdout.contains("4 of 4 rankings still needed"),
        "{stdout}"
    );
    assert!(stdout.contains("candor label serve --in"), "{stdout}");
    assert!(
        stdout.contains("http://127.0.0.1:8080/#token=THEIR_TOKEN"),
        "{stdout}"
    );
    assert!(!out.join("reward").exists(), "the reward stage ran early");
    let plan = ok(candor().arg("run").arg(&recipe).arg("--dry-run"));
    assert!(plan.contains("wait  rankings"), "{plan}");

    // the team ranks through the server the message names (on a free port here)
    let input = out.join("samples").join("samples.jsonl");
    let ranked = out.join("rankings").join("ranked.jsonl");
    let team_args = ["--labellers", team.to_str().unwrap(), "--overlap", "2"];
    let (mut server, url) = serve_with(&input, &ranked, &team_args);
    assert_eq!(
        answer_as(&url, "ana-0123456789abcdef", json!([[0], [2], [1]])),
        200
    );
    assert_eq!(
        answer_as(&url, "ben-0123456789abcdef", json!([[2], [0], [1]])),
        200
    );
    server.kill().unwrap();
    server.wait().unwrap();
    let second = run();
    let stdout = String::from_utf8_lossy(&second.stdout);
    assert_eq!(second.status.code(), Some(75), "{stdout}");
    assert!(stdout.contains("2 of 4 rankings still needed"), "{stdout}");

    let (mut server, url) = serve_with(&input, &ranked, &team_args);
    assert_eq!(
        answer_as(&url, "ana-0123456789abcdef", json!([[0], [1, 2]])),
        200
    );
    assert_eq!(
        answer_as(&url, "ben-0123456789abcdef", json!([[0], [2], [1]])),
        200
    );
    server.kill().unwrap();
    server.wait().unwrap();
    let before = std::fs::read(&ranked).unwrap();
    let done = ok(candor().arg("run").arg(&recipe));
    assert!(done.contains("run   rankings"), "{done}");
    assert!(done.contains("run   reward"), "{done}");
    assert!(out.join("reward").join("model.safetensors").is_file());
    assert_eq!(
        std::fs::read(&ranked).unwrap(),
        before,
        "the rankings changed"
    );
    assert_eq!(String::from_utf8(before).unwrap().lines().count(), 4);
    let again = ok(candor().arg("run").arg(&recipe));
    assert!(
        again.contains("skip  rankings") && again.contains("skip  reward"),
        "{again}"
    );
}
