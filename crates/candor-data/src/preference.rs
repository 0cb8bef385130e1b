//! Prompt, candidate and preference files (JSONL), for the reward-model stage.
//!
//! ```text
//! prompts     {"prompt": "...", "reference": "..."?}
//! candidates  {"prompt": "...", "responses": ["...", ...], "reference": "..."?}      (candor sample)
//! preferences {"prompt": "...", "responses": [best, ..., worst], "ranks": [1, 2, 2, 3]?,
//!              "reference"?, "scores"?, "judge"?}                                  (candor rank)
//!          or {"prompt": "...", "chosen": "...", "rejected": "..."}
//! ```
//!
//! `ranks` gives each response's dense rank, 1 = best, equal numbers tied (it must not
//! decrease down the list); without it the responses are strictly ordered best → worst.
//! `scores` and `judge` record what a rule judge gave; readers of preferences ignore them.
//! Every bad line is reported as `file:line: what is wrong`.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{line_err, Result};
use crate::jsonl::read_jsonl;

/// A line of a prompt file.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
pub struct PromptLine {
    pub prompt: String,
    /// The expected answer, for judges that compare with one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<String>,
}

/// A line of a candidates file: a prompt and K ≥ 2 distinct responses, in no order.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Candidates {
    pub prompt: String,
    pub responses: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<String>,
}

/// A line of a preference file as written: either ranked `responses` or `chosen`/`rejected`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PreferenceLine {
    pub prompt: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub responses: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ranks: Option<Vec<u32>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chosen: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rejected: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<String>,
    /// Judge scores aligned with `responses` (informational).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scores: Option<Vec<f64>>,
    /// The judge that ranked this line (informational).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub judge: Option<String>,
}

/// A validated ranking of one prompt's responses.
#[derive(Clone, Debug, PartialEq)]
pub struct Preference {
    pub prompt: String,
    /// Best → worst.
    pub responses: Vec<String>,
    /// Dense ranks aligned with `responses` (1 = best; equal = tied), non-decreasing.
    pub ranks: Vec<u32>,
}

/// Why a list of responses cannot be ranked: fewer than two, or two the same.
pub fn check_responses(responses: &[String]) -> std::result::Result<(), String> {
    if responses.len() < 2 {
        return Err(format!(
            "`responses` has {} response(s); a ranking needs at least 2",
            responses.len()
        ));
    }
    for (i, a) in responses.iter().enumerate() {
        if let Some(j) = responses[i + 1..].iter().position(|b| b == a) {
            return Err(format!(
                "responses {} and {} are the same text; a ranking needs distinct responses",
                i + 1,
                i + j + 2
            ));
        }
    }
    Ok(())
}

/// Why `ranks` does not fit `n` responses listed best first.
pub fn check_ranks(ranks: &[u32], n: usize) -> std::result::Result<(), String> {
    if ranks.len() != n {
        return Err(format!(
            "`ranks` has {} entries for {n} responses",
            ranks.len()
        ));
    }
    if ranks.contains(&0) {
        return Err("`ranks` starts at 1 (the best response)".into());
    }
    if let Some(i) = ranks.windows(2).position(|w| w[1] < w[0]) {
        return Err(format!(
            "`ranks` decreases at position {} ({} after {}): responses are listed best first, so ranks may only stay equal (a tie) or grow",
            i + 2,
            ranks[i + 1],
            ranks[i]
        ));
    }
    Ok(())
}

impl PreferenceLine {
    /// Check the line and turn it into a [`Preference`].
    pub fn validate(self) -> std::result::Result<Preference, String> {
        if self.prompt.trim().is_empty() {
            return Err("`prompt` is empty".into());
        }
        let (responses, ranks) = match (self.responses, self.chosen, self.rejected) {
            (Some(responses), None, None) => {
                check_responses(&responses)?;
                let ranks = match self.ranks {
                    Some(r) => {
                        check_ranks(&r, responses.len())?;
                        r
                    }
                    None => (1..=responses.len() as u32).collect(),
                };
                (responses, ranks)
            }
            (None, Some(chosen), Some(rejected)) => {
                if self.ranks.is_some() {
                    return Err(
                        "`ranks` goes with `responses`, not with `chosen`/`rejected`".into(),
                    );
                }
                if chosen == rejected {
                    return Err("`chosen` and `rejected` are the same text".into());
                }
                (vec![chosen, rejected], vec![1, 2])
            }
            (Some(_), _, _) => {
                return Err("give either `responses` or `chosen` and `rejected`, not both".into())
            }
            (None, Some(_), None) => {
                return Err("`chosen` needs a `rejected` response beside it".into())
            }
            (None, None, Some(_)) => {
                return Err("`rejected` needs a `chosen` response beside it".into())
            }
            (None, None, None) => {
                return Err(
                    "expected `responses` (ranked best first) or `chosen` and `rejected`".into(),
                )
            }
        };
        if let Some(s) = &self.scores {
            if s.len() != responses.len() {
                return Err(format!(
                    "`scores` has {} entries for {} responses",
                    s.len(),
                    responses.len()
                ));
            }
        }
        Ok(Preference {
            prompt: self.prompt,
            responses,
            ranks,
        })
    }
}

/// Read a prompt file; every prompt must be non-empty.
pub fn read_prompts(path: &Path) -> Result<Vec<(usize, PromptLine)>> {
    let lines: Vec<(usize, PromptLine)> = read_jsonl(path)?;
    for (line, p) in &lines {
        if p.prompt.trim().is_empty() {
            return Err(line_err(path, *line, "`prompt` is empty"));
        }
    }
    Ok(lines)
}

/// Read a candidates file: each line a prompt and at least two distinct responses.
pub fn read_candidates(path: &Path) -> Result<Vec<(usize, Candidates)>> {
    let lines: Vec<(usize, Candidates)> = read_jsonl(path)?;
    for (line, c) in &lines {
        if c.prompt.trim().is_empty() {
            return Err(line_err(path, *line, "`prompt` is empty"));
        }
        check_responses(&c.responses).map_err(|m| line_err(path, *line, m))?;
    }
    Ok(lines)
}

/// Read a preference file (ranked responses or chosen/rejected pairs, mixed freely).
pub fn read_preferences(path: &Path) -> Result<Vec<(usize, Preference)>> {
    let lines: Vec<(usize, PreferenceLine)> = read_jsonl(path)?;
    lines
        .into_iter()
        .map(|(line, p)| {
            p.validate()
                .map(|p| (line, p))
                .map_err(|m| line_err(path, line, m))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(lines: &[&str]) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.jsonl");
        std::fs::write(&path, lines.join("\n") + "\n").unwrap();
        (dir, path)
    }

    #[test]
    fn reads_both_preference_formats_and_ranks() {
        let (_d, path) = write(&[
            r#"{"prompt": "p1", "chosen": "good", "rejected": "bad"}"#,
            r#"{"prompt": "p2", "responses": ["a", "b", "c"]}"#,
            r#"{"prompt": "p3", "responses": ["a", "b", "c", "d"], "ranks": [1, 2, 2, 3], "scores": [0.5, 0.1, 0.1, 0], "judge": "sentiment"}"#,
        ]);
        let p = read_preferences(&path).unwrap();
        assert_eq!(
            p[0].1,
            Preference {
                prompt: "p1".into(),
                responses: vec!["good".into(), "bad".into()],
                ranks: vec![1, 2]
            }
        );
        assert_eq!(p[1].1.ranks, vec![1, 2, 3]);
        assert_eq!((p[2].0, p[2].1.ranks.clone()), (3, vec![1, 2, 2, 3]));
    }

    #[test]
    fn bad_preference_lines_name_file_line_and_problem() {
        let cases = [
            (
                r#"{"prompt": "p", "responses": ["only one"]}"#,
                "has 1 response(s); a ranking needs at least 2",
            ),
            (
                r#"{"prompt": "p", "responses": ["a", "b", "a"]}"#,
                "responses 1 and 3 are the same text",
            ),
            (
                r#"{"prompt": "p", "responses": ["a", "b"], "ranks": [2, 1]}"#,
                "`ranks` decreases at position 2",
            ),
            (
                r#"{"prompt": "p", "responses": ["a", "b"], "ranks": [1]}"#,
                "`ranks` has 1 entries for 2 responses",
            ),
            (
                r#"{"prompt": "p", "chosen": "a"}"#,
                "`chosen` needs a `rejected`",
            ),
            (
                r#"{"prompt": "p", "chosen": "a", "rejected": "a"}"#,
                "the same text",
            ),
            (r#"{"prompt": "p"}"#, "expected `responses`"),
            (
                r#"{"prompt": "p", "responses": ["a", "b"], "rank": [1, 2]}"#,
                "unknown field `rank`",
            ),
            (
                r#"{"prompt": "", "responses": ["a", "b"]}"#,
                "`prompt` is empty",
            ),
        ];
        for (line, want) in cases {
            let (_d, path) = write(&[r#"{"prompt": "ok", "chosen": "x", "rejected": "y"}"#, line]);
            let e = read_preferences(&path).unwrap_err().to_string();
            assert!(
                e.starts_with(&format!("{}:2: ", path.display())) && e.contains(want),
                "{line}: {e}"
            );
        }
    }

    #[test]
    fn candidates_need_two_distinct_responses() {
        let (_d, path) = write(&[r#"{"prompt": "p", "responses": ["a", "b"], "reference": "a"}"#]);
        assert_eq!(
            read_candidates(&path).unwrap()[0].1.reference.as_deref(),
            Some("a")
        );
        let (_d, path) = write(&[r#"{"prompt": "p", "responses": ["a", "a"]}"#]);
        let e = read_candidates(&path).unwrap_err().to_string();
        assert!(e.contains(":1: responses 1 and 2 are the same text"), "{e}");
        let (_d, path) = write(&[r#"{"prompt": "p", "responses": []}"#]);
        assert!(read_candidates(&path)
            .unwrap_err()
            .to_string()
            .contains("has 0 response(s)"));
    }
}
