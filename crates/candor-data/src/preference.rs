//! Prompt, candidate and preference files (JSONL), for the reward-model stage.
//!
//! ```text
//! prompts     {"prompt": "...", "reference": "..."?}
//! candidates  {"prompt": "...", "responses": ["...", ...], "reference": "..."?}      (candor sample)
//! preferences {"prompt": "...", "responses": [best, ..., worst], "ranks": [1, 2, 2, 3]?,
//!              "reference"?, "scores"?, "judge"?}                                  (candor rank)
//!             {..., "labeller": "ana", "seconds": 41.5, "flags": [[], ["harmful"]],
//!              "comment": "..."}                                                   (candor label)
//!          or {"prompt": "...", "chosen": "...", "rejected": "..."}
//! ```
//!
//! `ranks` gives each response's dense rank, 1 = best, equal numbers tied (it must not
//! decrease down the list); without it the responses are strictly ordered best → worst.
//! `scores` and `judge` record what a rule judge gave; `labeller`, `seconds`, `flags` and
//! `comment` what a person gave through `candor label`; training ignores them. Several
//! lines of one prompt (a team's rankings) are combined by [`Labellers`].
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
    /// The person who ranked this line (`candor label`; informational).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labeller: Option<String>,
    /// Seconds the labeller spent on this prompt (informational).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seconds: Option<f64>,
    /// Flags per response, aligned with `responses`: any of `harmful`, `untruthful`,
    /// `off_topic` (InstructGPT's labelling flags; informational).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flags: Option<Vec<Vec<String>>>,
    /// The labeller's free-text comment (informational).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
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
        if let Some(f) = &self.flags {
            if f.len() != responses.len() {
                return Err(format!(
                    "`flags` has {} entries for {} responses (one list of flags per response)",
                    f.len(),
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

/// How several rankings of the same prompt and responses (a team's, from `candor label`)
/// become training pairs: the reward stage's `data.labellers`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Labellers {
    /// Every ranking is used as given: the pairs of all lines of a prompt are united (a pair
    /// two labellers agree on counts once; pairs they disagree on are both kept).
    #[default]
    Each,
    /// The rankings of one prompt's responses are first combined into one order by Borda
    /// count (see [`borda`]).
    Borda,
}

impl Labellers {
    /// Apply the choice to preferences read from files (in order of appearance).
    pub fn combine(self, prefs: Vec<Preference>) -> Vec<Preference> {
        match self {
            Labellers::Each => prefs,
            Labellers::Borda => borda(prefs),
        }
    }
}

/// Combine the rankings that share a prompt and a set of responses into one by Borda count
/// (de Borda 1781, the tie-averaged variant): in each ranking a response scores one point
/// for every response ranked below it and half a point for every other response tied with
/// it; the combined order sorts by total points, equal totals tied. A group is placed where
/// its first ranking was; a ranking alone in its group is kept as it is.
pub fn borda(prefs: Vec<Preference>) -> Vec<Preference> {
    let mut groups: Vec<Vec<Preference>> = vec![];
    let mut index: std::collections::HashMap<(String, Vec<String>), usize> = Default::default();
    for p in prefs {
        let mut set = p.responses.clone();
        set.sort();
        let slot = *index.entry((p.prompt.clone(), set)).or_insert_with(|| {
            groups.push(vec![]);
            groups.len() - 1
        });
        groups[slot].push(p);
    }
    groups
        .into_iter()
        .map(|mut group| {
            if group.len() == 1 {
                return group.pop().unwrap();
            }
            // points doubled, so half points stay integers
            let first = &group[0];
            let mut points = vec![0u64; first.responses.len()];
            for p in &group {
                for (i, r) in p.responses.iter().enumerate() {
                    let below = p.ranks.iter().filter(|&&x| x > p.ranks[i]).count() as u64;
                    let tied = p.ranks.iter().filter(|&&x| x == p.ranks[i]).count() as u64 - 1;
                    let at = first.responses.iter().position(|x| x == r).unwrap();
                    points[at] += 2 * below + tied;
                }
            }
            let mut order: Vec<usize> = (0..points.len()).collect();
            order.sort_by_key(|&i| std::cmp::Reverse(points[i])); // stable: ties keep first's order
            let mut ranks = Vec::with_capacity(order.len());
            for (n, &i) in order.iter().enumerate() {
                ranks.push(match n {
                    0 => 1,
                    _ if points[i] == points[order[n - 1]] => ranks[n - 1],
                    _ => ranks[n - 1] + 1,
                });
            }
            Preference {
                prompt: first.prompt.clone(),
                responses: order.iter().map(|&i| first.responses[i].clone()).collect(),
                ranks,
            }
        })
        .collect()
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
    fn labelling_fields_are_read_and_flags_must_align() {
        let (_d, path) = write(&[
            r#"{"prompt": "p", "responses": ["a", "b"], "ranks": [1, 2], "labeller": "ana", "seconds": 12.5, "flags": [[], ["harmful", "off_topic"]], "comment": "b is rude"}"#,
        ]);
        assert_eq!(read_preferences(&path).unwrap()[0].1.ranks, vec![1, 2]);
        let (_d, path) =
            write(&[r#"{"prompt": "p", "responses": ["a", "b"], "flags": [["harmful"]]}"#]);
        let e = read_preferences(&path).unwrap_err().to_string();
        assert!(
            e.contains(":1: `flags` has 1 entries for 2 responses"),
            "{e}"
        );
    }

    fn pref(prompt: &str, responses: &[&str], ranks: &[u32]) -> Preference {
        Preference {
            prompt: prompt.into(),
            responses: responses.iter().map(|s| s.to_string()).collect(),
            ranks: ranks.to_vec(),
        }
    }

    #[test]
    fn borda_combines_rankings_of_the_same_responses() {
        // By hand, doubled points (2 per response below, 1 per other response tied):
        //   ana  a > b > c        a 4, b 2, c 0
        //   ben  b > a = c        b 4, a 1, c 1
        //   cy   a = b > c        a 3, b 3, c 0
        //   total                 a 8, b 9, c 1   →  b > a > c
        // A fourth ranking with a different response set (a, d) is its own group, and
        // prompt q's single ranking stays as it is.
        let prefs = vec![
            pref("p", &["a", "b", "c"], &[1, 2, 3]),
            pref("q", &["x", "y"], &[1, 1]),
            pref("p", &["b", "a", "c"], &[1, 2, 2]),
            pref("p", &["a", "d"], &[1, 2]),
            pref("p", &["a", "b", "c"], &[1, 1, 2]),
        ];
        let combined = Labellers::Borda.combine(prefs.clone());
        assert_eq!(
            combined,
            vec![
                pref("p", &["b", "a", "c"], &[1, 2, 3]),
                pref("q", &["x", "y"], &[1, 1]),
                pref("p", &["a", "d"], &[1, 2]),
            ]
        );
        // equal totals tie: a > b and b > a give a = b
        let tie = borda(vec![
            pref("p", &["a", "b"], &[1, 2]),
            pref("p", &["b", "a"], &[1, 2]),
        ]);
        assert_eq!(tie, vec![pref("p", &["a", "b"], &[1, 1])]);
        assert_eq!(Labellers::Each.combine(prefs.clone()), prefs);
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
