//! Candidate and preference files (JSONL), and rankings as (better, worse) pairs grouped by
//! prompt and tokenised: what the reward-model stage and preference-optimisation stages
//! (DPO) train on. Prompt files are [`crate::prompts`].
//!
//! Any dataset file [`crate::dataset`] reads (JSONL, JSON, Parquet, compressed, `hf:`), in
//! candor's shapes below or TRL's ([`crate::formats`]): preference lines may also be TRL's
//! conversational (`chosen`/`rejected` message lists, with a `prompt` or with the prompt
//! implicit in their shared opening) or unpaired (`prompt`, `completion`, `label`: for each
//! prompt every desirable completion is preferred to every undesirable one).
//!
//! ```text
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

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use serde_json::{Map, Value};

use crate::chat::{encode_exchange_parts, ChatTemplate};
use crate::dataset::{read_records, Columns, Record};
use crate::error::Result;
use crate::formats::{implicit_preference, prompt_field, response_field, Prompt, SHAPES};
use crate::Tokenizer;

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

/// The text of a prompt that is a single user turn, or why it is not.
pub(crate) fn single_turn(p: &Prompt) -> std::result::Result<String, String> {
    if p.context.is_empty() {
        Ok(p.text.clone())
    } else {
        Err(format!(
            "the prompt has {} turn(s) before the last user turn; this step reads single-turn prompts only",
            p.context.len()
        ))
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

/// Deserialize a record as `T` (candor's own shapes), or say what is wrong.
fn from_record<T: serde::de::DeserializeOwned>(r: &Record) -> Result<T> {
    serde_json::from_value(Value::Object(r.fields.clone()))
        .map_err(|e| r.err(crate::jsonl::strip_pos(&e)))
}

/// Read a candidates file: each line a prompt and at least two distinct responses.
pub fn read_candidates(path: &Path) -> Result<Vec<(usize, Candidates)>> {
    let mut out = vec![];
    for r in read_records(path, &Columns::new())? {
        let c: Candidates = from_record(&r)?;
        if c.prompt.trim().is_empty() {
            return Err(r.err("`prompt` is empty"));
        }
        check_responses(&c.responses).map_err(|m| r.err(m))?;
        out.push((r.number(), c));
    }
    Ok(out)
}

/// Read a preference file (ranked responses or chosen/rejected pairs, mixed freely).
pub fn read_preferences(path: &Path) -> Result<Vec<(usize, Preference)>> {
    read_preferences_with(path, &Columns::new())
}

/// One record of a preference file: a preference, or one side of an unpaired one.
enum PrefRecord {
    Ranked(Preference),
    Unpaired {
        prompt: String,
        completion: String,
        desirable: bool,
    },
}

fn preference_record(fields: &Map<String, Value>) -> std::result::Result<PrefRecord, String> {
    let has = |k: &str| fields.contains_key(k);
    let text = |p: Prompt| single_turn(&p);
    if has("responses") {
        let line: PreferenceLine = serde_json::from_value(Value::Object(fields.clone()))
            .map_err(|e| crate::jsonl::strip_pos(&e))?;
        return line.validate().map(PrefRecord::Ranked);
    }
    if has("chosen") || has("rejected") {
        let (Some(c), Some(r)) = (fields.get("chosen"), fields.get("rejected")) else {
            return Err(if has("chosen") {
                "`chosen` needs a `rejected` response beside it".into()
            } else {
                "`rejected` needs a `chosen` response beside it".into()
            });
        };
        let (prompt, chosen, rejected) = match fields.get("prompt") {
            Some(p) => (
                prompt_field(p)?,
                response_field(c, "chosen")?,
                response_field(r, "rejected")?,
            ),
            None => implicit_preference(c, r)?,
        };
        let line = PreferenceLine {
            prompt: text(prompt)?,
            chosen: Some(chosen),
            rejected: Some(rejected),
            ..Default::default()
        };
        return line.validate().map(PrefRecord::Ranked);
    }
    if has("completion") && has("label") {
        let prompt =
            text(prompt_field(fields.get("prompt").ok_or(
                "`completion` and `label` need a `prompt` beside them",
            )?)?)?;
        let completion = response_field(&fields["completion"], "completion")?;
        let desirable = fields["label"]
            .as_bool()
            .ok_or("`label` must be true (desirable) or false (undesirable)")?;
        return Ok(PrefRecord::Unpaired {
            prompt,
            completion,
            desirable,
        });
    }
    Err(format!(
        "not a preference: expected `prompt` + `chosen` + `rejected` (strings or message lists), `chosen` + `rejected` conversations, `prompt` + `completion` + `label`, or `prompt` + `responses` (+ `ranks`); the shapes candor reads are {SHAPES}"
    ))
}

/// [`read_preferences`] with columns renamed. Unpaired records are gathered by prompt,
/// in order of first appearance, into one ranking each: desirable completions tied first,
/// undesirable tied second; a prompt needs at least one of each.
pub fn read_preferences_with(path: &Path, columns: &Columns) -> Result<Vec<(usize, Preference)>> {
    let mut out = vec![];
    // prompt → (first record, desirable, undesirable)
    let mut unpaired: Vec<(String, Record, Vec<String>, Vec<String>)> = vec![];
    for r in read_records(path, columns)? {
        match preference_record(&r.fields).map_err(|m| r.err(m))? {
            PrefRecord::Ranked(p) => out.push((r.number(), p)),
            PrefRecord::Unpaired {
                prompt,
                completion,
                desirable,
            } => {
                let slot = match unpaired.iter().position(|u| u.0 == prompt) {
                    Some(i) => i,
                    None => {
                        unpaired.push((prompt, r.clone(), vec![], vec![]));
                        unpaired.len() - 1
                    }
                };
                let u = &mut unpaired[slot];
                if u.2.contains(&completion) || u.3.contains(&completion) {
                    return Err(r.err(
                        "this completion of the prompt is already labelled on an earlier record",
                    ));
                }
                let side = if desirable { &mut u.2 } else { &mut u.3 };
                side.push(completion);
            }
        }
    }
    for (prompt, first, good, bad) in unpaired {
        if good.is_empty() || bad.is_empty() {
            return Err(first.err(format!(
                "the prompt has only {} completions; a preference needs at least one labelled true and one labelled false",
                if good.is_empty() { "undesirable (false)" } else { "desirable (true)" }
            )));
        }
        let ranks = good
            .iter()
            .map(|_| 1)
            .chain(bad.iter().map(|_| 2))
            .collect();
        let responses = good.into_iter().chain(bad).collect();
        out.push((
            first.number(),
            Preference {
                prompt,
                responses,
                ranks,
            },
        ));
    }
    Ok(out)
}

/// The training pairs of one ranking: (better, worse) indices, for every two responses
/// whose ranks differ (lower rank = better), in (i, j) order with i < j. Tied responses make
/// no pair (InstructGPT: all C(K,2) pairs of a K-way ranking).
pub fn expand_pairs(ranks: &[u32]) -> Vec<(usize, usize)> {
    let mut pairs = vec![];
    for i in 0..ranks.len() {
        for j in i + 1..ranks.len() {
            if ranks[i] < ranks[j] {
                pairs.push((i, j));
            } else if ranks[j] < ranks[i] {
                pairs.push((j, i));
            }
        }
    }
    pairs
}

/// One prompt's responses and the (better, worse) pairs among them.
#[derive(Clone, Debug, PartialEq)]
pub struct Comparisons {
    pub prompt: String,
    pub responses: Vec<String>,
    pub pairs: Vec<(usize, usize)>,
}

/// Read preference files and merge the lines of each prompt into one [`Comparisons`]
/// (responses united, every line's pairs kept once), in order of first appearance, so all
/// pairs of a prompt land in the same batch (InstructGPT) even when they come as several
/// chosen/rejected lines.
pub fn load_comparisons(files: &[PathBuf]) -> Result<Vec<Comparisons>> {
    load_comparisons_with(files, &Columns::new(), Labellers::Each)
}

/// [`load_comparisons`] of files whose columns are renamed by `columns` (`data.columns`); a
/// team's rankings of the same responses are first combined as `labellers` says.
pub fn load_comparisons_with(
    files: &[PathBuf],
    columns: &Columns,
    labellers: Labellers,
) -> Result<Vec<Comparisons>> {
    let mut out: Vec<Comparisons> = vec![];
    let mut by_prompt: HashMap<String, usize> = HashMap::new();
    let mut prefs = vec![];
    for file in files {
        prefs.extend(
            read_preferences_with(file, columns)?
                .into_iter()
                .map(|(_, p)| p),
        );
    }
    {
        for pref in labellers.combine(prefs) {
            let slot = *by_prompt.entry(pref.prompt.clone()).or_insert_with(|| {
                out.push(Comparisons {
                    prompt: pref.prompt.clone(),
                    responses: vec![],
                    pairs: vec![],
                });
                out.len() - 1
            });
            let c = &mut out[slot];
            let index: Vec<usize> = pref
                .responses
                .iter()
                .map(|r| match c.responses.iter().position(|x| x == r) {
                    Some(i) => i,
                    None => {
                        c.responses.push(r.clone());
                        c.responses.len() - 1
                    }
                })
                .collect();
            for (b, w) in expand_pairs(&pref.ranks) {
                let pair = (index[b], index[w]);
                if !c.pairs.contains(&pair) {
                    c.pairs.push(pair);
                }
            }
        }
    }
    Ok(out)
}

/// A prompt's exchanges as token ids (one per response) and its pairs.
#[derive(Clone, Debug)]
pub struct Encoded {
    /// Each response's whole exchange (prompt as posed + assistant turn), possibly cut.
    pub seqs: Vec<Vec<u32>>,
    /// How many leading tokens of each sequence are the prompt; the rest is the response's
    /// turn (what DPO scores). A cut sequence loses prompt tokens first.
    pub prompt_lens: Vec<usize>,
    pub pairs: Vec<(usize, usize)>,
}

/// Tokenise each exchange with the chat template ([`encode_exchange_parts`]); one longer
/// than `max_len` keeps its last `max_len` tokens (a reward is read at the end). Returns the
/// encoded prompts and how many exchanges were cut.
pub fn encode_comparisons(
    comparisons: &[Comparisons],
    tok: &Tokenizer,
    template: &ChatTemplate,
    max_len: usize,
) -> Result<(Vec<Encoded>, usize)> {
    let mut cut = 0;
    let mut out = Vec::with_capacity(comparisons.len());
    for c in comparisons {
        let pairs: Vec<(&str, &str)> = c
            .responses
            .iter()
            .map(|r| (c.prompt.as_str(), r.as_str()))
            .collect();
        let (mut seqs, mut prompt_lens) = (vec![], vec![]);
        for (mut ids, turn) in encode_exchange_parts(tok, template, &pairs)? {
            let mut prompt_len = ids.len();
            ids.extend(turn);
            if ids.len() > max_len {
                cut += 1;
                let drop = ids.len() - max_len;
                prompt_len = prompt_len.saturating_sub(drop);
                ids.drain(..drop);
            }
            seqs.push(ids);
            prompt_lens.push(prompt_len);
        }
        out.push(Encoded {
            seqs,
            prompt_lens,
            pairs: c.pairs.clone(),
        });
    }
    Ok((out, cut))
}

/// Several prompts flattened for one forward pass: their sequences, and each pair as
/// indices into them.
pub struct PairLayout<'a> {
    pub seqs: Vec<&'a [u32]>,
    pub better: Vec<u32>,
    pub worse: Vec<u32>,
    pub tokens: usize,
}

pub fn pair_layout<'a>(examples: &[&'a Encoded]) -> PairLayout<'a> {
    let mut l = PairLayout {
        seqs: vec![],
        better: vec![],
        worse: vec![],
        tokens: 0,
    };
    for e in examples {
        let base = l.seqs.len() as u32;
        l.seqs.extend(e.seqs.iter().map(Vec::as_slice));
        l.tokens += e.seqs.iter().map(Vec::len).sum::<usize>();
        for &(b, w) in &e.pairs {
            l.better.push(base + b as u32);
            l.worse.push(base + w as u32);
        }
    }
    l
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
            (
                r#"{"prompt": "p"}"#,
                "not a preference: expected `prompt` + `chosen`",
            ),
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

    fn fixture(name: &str) -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/formats")
            .join(name)
    }

    /// scripts/make_dataset_fixtures.py wrote the same preferences in every form, as JSONL
    /// and as Parquet (by `datasets`): all read the same.
    #[test]
    fn every_preference_form_and_file_type_reads_the_same() {
        let want: Vec<Preference> = read_preferences(&fixture("pref_candor.jsonl"))
            .unwrap()
            .into_iter()
            .map(|(_, p)| p)
            .collect();
        assert_eq!(want.len(), 6);
        assert_eq!(want[0].responses[0], "I love this wonderful book.");
        let renamed: Columns = [
            ("prompt", "question"),
            ("chosen", "good"),
            ("rejected", "bad"),
        ]
        .into_iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
        for form in [
            "pref_candor",
            "pref_trl_standard",
            "pref_trl_conversational",
            "pref_trl_implicit",
            "pref_trl_unpaired",
            "pref_renamed",
        ] {
            for ext in ["jsonl", "parquet"] {
                let name = format!("{form}.{ext}");
                let columns = if form == "pref_renamed" {
                    renamed.clone()
                } else {
                    Columns::new()
                };
                let got: Vec<Preference> = read_preferences_with(&fixture(&name), &columns)
                    .unwrap_or_else(|e| panic!("{name}: {e}"))
                    .into_iter()
                    .map(|(_, p)| p)
                    .collect();
                assert_eq!(got, want, "{name}");
            }
        }
        let array = read_preferences(&fixture("pref_trl_standard_array.json")).unwrap();
        assert_eq!(array.into_iter().map(|(_, p)| p).collect::<Vec<_>>(), want);
    }

    #[test]
    fn unpaired_and_unknown_shapes_are_clear_errors() {
        let (_d, path) = write(&[r#"{"prompt": "p", "completion": "a", "label": true}"#]);
        let e = read_preferences(&path).unwrap_err().to_string();
        assert!(
            e.contains(":1: the prompt has only desirable (true) completions"),
            "{e}"
        );
        let (_d, path) = write(&[r#"{"prompt": "p", "completion": "a", "label": "yes"}"#]);
        let e = read_preferences(&path).unwrap_err().to_string();
        assert!(e.contains("`label` must be true"), "{e}");
        let (_d, path) = write(&[r#"{"question": "p", "answer": "a"}"#]);
        let e = read_preferences(&path).unwrap_err().to_string();
        assert!(
            e.contains(":1: not a preference") && e.contains("`prompt` + `completion` + `label`"),
            "{e}"
        );
        let (_d, path) = write(&[
            r#"{"prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}], "chosen": "a", "rejected": "b"}"#,
        ]);
        let e = read_preferences(&path).unwrap_err().to_string();
        assert!(e.contains("single-turn prompts only"), "{e}");
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

    #[test]
    fn lines_of_one_prompt_merge_and_pairs_map_to_the_united_responses() {
        let (_d, path) = write(&[
            r#"{"prompt": "p", "chosen": "a", "rejected": "b"}"#,
            r#"{"prompt": "q", "responses": ["x", "y", "z"], "ranks": [1, 1, 2]}"#,
            r#"{"prompt": "p", "chosen": "c", "rejected": "a"}"#,
            r#"{"prompt": "p", "chosen": "a", "rejected": "b"}"#,
        ]);
        let c = load_comparisons(&[path]).unwrap();
        assert_eq!(c.len(), 2);
        assert_eq!(c[0].responses, vec!["a", "b", "c"]);
        assert_eq!(c[0].pairs, vec![(0, 1), (2, 0)]);
        assert_eq!(c[1].pairs, vec![(0, 2), (1, 2)]);
        let a = Encoded {
            seqs: vec![vec![1, 2], vec![3]],
            prompt_lens: vec![1, 0],
            pairs: vec![(0, 1)],
        };
        let b = Encoded {
            seqs: vec![vec![4], vec![5, 6, 7], vec![8]],
            prompt_lens: vec![0, 1, 0],
            pairs: vec![(2, 0), (1, 0)],
        };
        let l = pair_layout(&[&a, &b]);
        assert_eq!(
            (l.better, l.worse, l.tokens),
            (vec![0, 4, 3], vec![1, 2, 2], 8)
        );
    }

    #[test]
    fn encoded_exchanges_split_into_prompt_and_turn_and_cut_from_the_front() {
        let text = "Call me Ishmael. Some years ago, never mind how long precisely. ".repeat(20);
        let tok = Tokenizer::train(std::iter::once(text.as_str()), 300).unwrap();
        let t = ChatTemplate::for_tokenizer(&tok);
        let c = Comparisons {
            prompt: "Call me.".into(),
            responses: vec!["Some years ago.".into(), "Never.".into()],
            pairs: vec![(0, 1)],
        };
        let (full, cut) = encode_comparisons(std::slice::from_ref(&c), &tok, &t, 1000).unwrap();
        assert_eq!(cut, 0);
        let parts = encode_exchange_parts(&tok, &t, &[("Call me.", "Never.")]).unwrap();
        assert_eq!(full[0].prompt_lens[1], parts[0].0.len());
        assert_eq!(full[0].seqs[1][full[0].prompt_lens[1]..], parts[0].1[..]);
        let n = full[0].seqs[1].len();
        let (short, cut) = encode_comparisons(&[c], &tok, &t, n - 2).unwrap();
        assert_eq!(cut, 2);
        assert_eq!(short[0].seqs[1][..], full[0].seqs[1][2..]);
        assert_eq!(short[0].prompt_lens[1], full[0].prompt_lens[1] - 2);
    }
}
