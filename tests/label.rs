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
    let mut child = candor()
        .args(["label", "serve", "--bind", "127.0.0.1:0", "--in"])
        .arg(input)
        .arg("--out")
        .arg(out)
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
