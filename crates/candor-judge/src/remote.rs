//! A judge that is a server: `http://HOST:PORT/PATH` (or `https://…`), speaking OpenRLHF's
//! remote reward protocol (`--remote_rm_url`):
//!
//! ```text
//! POST /PATH  {"query": [prompt + response, …], "prompts": [prompt, …], "labels": [label, …]}
//!          →  {"rewards": [score, …]}
//! ```
//!
//! `query` is the prompt and the response joined as plain text (no chat template), `labels`
//! the line's `reference` (or `label`) field as text, `""` when it has neither. A batch goes
//! in requests of at most [`MAX_BATCH`]. A request that fails to connect, times out or gets
//! a 5xx or 429 answer is retried [`RETRIES`] times with doubling waits; a 4xx answer, a body
//! that does not parse, a count of rewards that does not match or a score that is not
//! finite is an error at once, naming the judge and the first prompt of the request.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::command::quote_prompt;
use crate::{request_timeout, Error, Judge, Result, Sample};

/// Responses per request (OpenRLHF sends a micro-batch; this bounds the body size).
pub const MAX_BATCH: usize = 256;
/// Retries after the first try, for failures that may pass (connection, timeout, 5xx, 429).
pub const RETRIES: usize = 3;
/// The wait before the first retry; it doubles each time.
const FIRST_BACKOFF: Duration = Duration::from_millis(250);

pub struct RemoteJudge {
    url: String,
    agent: ureq::Agent,
    backoff: Duration,
}

#[derive(Serialize)]
struct Request<'a> {
    query: Vec<String>,
    prompts: Vec<&'a str>,
    labels: Vec<String>,
}

#[derive(Deserialize)]
struct Answer {
    rewards: Vec<serde_json::Value>,
}

/// The label OpenRLHF reads from `--label_key`: candor's `reference`, else `label`.
fn label(sample: &Sample) -> String {
    sample
        .text_field("reference")
        .or_else(|| sample.text_field("label"))
        .unwrap_or_default()
}

impl RemoteJudge {
    /// A judge for `url` (`http://…` or `https://…`); nothing is sent until it scores.
    pub fn new(url: &str) -> Result<Self> {
        let rest = url
            .strip_prefix("http://")
            .or_else(|| url.strip_prefix("https://"))
            .unwrap_or("");
        if rest.is_empty() || rest.starts_with('/') {
            return Err(Error::Msg(format!(
                "judge `{url}`: expected http://HOST:PORT/PATH or https://HOST/PATH"
            )));
        }
        let agent = ureq::Agent::config_builder()
            .timeout_global(Some(request_timeout()))
            .http_status_as_error(false)
            .build()
            .into();
        Ok(RemoteJudge {
            url: url.into(),
            agent,
            backoff: FIRST_BACKOFF,
        })
    }

    fn fail(&self, first: &Sample, what: impl std::fmt::Display) -> Error {
        Error::Msg(format!(
            "judge `{}` failed on the request for prompt {}: {what}",
            self.url,
            quote_prompt(first.prompt)
        ))
    }

    /// One request: the scores, or (whether to retry, why not).
    fn post(&self, batch: &[Sample]) -> std::result::Result<Vec<f64>, (bool, String)> {
        let body = Request {
            query: batch
                .iter()
                .map(|s| format!("{}{}", s.prompt, s.response))
                .collect(),
            prompts: batch.iter().map(|s| s.prompt).collect(),
            labels: batch.iter().map(label).collect(),
        };
        let mut answer = match self.agent.post(&self.url).send_json(&body) {
            Ok(a) => a,
            Err(e) => return Err((true, e.to_string())),
        };
        let status = answer.status().as_u16();
        let text = answer
            .body_mut()
            .read_to_string()
            .map_err(|e| (true, format!("cannot read the answer: {e}")))?;
        if status != 200 {
            let retry = status >= 500 || status == 429;
            let text: String = text.chars().take(200).collect();
            return Err((retry, format!("HTTP {status}: {}", text.trim())));
        }
        let answer: Answer = serde_json::from_str(&text).map_err(|e| {
            let text: String = text.chars().take(200).collect();
            (
                false,
                format!(
                    "cannot read `{}` (expected {{\"rewards\": [...]}}): {e}",
                    text.trim()
                ),
            )
        })?;
        if answer.rewards.len() != batch.len() {
            return Err((
                false,
                format!(
                    "{} rewards for {} responses",
                    answer.rewards.len(),
                    batch.len()
                ),
            ));
        }
        answer
            .rewards
            .iter()
            .enumerate()
            .map(|(i, r)| match r.as_f64() {
                Some(x) if x.is_finite() => Ok(x),
                _ => Err((
                    false,
                    format!(
                        "reward {} (prompt {}) is `{r}`, not a finite number",
                        i + 1,
                        quote_prompt(batch[i].prompt)
                    ),
                )),
            })
            .collect()
    }
}

impl Judge for RemoteJudge {
    fn name(&self) -> &str {
        &self.url
    }

    fn score(&self, sample: &Sample) -> Result<f64> {
        Ok(self.score_batch(std::slice::from_ref(sample))?[0])
    }

    fn score_batch(&self, batch: &[Sample]) -> Result<Vec<f64>> {
        let mut scores = Vec::with_capacity(batch.len());
        for chunk in batch.chunks(MAX_BATCH) {
            let mut wait = self.backoff;
            let mut tries = 0;
            loop {
                match self.post(chunk) {
                    Ok(s) => {
                        scores.extend(s);
                        break;
                    }
                    Err((true, why)) if tries < RETRIES => {
                        eprintln!(
                            "[judge {}] {why}; retrying in {:.2} s",
                            self.url,
                            wait.as_secs_f64()
                        );
                        std::thread::sleep(wait);
                        wait *= 2;
                        tries += 1;
                    }
                    Err((retried, why)) => {
                        let why = if retried {
                            format!("{why} (after {} tries)", tries + 1)
                        } else {
                            why
                        };
                        return Err(self.fail(&chunk[0], why));
                    }
                }
            }
        }
        Ok(scores)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader, Read, Write};
    use std::net::TcpListener;

    /// A one-thread HTTP server on a free port answering each request with the next of
    /// `answers` (status, body); returns its URL and the request bodies it saw.
    fn serve(answers: Vec<(u16, String)>) -> (String, std::thread::JoinHandle<Vec<String>>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/score", listener.local_addr().unwrap());
        let handle = std::thread::spawn(move || {
            let mut seen = vec![];
            for (status, body) in answers {
                let (stream, _) = listener.accept().unwrap();
                let mut reader = BufReader::new(stream);
                let mut len = 0;
                loop {
                    let mut line = String::new();
                    reader.read_line(&mut line).unwrap();
                    if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                        len = v.trim().parse().unwrap();
                    }
                    if line == "\r\n" {
                        break;
                    }
                }
                let mut request = vec![0; len];
                reader.read_exact(&mut request).unwrap();
                seen.push(String::from_utf8(request).unwrap());
                let mut stream = reader.into_inner();
                write!(
                    stream,
                    "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                )
                .unwrap();
            }
            seen
        });
        (url, handle)
    }

    fn samples(fields: &crate::Fields) -> Vec<Sample<'_>> {
        vec![
            Sample {
                prompt: "2+2=",
                response: "4",
                fields,
            },
            Sample {
                prompt: "3+3=",
                response: "7",
                fields,
            },
        ]
    }

    #[test]
    fn openrlhf_requests_retries_and_bad_answers() {
        let fields: crate::Fields = serde_json::from_str(r#"{"reference": 4}"#).unwrap();
        let batch = samples(&fields);
        // a 503, then the answer: retried once
        let (url, server) = serve(vec![
            (503, "busy".into()),
            (200, r#"{"rewards": [1.0, -0.5], "extra_logs": {}}"#.into()),
        ]);
        let mut judge = RemoteJudge::new(&url).unwrap();
        judge.backoff = Duration::from_millis(1);
        assert_eq!(judge.score_batch(&batch).unwrap(), vec![1.0, -0.5]);
        let seen = server.join().unwrap();
        let body: serde_json::Value = serde_json::from_str(&seen[1]).unwrap();
        assert_eq!(
            body,
            serde_json::json!({"query": ["2+2=4", "3+3=7"], "prompts": ["2+2=", "3+3="], "labels": ["4", "4"]})
        );
        for (status, answer, want) in [
            (200, r#"{"rewards": [1.0]}"#, "1 rewards for 2 responses"),
            (
                200,
                r#"{"rewards": [1.0, null]}"#,
                "reward 2 (prompt \"3+3=\") is `null`",
            ),
            (
                200,
                r#"{"scores": [1, 2]}"#,
                "expected {\"rewards\": [...]}",
            ),
            (400, "bad request", "HTTP 400: bad request"),
        ] {
            let (url, server) = serve(vec![(status, answer.into())]);
            let e = RemoteJudge::new(&url)
                .unwrap()
                .score_batch(&batch)
                .unwrap_err()
                .to_string();
            assert!(
                e.starts_with(&format!(
                    "judge `{url}` failed on the request for prompt \"2+2=\": "
                )) && e.contains(want),
                "{e}"
            );
            server.join().unwrap();
        }
        // 503 every time: given up after RETRIES retries
        let (url, server) = serve(vec![(503, "busy".into()); RETRIES + 1]);
        let mut judge = RemoteJudge::new(&url).unwrap();
        judge.backoff = Duration::from_millis(1);
        let e = judge.score_batch(&batch).unwrap_err().to_string();
        assert!(e.contains("HTTP 503: busy (after 4 tries)"), "{e}");
        assert_eq!(server.join().unwrap().len(), RETRIES + 1);
    }
}
