//! candor-judge: rule-based judges and rankings of candidate responses.
//!
//! A [`Judge`] scores one response to a prompt (higher is better), as in RL from AI/rule
//! feedback: `candor rank --judge NAME` ranks K candidates by it, and PPO can use one as a
//! reward or an evaluation. [`rank`] holds the ranking itself: the order a person types
//! (`3 1=2 4`, best first, `=` for ties) and the order judge scores give.
//!
//! Adding a judge: one file with a type that implements [`Judge`], and one line in
//! [`JUDGES`].

pub mod rank;
mod reference;
mod sentiment;

pub use reference::ReferenceJudge;
pub use sentiment::SentimentJudge;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Msg(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Scores a response to a prompt; higher is better.
pub trait Judge: Send + Sync {
    /// The name it is registered under (`--judge NAME`).
    fn name(&self) -> &str;
    /// The score of `response` to `prompt`. `reference` is the prompt line's `reference`
    /// field, for judges that compare with an expected answer.
    fn score(&self, prompt: &str, response: &str, reference: Option<&str>) -> Result<f64>;
}

/// A registered judge: its name, what it measures (one line), and how to build it.
pub struct JudgeEntry {
    pub name: &'static str,
    pub about: &'static str,
    pub build: fn() -> Box<dyn Judge>,
}

/// The registry. One line per judge.
pub const JUDGES: &[JudgeEntry] = &[
    JudgeEntry {
        name: "sentiment",
        about: "VADER compound valence of the response, -1 (negative) to 1 (positive)",
        build: || Box::new(SentimentJudge::new()),
    },
    JudgeEntry {
        name: "reference",
        about: "agreement with the line's `reference` answer: 1 for an exact match after normalisation, else 0.9 x token F1",
        build: || Box::new(ReferenceJudge),
    },
];

/// Build the judge registered as `name`.
pub fn judge_by_name(name: &str) -> Result<Box<dyn Judge>> {
    match JUDGES.iter().find(|j| j.name == name) {
        Some(j) => Ok((j.build)()),
        None => Err(Error::Msg(format!("unknown judge `{name}`; known judges: {}", known_judges().join(", ")))),
    }
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
        for entry in JUDGES {
            assert_eq!(judge_by_name(entry.name).unwrap().name(), entry.name);
        }
        assert_eq!(known_judges(), vec!["sentiment", "reference"]);
    }

    #[test]
    fn unknown_judge_lists_the_known_ones() {
        let e = judge_by_name("vibes").err().unwrap().to_string();
        assert_eq!(e, "unknown judge `vibes`; known judges: sentiment, reference");
    }
}
