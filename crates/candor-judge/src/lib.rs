//! candor-judge: rule-based judges and rankings of candidate responses.
//!
//! A [`Judge`] scores one response to a prompt (higher is better), as in RL from AI/rule
//! feedback: `candor rank --judge NAME` ranks K candidates by it, and PPO can use one as a
//! reward or an evaluation. [`rank`] holds the ranking itself: the order a person types
//! (`3 1=2 4`, best first, `=` for ties) and the order judge scores give.
//!
//! Adding a judge: one file with a type that implements [`Judge`], and one line in
//! [`JUDGES`]. Users bring their own without Rust: `command:PROGRAM [ARGS…]` runs a program
//! that answers JSON lines ([`command`]), `http://HOST:PORT/PATH` asks a server speaking
//! OpenRLHF's remote reward protocol ([`remote`]); docs/judges.md has both protocols.

pub mod command;
mod length;
mod math;
pub mod rank;
mod reference;
mod regex;
pub mod remote;
mod sentiment;
mod weighted;

pub use command::CommandJudge;
pub use length::LengthJudge;
pub use math::MathJudge;
pub use reference::ReferenceJudge;
pub use regex::RegexJudge;
pub use remote::RemoteJudge;
pub use sentiment::SentimentJudge;
pub use weighted::{parse_weighted, WeightedJudges};

use std::time::Duration;

/// How long a program or server judge may take over one request before it is an error:
/// `CANDOR_JUDGE_TIMEOUT` seconds, 60 when unset.
pub fn request_timeout() -> Duration {
    std::env::var("CANDOR_JUDGE_TIMEOUT")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .filter(|s| *s > 0.0 && s.is_finite())
        .map(Duration::from_secs_f64)
        .unwrap_or(Duration::from_secs(60))
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Msg(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The fields of a prompt line (`reference`, or any other a judge reads), as parsed.
pub type Fields = serde_json::Map<String, serde_json::Value>;

/// One response to judge, with everything its prompt line carried.
#[derive(Clone, Copy, Debug)]
pub struct Sample<'a> {
    /// The prompt as the user wrote it (not rendered with a chat template).
    pub prompt: &'a str,
    /// The response, without the end-of-turn token.
    pub response: &'a str,
    /// Every field of the prompt line besides `prompt` (`reference`, ...).
    pub fields: &'a Fields,
}

impl<'a> Sample<'a> {
    /// A field of the prompt line as text: a string as it is, a number or boolean printed
    /// (`{"reference": 42}` reads as `"42"`); `None` when absent or null.
    pub fn text_field(&self, key: &str) -> Option<String> {
        match self.fields.get(key)? {
            serde_json::Value::Null => None,
            serde_json::Value::String(s) => Some(s.clone()),
            other => Some(other.to_string()),
        }
    }
}

/// Scores a response to a prompt; higher is better.
pub trait Judge: Send + Sync {
    /// The name it is registered under (`--judge NAME`).
    fn name(&self) -> &str;
    /// The prompt-line fields this judge reads; a run checks every prompt line has them
    /// before anything is sampled or trained.
    fn needs(&self) -> &[&str] {
        &[]
    }
    /// The score of one response.
    fn score(&self, sample: &Sample) -> Result<f64>;
    /// The scores of a batch, in order. Judges that pay per call (a program, a server)
    /// override this to send the batch at once.
    fn score_batch(&self, batch: &[Sample]) -> Result<Vec<f64>> {
        batch.iter().map(|s| self.score(s)).collect()
    }
}

/// A registered judge: its name, what it measures (one line), and how to build it from the
/// argument after `NAME:` in a judge spec (`None` for a bare `NAME`).
pub struct JudgeEntry {
    pub name: &'static str,
    pub about: &'static str,
    pub build: fn(arg: Option<&str>) -> Result<Box<dyn Judge>>,
}

/// For judges that take no argument: a bare `NAME` builds it, `NAME:ARG` is an error.
fn no_arg(name: &str, arg: Option<&str>) -> Result<()> {
    match arg {
        None => Ok(()),
        Some(a) => Err(Error::Msg(format!(
            "judge `{name}` takes no argument (got `{name}:{a}`)"
        ))),
    }
}

/// The registry. One line per judge.
pub const JUDGES: &[JudgeEntry] = &[
    JudgeEntry {
        name: "sentiment",
        about: "VADER compound valence of the response, -1 (negative) to 1 (positive)",
        build: |arg| no_arg("sentiment", arg).map(|_| Box::new(SentimentJudge::new()) as Box<dyn Judge>),
    },
    JudgeEntry {
        name: "reference",
        about: "agreement with the line's `reference` answer: 1 for an exact match after normalisation, else 0.9 x token F1",
        build: |arg| no_arg("reference", arg).map(|_| Box::new(ReferenceJudge) as Box<dyn Judge>),
    },
    JudgeEntry {
        name: "math",
        about: "1 when the response's final number (or last \\boxed{} answer) equals the line's `reference` numerically, else 0",
        build: |arg| no_arg("math", arg).map(|_| Box::new(MathJudge) as Box<dyn Judge>),
    },
    JudgeEntry {
        name: "regex",
        about: "`regex:PATTERN`: 1 when the response matches PATTERN (a required format), else 0",
        build: |arg| RegexJudge::new(arg).map(|j| Box::new(j) as Box<dyn Judge>),
    },
    JudgeEntry {
        name: "length",
        about: "`length:MIN-MAX`: 1 when the response has MIN..=MAX characters (trimmed), else 0",
        build: |arg| LengthJudge::new(arg).map(|j| Box::new(j) as Box<dyn Judge>),
    },
    JudgeEntry {
        name: "command",
        about: "a program you write: command:PROGRAM [ARGS…] gets one JSON request a line on stdin and answers {\"score\": x} a line (docs/judges.md)",
        build: |arg| CommandJudge::start(arg).map(|j| Box::new(j) as Box<dyn Judge>),
    },
    JudgeEntry {
        name: "http",
        about: "a reward server: http://HOST:PORT/PATH, OpenRLHF's remote reward protocol (docs/judges.md)",
        build: |arg| RemoteJudge::new(&format!("http:{}", arg.unwrap_or(""))).map(|j| Box::new(j) as Box<dyn Judge>),
    },
    JudgeEntry {
        name: "https",
        about: "a reward server over TLS: https://HOST/PATH, as http",
        build: |arg| RemoteJudge::new(&format!("https:{}", arg.unwrap_or(""))).map(|j| Box::new(j) as Box<dyn Judge>),
    },
];

/// Build a judge from its spec: `NAME`, or `NAME:ARG` for judges that take an argument
/// (the text after the first `:`).
pub fn judge_by_name(spec: &str) -> Result<Box<dyn Judge>> {
    let (name, arg) = match spec.split_once(':') {
        Some((n, a)) => (n, Some(a)),
        None => (spec, None),
    };
    match JUDGES.iter().find(|j| j.name == name) {
        Some(j) => (j.build)(arg),
        None => Err(Error::Msg(format!(
            "unknown judge `{name}`; known judges: {}",
            known_judges().join(", ")
        ))),
    }
}

/// Score one response given only a prompt line's `reference` (or none): for tests and
/// callers that carry no other fields.
pub fn score_with_reference(
    judge: &dyn Judge,
    prompt: &str,
    response: &str,
    reference: Option<&str>,
) -> Result<f64> {
    let mut fields = Fields::new();
    if let Some(r) = reference {
        fields.insert("reference".into(), serde_json::Value::String(r.into()));
    }
    judge.score(&Sample {
        prompt,
        response,
        fields: &fields,
    })
}

/// Names of the registered judges, in registry order.
pub fn known_judges() -> Vec<&'static str> {
    JUDGES.iter().map(|j| j.name).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_builds_every_judge_under_its_name() {
        let example_arg = |name: &str| match name {
            "regex" => "regex:^\\d+$".to_string(),
            "length" => "length:1-10".to_string(),
            "http" | "https" => format!("{name}://127.0.0.1:1/score"),
            other => other.to_string(),
        };
        for entry in JUDGES.iter().filter(|j| j.name != "command") {
            let spec = example_arg(entry.name);
            let name = judge_by_name(&spec).unwrap().name().to_string();
            match entry.name {
                "http" | "https" => assert_eq!(name, spec),
                _ => assert_eq!(name, entry.name),
            }
        }
        assert_eq!(
            known_judges(),
            vec![
                "sentiment",
                "reference",
                "math",
                "regex",
                "length",
                "command",
                "http",
                "https"
            ]
        );
        let e = judge_by_name("command:").err().unwrap().to_string();
        assert!(e.contains("needs a program"), "{e}");
        let e = judge_by_name("http://").err().unwrap().to_string();
        assert!(e.contains("expected http://HOST:PORT/PATH"), "{e}");
    }

    #[test]
    fn argument_to_a_judge_without_one_is_an_error() {
        let e = judge_by_name("sentiment:x").err().unwrap().to_string();
        assert_eq!(e, "judge `sentiment` takes no argument (got `sentiment:x`)");
    }

    #[test]
    fn text_field_prints_numbers_and_skips_null() {
        let fields: Fields = serde_json::from_str(r#"{"a": "x", "b": 42, "c": null}"#).unwrap();
        let s = Sample {
            prompt: "p",
            response: "r",
            fields: &fields,
        };
        assert_eq!(s.text_field("a").as_deref(), Some("x"));
        assert_eq!(s.text_field("b").as_deref(), Some("42"));
        assert_eq!(s.text_field("c"), None);
        assert_eq!(s.text_field("d"), None);
    }

    #[test]
    fn unknown_judge_lists_the_known_ones() {
        let e = judge_by_name("vibes").err().unwrap().to_string();
        assert_eq!(
            e,
            "unknown judge `vibes`; known judges: sentiment, reference, math, regex, length, command, http, https"
        );
    }
}
