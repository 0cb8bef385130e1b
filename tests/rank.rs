//! `candor rank` driven as a person would: answers typed line by line on stdin (a pipe),
//! bad orders re-asked, ties, skip, quit midway, restart, and a crash mid-write. And the
//! rule judges, and the clear errors of bad candidate files.

mod common;

use std::io::Write;
use std::path::Path;
use std::process::Stdio;

use common::*;

/// Run `candor rank --in IN --out OUT` with `typed` on stdin; returns (stdout, stderr).
fn rank_typing(input: &Path, out: &Path, typed: &str) -> (String, String) {
    let mut child = candor()
        .args(["rank", "--in"])
        .arg(input)
        .arg("--out")
        .arg(out)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(typed.as_bytes())
        .unwrap();
    let o = child.wait_with_output().unwrap();
    let (stdout, stderr) = (
        String::from_utf8(o.stdout).unwrap(),
        String::from_utf8(o.stderr).unwrap(),
    );
    assert!(o.status.success(), "rank failed: {stdout}\n{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    (stdout, stderr)
}

fn lines(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn write_candidates(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("candidates.jsonl");
    let rows = [
        serde_json::json!({"prompt": "p1", "responses": ["a1", "a2", "a3", "a4"]}),
        serde_json::json!({"prompt": "p2", "responses": ["b1", "b2", "b3"]}),
        serde_json::json!({"prompt": "p3", "responses": ["c1", "c2", "c3"], "reference": "c2"}),
        serde_json::json!({"prompt": "p4", "responses": ["d1", "d2"]}),
        serde_json::json!({"prompt": "p5", "responses": ["e1", "e2\nsecond line", "e3"]}),
    ];
    std::fs::write(
        &path,
        rows.iter()
            .map(|r| r.to_string() + "\n")
            .collect::<String>(),
    )
    .unwrap();
    path
}

#[test]
fn a_person_ranks_quits_midway_and_resumes_without_losing_or_repeating_an_answer() {
    let tmp = tempfile::tempdir().unwrap();
    let input = write_candidates(tmp.path());
    let out = tmp.path().join("ranked.jsonl");

    // session 1: an order missing a response (re-asked), then a tie; skip p2; two bad orders
    // for p3 (a repeat, a number out of range) then a good one; quit at p4
    let (stdout, _) = rank_typing(&input, &out, "3 1 2\n3 1=2 4\ns\n2 2 1\n9 1 2\n2 3 1\nq\n");
    assert!(
        stdout.contains("[1/5] p1") && stdout.contains("  4) a4"),
        "{stdout}"
    );
    assert!(
        stdout.contains("response 4 is missing: rank all 4 responses"),
        "{stdout}"
    );
    assert!(stdout.contains("response 2 is listed twice"), "{stdout}");
    assert!(
        stdout.contains("there is no response 9: the responses are numbered 1 to 3"),
        "{stdout}"
    );
    assert_eq!(stdout.matches("Try again.").count(), 3, "{stdout}");
    assert!(
        stdout.contains("[4/5] p4") && !stdout.contains("[5/5]"),
        "quit at p4: {stdout}"
    );
    assert!(
        stdout.contains("2 answered now, 1 skipped; 2 of 5 prompts ranked"),
        "{stdout}"
    );
    let got = lines(&out);
    assert_eq!(got.len(), 2, "every answer is on disk at once");
    assert_eq!(
        got[0],
        serde_json::json!({"prompt": "p1", "responses": ["a3", "a1", "a2", "a4"], "ranks": [1, 2, 2, 3]})
    );
    assert_eq!(
        got[1],
        serde_json::json!({"prompt": "p3", "responses": ["c2", "c3", "c1"], "ranks": [1, 2, 3], "reference": "c2"})
    );

    // session 2: resumes with the skipped p2, then p4 and p5; answered prompts are not asked
    let (stdout, _) = rank_typing(&input, &out, "1 3 2\n2 1\n3 1 2\n");
    assert!(
        stdout.contains("Ranking 3 prompts (2 of 5 already in"),
        "{stdout}"
    );
    assert!(
        !stdout.contains("] p1") && !stdout.contains("] p3"),
        "{stdout}"
    );
    assert!(
        stdout.contains("[3/5] p2") && stdout.contains("[5/5] p5"),
        "{stdout}"
    );
    assert!(
        stdout.contains("  2) e2\n     second line"),
        "multi-line responses stay readable: {stdout}"
    );
    let got = lines(&out);
    let prompts: Vec<&str> = got.iter().map(|l| l["prompt"].as_str().unwrap()).collect();
    assert_eq!(
        prompts,
        vec!["p1", "p3", "p2", "p4", "p5"],
        "no answer lost, none twice"
    );
    assert_eq!(got[3]["responses"], serde_json::json!(["d2", "d1"]));
    assert_eq!(
        got[4]["responses"],
        serde_json::json!(["e3", "e1", "e2\nsecond line"])
    );

    // session 3: nothing left to ask
    let (stdout, _) = rank_typing(&input, &out, "");
    assert!(stdout.contains("all 5 prompts"), "{stdout}");
    assert_eq!(lines(&out).len(), 5);

    // a crash mid-write leaves half a line: it is removed on restart and that prompt asked again
    let text = std::fs::read_to_string(&out).unwrap();
    let cut = text.trim_end().rfind('\n').unwrap() + 1 + 20;
    std::fs::write(&out, &text[..cut]).unwrap();
    let (stdout, stderr) = rank_typing(&input, &out, "3 1 2\n");
    assert!(
        stderr.contains("removed an incomplete last line"),
        "{stderr}"
    );
    assert!(stdout.contains("[5/5] p5"), "{stdout}");
    assert_eq!(std::fs::read_to_string(&out).unwrap(), text);
}

#[test]
fn end_of_input_quits_like_q_and_keeps_what_was_answered() {
    let tmp = tempfile::tempdir().unwrap();
    let input = write_candidates(tmp.path());
    let out = tmp.path().join("ranked.jsonl");
    let (stdout, _) = rank_typing(&input, &out, "1 2 3 4\n1 2"); // the last line lacks its newline
    assert!(stdout.contains("response 3 is missing"), "{stdout}");
    assert_eq!(lines(&out).len(), 1);
}

#[test]
fn judges_rank_automatically_with_ties_and_scores() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("c.jsonl");
    std::fs::write(
        &input,
        [
            r#"{"prompt": "Describe a day.", "responses": ["The sea.", "A terrible, awful day.", "What a wonderful day!", "A ship."]}"#,
            r#"{"prompt": "What is 2 + 2?", "responses": ["five", "4", "it is 4"], "reference": "4"}"#,
        ]
        .join("\n"),
    )
    .unwrap();
    let out = tmp.path().join("r.jsonl");
    let stdout = ok(candor()
        .args(["rank", "--judge", "sentiment", "--in"])
        .arg(&input)
        .arg("--out")
        .arg(&out));
    assert!(
        stdout.contains("2 prompts ranked by judge `sentiment`"),
        "{stdout}"
    );
    let got = lines(&out);
    assert_eq!(
        got[0]["responses"],
        serde_json::json!([
            "What a wonderful day!",
            "The sea.",
            "A ship.",
            "A terrible, awful day."
        ])
    );
    assert_eq!(
        got[0]["ranks"],
        serde_json::json!([1, 2, 2, 3]),
        "the two neutral responses tie"
    );
    assert_eq!(got[0]["judge"], "sentiment");
    assert_eq!(got[0]["scores"][1], 0.0);
    // a second run finds everything ranked
    let stdout = ok(candor()
        .args(["rank", "--judge", "sentiment", "--in"])
        .arg(&input)
        .arg("--out")
        .arg(&out));
    assert!(stdout.contains("all 2 prompts"), "{stdout}");

    // `reference` needs the field on every line
    let out2 = tmp.path().join("r2.jsonl");
    let e = fails(
        candor()
            .args(["rank", "--judge", "reference", "--in"])
            .arg(&input)
            .arg("--out")
            .arg(&out2),
    );
    assert!(
        e.contains("c.jsonl:1: judge `reference` needs a `reference` field"),
        "{e}"
    );
    let input2 = tmp.path().join("c2.jsonl");
    std::fs::write(
        &input2,
        r#"{"prompt": "What is 2 + 2?", "responses": ["five", "4", "it is 4"], "reference": "4"}"#,
    )
    .unwrap();
    ok(candor()
        .args(["rank", "--judge", "reference", "--in"])
        .arg(&input2)
        .arg("--out")
        .arg(&out2));
    let got = lines(&out2);
    assert_eq!(
        got[0]["responses"],
        serde_json::json!(["4", "it is 4", "five"])
    );
    assert_eq!(got[0]["scores"], serde_json::json!([1.0, 0.45, 0.0])); // P 1/3, R 1: F1 1/2, × 0.9
}

#[test]
fn bad_input_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let input = write_candidates(tmp.path());
    let out = tmp.path().join("r.jsonl");
    let e = fails(
        candor()
            .args(["rank", "--judge", "vibes", "--in"])
            .arg(&input)
            .arg("--out")
            .arg(&out),
    );
    assert_eq!(
        e,
        "error: unknown judge `vibes`; known judges: sentiment, reference, math, regex, length, command, http, https"
    );

    let bad = tmp.path().join("bad.jsonl");
    for (line, want) in [
        (
            r#"{"prompt": "p", "responses": ["only"]}"#,
            "bad.jsonl:2: `responses` has 1 response(s); a ranking needs at least 2",
        ),
        (
            r#"{"prompt": "p", "responses": ["x", "y", "x"]}"#,
            "bad.jsonl:2: responses 1 and 3 are the same text",
        ),
        (
            r#"{"prompt": "p", "responses": "x"}"#,
            "bad.jsonl:2: invalid type",
        ),
        (
            r#"{"prompt": "p", "responses": ["x", "y"]"#,
            "bad.jsonl:2: EOF while parsing",
        ),
    ] {
        std::fs::write(
            &bad,
            format!("{{\"prompt\": \"ok\", \"responses\": [\"a\", \"b\"]}}\n{line}\n"),
        )
        .unwrap();
        let e = fails(
            candor()
                .args(["rank", "--in"])
                .arg(&bad)
                .arg("--out")
                .arg(&out),
        );
        assert!(e.contains(want), "{line}: {e}");
    }
    assert!(!out.exists(), "nothing written for a bad input");

    // a ranked output that is not a ranking (`ranks` out of order) is refused on restart
    std::fs::write(
        &out,
        r#"{"prompt": "p1", "responses": ["a1", "a2"], "rankz": [1, 2]}"#.to_string() + "\n",
    )
    .unwrap();
    let e = fails(
        candor()
            .args(["rank", "--in"])
            .arg(&input)
            .arg("--out")
            .arg(&out),
    );
    assert!(
        e.contains("r.jsonl:1: not a ranked line: unknown field `rankz`"),
        "{e}"
    );
    let e = fails(
        candor()
            .args(["rank", "--in"])
            .arg(&input)
            .arg("--out")
            .arg(&input),
    );
    assert!(e.contains("must differ from --in"), "{e}");
}
