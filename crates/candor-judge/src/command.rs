//! A judge that is a program: `command:PROGRAM [ARGS…]`.
//!
//! The program is started once, when the judge is built, and lives as long as it. For each
//! response candor writes one JSON object a line to its stdin —
//! `{"prompt": ..., "response": ..., <every other field of the prompt line>}` — and reads
//! one line back from its stdout: `{"score": x}` or a bare number. A batch is written
//! whole, then read back in order, so a program may answer as it goes or all at once.
//! Lines the program writes to stderr are passed through, prefixed `[judge PROGRAM]`.
//!
//! A request not answered in time, the program exiting, a line that does not parse or a
//! score that is not finite is an error naming the judge and the request's prompt; after
//! one the judge refuses further work (its answers could no longer be matched to requests).

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Mutex;
use std::time::Duration;

use crate::{request_timeout, Error, Judge, Result, Sample};

/// One program, running.
struct Running {
    child: Child,
    /// `None` once closed (on drop).
    stdin: Option<ChildStdin>,
    /// Lines of its stdout, read by a thread so a timeout can be put on them; `None` at
    /// end of file.
    lines: Receiver<std::io::Result<String>>,
    /// Set after an error: the program's answers may be out of step with the requests.
    broken: Option<String>,
}

pub struct CommandJudge {
    /// `command:PROGRAM ARGS`, as given.
    spec: String,
    timeout: Duration,
    running: Mutex<Running>,
}

/// Split a command line into words: whitespace separates, `'…'` and `"…"` quote (a
/// backslash escapes the next character outside single quotes).
pub fn split_words(line: &str) -> std::result::Result<Vec<String>, String> {
    let mut words = vec![];
    let mut word: Option<String> = None;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            c if c.is_whitespace() => {
                if let Some(w) = word.take() {
                    words.push(w);
                }
            }
            '\'' => {
                let w = word.get_or_insert_with(String::new);
                loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some(c) => w.push(c),
                        None => return Err("unclosed `'`".into()),
                    }
                }
            }
            '"' => {
                let w = word.get_or_insert_with(String::new);
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some(c) => w.push(c),
                            None => return Err("unclosed `\"`".into()),
                        },
                        Some(c) => w.push(c),
                        None => return Err("unclosed `\"`".into()),
                    }
                }
            }
            '\\' => match chars.next() {
                Some(c) => word.get_or_insert_with(String::new).push(c),
                None => return Err("a trailing `\\` escapes nothing".into()),
            },
            c => word.get_or_insert_with(String::new).push(c),
        }
    }
    if let Some(w) = word {
        words.push(w);
    }
    Ok(words)
}

/// The prompt of a request, short enough for an error message.
pub(crate) fn quote_prompt(prompt: &str) -> String {
    const MAX: usize = 80;
    let one_line: String = prompt
        .chars()
        .map(|c| if c == '\n' { ' ' } else { c })
        .collect();
    match one_line.char_indices().nth(MAX) {
        Some((i, _)) => format!("{:?}…", &one_line[..i]),
        None => format!("{one_line:?}"),
    }
}

/// A score read from one line of a judge's answer: `{"score": x}` or a bare number.
pub(crate) fn parse_score(line: &str) -> std::result::Result<f64, String> {
    let bad = || {
        format!(
            "cannot read `{}` (expected {{\"score\": x}} or a number)",
            line.trim()
        )
    };
    let value: serde_json::Value = match serde_json::from_str(line) {
        Ok(v) => v,
        // Python's json.dumps writes NaN and Infinity, which are not JSON
        Err(_) if ["NaN", "Infinity"].iter().any(|w| line.contains(w)) => {
            return Err(format!("score is not finite: `{}`", line.trim()))
        }
        Err(_) => return Err(bad()),
    };
    let number = match &value {
        serde_json::Value::Number(n) => n.as_f64(),
        serde_json::Value::Object(o) => o.get("score").and_then(|s| s.as_f64()),
        _ => None,
    };
    match number {
        Some(x) if x.is_finite() => Ok(x),
        Some(_) => Err(format!("score is not finite: `{}`", line.trim())),
        None => Err(bad()),
    }
}

impl CommandJudge {
    /// Start the program of `command:PROGRAM ARGS` (`arg` is `PROGRAM ARGS`).
    pub fn start(arg: Option<&str>) -> Result<Self> {
        let arg = arg.unwrap_or("");
        let spec = format!("command:{arg}");
        let words = split_words(arg).map_err(|e| Error::Msg(format!("judge `{spec}`: {e}")))?;
        let Some((program, args)) = words.split_first() else {
            return Err(Error::Msg(
                "judge `command:` needs a program: command:PROGRAM [ARGS…] (e.g. command:python3 examples/judges/length.py)".into(),
            ));
        };
        let mut child = Command::new(program)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| Error::Msg(format!("judge `{spec}`: cannot start `{program}`: {e}")))?;
        let stdin = child.stdin.take().expect("stdin is piped");
        let stdout = child.stdout.take().expect("stdout is piped");
        let stderr = child.stderr.take().expect("stderr is piped");
        let (send, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let end = line.is_err();
                if send.send(line).is_err() || end {
                    return;
                }
            }
        });
        let prefix = format!("[judge {program}]");
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(|l| l.ok()) {
                eprintln!("{prefix} {line}");
            }
        });
        Ok(CommandJudge {
            spec,
            timeout: request_timeout(),
            running: Mutex::new(Running {
                child,
                stdin: Some(stdin),
                lines,
                broken: None,
            }),
        })
    }

    fn fail(&self, run: &mut Running, sample: &Sample, what: String) -> Error {
        let msg = format!(
            "judge `{}` failed on the request for prompt {}: {what}",
            self.spec,
            quote_prompt(sample.prompt)
        );
        run.broken = Some(msg.clone());
        Error::Msg(msg)
    }

    /// Why the program is gone, when it is: its exit status.
    fn exit_status(run: &mut Running) -> String {
        // the reader thread sees end of file a moment before the process is reaped
        for _ in 0..50 {
            if let Ok(Some(status)) = run.child.try_wait() {
                return format!("the program exited ({status}) without answering");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        "the program closed its stdout without answering".into()
    }
}

impl Judge for CommandJudge {
    fn name(&self) -> &str {
        &self.spec
    }

    fn score(&self, sample: &Sample) -> Result<f64> {
        Ok(self.score_batch(std::slice::from_ref(sample))?[0])
    }

    fn score_batch(&self, batch: &[Sample]) -> Result<Vec<f64>> {
        if batch.is_empty() {
            return Ok(vec![]);
        }
        let mut guard = self.running.lock().unwrap_or_else(|p| p.into_inner());
        let run = &mut *guard;
        if let Some(why) = &run.broken {
            return Err(Error::Msg(format!("{why} (the judge is stopped)")));
        }
        let mut requests = String::new();
        for s in batch {
            let mut line = serde_json::Map::new();
            line.insert("prompt".into(), s.prompt.into());
            line.insert("response".into(), s.response.into());
            for (k, v) in s.fields {
                if k != "prompt" && k != "response" {
                    line.insert(k.clone(), v.clone());
                }
            }
            requests.push_str(&serde_json::Value::Object(line).to_string());
            requests.push('\n');
        }
        // stdout is drained by its own thread, so writing the whole batch cannot deadlock
        // on a program that answers as it reads
        let stdin = run.stdin.as_mut().expect("stdin is open until drop");
        if let Err(e) = stdin
            .write_all(requests.as_bytes())
            .and_then(|_| stdin.flush())
        {
            let why = match e.kind() {
                std::io::ErrorKind::BrokenPipe => Self::exit_status(run),
                _ => format!("cannot write to the program: {e}"),
            };
            return Err(self.fail(run, &batch[0], why));
        }
        let mut scores = Vec::with_capacity(batch.len());
        for s in batch {
            let line = match run.lines.recv_timeout(self.timeout) {
                Ok(Ok(line)) => line,
                Ok(Err(e)) => {
                    return Err(self.fail(run, s, format!("cannot read its answer: {e}")))
                }
                Err(RecvTimeoutError::Disconnected) => {
                    let why = Self::exit_status(run);
                    return Err(self.fail(run, s, why));
                }
                Err(RecvTimeoutError::Timeout) => {
                    let why = format!(
                        "no answer within {} s (CANDOR_JUDGE_TIMEOUT sets the limit)",
                        self.timeout.as_secs_f64()
                    );
                    return Err(self.fail(run, s, why));
                }
            };
            scores.push(parse_score(&line).map_err(|why| self.fail(run, s, why))?);
        }
        Ok(scores)
    }
}

impl Drop for CommandJudge {
    fn drop(&mut self) {
        let run = self.running.get_mut().unwrap_or_else(|p| p.into_inner());
        // closing stdin is the program's cue to finish; one that lingers is killed
        drop(run.stdin.take());
        for _ in 0..100 {
            if let Ok(Some(_)) = run.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = run.child.kill();
        let _ = run.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_split_on_whitespace_and_respect_quotes() {
        assert_eq!(
            split_words(r#"python3  judge.py --name 'a b' "c \"d\"" e\ f"#).unwrap(),
            vec!["python3", "judge.py", "--name", "a b", "c \"d\"", "e f"]
        );
        assert!(split_words("x 'open").is_err());
    }

    #[test]
    fn scores_are_objects_or_numbers_and_finite() {
        assert_eq!(parse_score(r#"{"score": 0.5}"#), Ok(0.5));
        assert_eq!(parse_score("-2"), Ok(-2.0));
        assert_eq!(parse_score(r#"{"score": 1, "extra": "x"}"#), Ok(1.0));
        assert!(parse_score("NaN").unwrap_err().contains("not finite"));
        assert!(parse_score(r#"{"score": Infinity}"#)
            .unwrap_err()
            .contains("not finite"));
        assert!(parse_score(r#"{"reward": 1}"#)
            .unwrap_err()
            .contains("expected {\"score\": x} or a number"));
        assert!(parse_score("ok").unwrap_err().contains("cannot read `ok`"));
    }

    /// examples/judges/reference_judge.py re-implements the built-in `reference` judge: the
    /// same scores, to the last bit, over cases that exercise normalisation and F1.
    #[test]
    fn the_example_program_scores_as_the_builtin_reference_judge() {
        let script = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../examples/judges/reference_judge.py"
        );
        let judge = CommandJudge::start(Some(&format!("python3 {script}"))).unwrap();
        let cases = [
            ("39", "39"),
            (" 39. ", "39"),
            ("It is 39.", "39"),
            ("the cat sat", "The Cat, sat on the mat!"),
            ("3 1 2", "1 2 3"),
            ("", "x"),
            ("Ünïcödé words", "ünïcödé"),
            ("a a a b", "a b b"),
        ];
        let fields: Vec<crate::Fields> = cases
            .iter()
            .map(|(_, r)| serde_json::from_value(serde_json::json!({"reference": r})).unwrap())
            .collect();
        let batch: Vec<Sample> = cases
            .iter()
            .zip(&fields)
            .map(|((resp, _), f)| Sample {
                prompt: "p",
                response: resp,
                fields: f,
            })
            .collect();
        let got = judge.score_batch(&batch).unwrap();
        let want = crate::ReferenceJudge.score_batch(&batch).unwrap();
        assert_eq!(got, want);
        // the program lives on: a second batch, then one at a time
        assert_eq!(judge.score_batch(&batch[..2]).unwrap(), want[..2]);
        assert_eq!(judge.score(&batch[3]).unwrap(), want[3]);
        // a line without `reference`: the program exits, the error names the prompt
        let empty = crate::Fields::new();
        let e = judge
            .score(&Sample {
                prompt: "What now?",
                response: "x",
                fields: &empty,
            })
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("failed on the request for prompt \"What now?\": the program exited (exit status: 2)"),
            "{e}"
        );
        let e = judge.score(&batch[0]).unwrap_err().to_string();
        assert!(e.contains("(the judge is stopped)"), "{e}");
    }

    #[test]
    fn long_prompts_are_cut_in_messages() {
        assert_eq!(quote_prompt("a\nb"), "\"a b\"");
        assert!(quote_prompt(&"x".repeat(200)).ends_with("\"…"));
    }
}
