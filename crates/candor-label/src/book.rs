//! The book of work: the candidates to rank, the rankings written so far, who gets which
//! prompt next, and the one writer that appends every answer to the output at once.
//!
//! Restart-safe by construction: the output file is the only record. On start it is read
//! back (a last line torn by a crash is cut off), each ranking is matched to its prompt by
//! the prompt text and its set of responses (as `candor rank` does), and a prompt counts as
//! done for a labeller once their ranking of it is in the file. An answer is acknowledged
//! only after it is written and fsynced, and a labeller's second answer to the same prompt
//! is refused, so a retried request never writes twice.

use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use candor_data::preference::{read_candidates, Candidates, PreferenceLine};
use serde::{Deserialize, Serialize};

use crate::{err, Result};

/// The flags a labeller may set on a response (InstructGPT's labelling interface asked
/// whether an output was harmful, untruthful or off-topic, among others).
pub const FLAGS: [&str; 3] = ["harmful", "untruthful", "off_topic"];

/// The labeller of a ranking written without a `labeller` field (by `candor rank`).
pub const UNNAMED: &str = "(unnamed)";

/// How long a prompt handed to a labeller stays reserved for them, so that with overlap N
/// no more than N people work on it at once; an abandoned one is offered again after this.
pub const CLAIM: Duration = Duration::from_secs(30 * 60);

/// The longest comment accepted, in characters.
pub const MAX_COMMENT: usize = 10_000;

/// A prompt and its responses as a set: how a ranking is matched to its prompt.
type Key = (String, Vec<String>);

fn key(prompt: &str, responses: &[String]) -> Key {
    let mut r = responses.to_vec();
    r.sort();
    (prompt.to_string(), r)
}

/// One labeller's answer to one prompt, as the page sends it.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Answer {
    /// The prompt's id (its position among the candidates, from 0).
    pub id: usize,
    /// Response indices (0-based, as shown), best group first; a group of several is a tie.
    pub order: Vec<Vec<usize>>,
    /// Flags per response, aligned with the responses as shown (empty: none).
    #[serde(default)]
    pub flags: Vec<Vec<String>>,
    #[serde(default)]
    pub comment: String,
    /// Seconds the prompt was on the labeller's screen.
    #[serde(default)]
    pub seconds: f64,
}

/// Why an answer or a skip was not taken.
#[derive(Debug, PartialEq)]
pub enum Refusal {
    /// The request is malformed (HTTP 400).
    Bad(String),
    /// This labeller has already ranked this prompt (HTTP 409); nothing was written.
    AlreadyRanked,
    /// The answer could not be written (HTTP 500); nothing was recorded.
    Io(String),
}

/// Where a labeller and the team stand.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Progress {
    /// Prompts this labeller has ranked.
    pub mine: usize,
    /// Prompts skipped by this labeller since the server started.
    pub skipped: usize,
    /// Prompts that still need this labeller (not ranked or skipped by them, and not yet
    /// ranked by `overlap` others).
    pub open: usize,
    /// Rankings in, counting at most `overlap` per prompt.
    pub team_done: usize,
    /// Rankings wanted: prompts × overlap.
    pub team_needed: usize,
    pub prompts: usize,
    pub overlap: usize,
}

pub struct Book {
    input: PathBuf,
    out: PathBuf,
    items: Vec<Candidates>,
    overlap: usize,
    /// For each prompt, the labellers whose ranking of it is in the output.
    done: Vec<Vec<String>>,
    /// The prompt each labeller is working on, and since when.
    claims: HashMap<String, (usize, Instant)>,
    skipped: HashMap<String, HashSet<usize>>,
    /// Every ranking in the output, in order (for the status page).
    lines: Vec<PreferenceLine>,
    file: File,
    /// The output's length after the last whole answer: a failed write is cut back to it.
    len: u64,
}

/// The candidates and the rankings already in `out`, matched up (nothing is written).
struct Loaded {
    items: Vec<Candidates>,
    done: Vec<Vec<String>>,
    lines: Vec<PreferenceLine>,
}

fn load(input: &Path, out: &Path, text: &str) -> Result<Loaded> {
    let items: Vec<Candidates> = read_candidates(input)?
        .into_iter()
        .map(|(_, c)| c)
        .collect();
    if items.is_empty() {
        return Err(err(format!("{}: no prompts to rank", input.display())));
    }
    let mut by_key: HashMap<Key, Vec<usize>> = HashMap::new();
    for (i, c) in items.iter().enumerate() {
        by_key
            .entry(key(&c.prompt, &c.responses))
            .or_default()
            .push(i);
    }
    let mut done = vec![Vec::<String>::new(); items.len()];
    let mut lines = vec![];
    for (n, text) in text.lines().enumerate() {
        if text.trim().is_empty() {
            continue;
        }
        let line: PreferenceLine = serde_json::from_str(text).map_err(|e| {
            err(format!(
                "{}:{}: not a ranking ({e}); --out must be a rankings file (`candor label` or `candor rank` output)",
                out.display(),
                n + 1
            ))
        })?;
        let responses = line
            .responses
            .clone()
            .or_else(|| Some(vec![line.chosen.clone()?, line.rejected.clone()?]))
            .unwrap_or_default();
        let who = line.labeller.as_deref().unwrap_or(UNNAMED);
        // the first copy of this prompt the labeller has not ranked yet; a ranking of a
        // prompt not among the candidates is kept (for the status page) but fills nothing
        if let Some(ids) = by_key.get(&key(&line.prompt, &responses)) {
            if let Some(&i) = ids.iter().find(|&&i| !done[i].iter().any(|d| d == who)) {
                done[i].push(who.to_string());
            }
        }
        lines.push(line);
    }
    Ok(Loaded { items, done, lines })
}

/// How many rankings `out` still needs so that every prompt of `input` is ranked by
/// `overlap` different labellers, and how many that is in all. Reads only; a torn last
/// line counts as missing.
pub fn remaining(input: &Path, out: &Path, overlap: usize) -> Result<(usize, usize)> {
    let text = match std::fs::read_to_string(out) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(err(format!("{}: {e}", out.display()))),
    };
    let whole = match text.rfind('\n') {
        Some(i) => &text[..=i],
        None => "",
    };
    let loaded = load(input, out, whole)?;
    let needed = loaded.items.len() * overlap;
    let have: usize = loaded.done.iter().map(|d| d.len().min(overlap)).sum();
    Ok((needed - have, needed))
}

impl Book {
    /// Read the candidates and the rankings already in `out` (cutting off a last line torn
    /// by a crash), and open `out` for appending, locked against a second server.
    pub fn open(input: &Path, out: &Path, overlap: usize) -> Result<Book> {
        if overlap == 0 {
            return Err(err("--overlap: must be at least 1"));
        }
        if input == out {
            return Err(err(format!(
                "--out {}: must differ from --in (answers are appended to it)",
                out.display()
            )));
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(out)
            .map_err(|e| err(format!("{}: cannot open for appending: {e}", out.display())))?;
        lock(&file, out)?;
        let (text, cut) = candor_data::jsonl::repair_tail::<PreferenceLine>(out)?;
        if cut {
            eprintln!(
                "[label] {}: removed an incomplete last line (an answer cut off mid-write); its prompt is asked again",
                out.display()
            );
        }
        let len = text.len() as u64;
        let Loaded { items, done, lines } = load(input, out, &text)?;
        Ok(Book {
            input: input.to_path_buf(),
            out: out.to_path_buf(),
            items,
            overlap,
            done,
            claims: HashMap::new(),
            skipped: HashMap::new(),
            lines,
            file,
            len,
        })
    }

    pub fn input(&self) -> &Path {
        &self.input
    }

    pub fn out(&self) -> &Path {
        &self.out
    }

    pub fn item(&self, id: usize) -> &Candidates {
        &self.items[id]
    }

    pub fn lines(&self) -> &[PreferenceLine] {
        &self.lines
    }

    pub fn overlap(&self) -> usize {
        self.overlap
    }

    fn ranked_by(&self, id: usize, who: &str) -> bool {
        self.done[id].iter().any(|d| d == who)
    }

    fn skipped_by(&self, id: usize, who: &str) -> bool {
        self.skipped.get(who).is_some_and(|s| s.contains(&id))
    }

    /// The prompt to show `who` next, reserved for them: the one they are working on, else
    /// the first that they have neither ranked nor skipped and that fewer than `overlap`
    /// others have ranked or are working on.
    pub fn next(&mut self, who: &str, now: Instant) -> Option<usize> {
        if let Some(&(id, since)) = self.claims.get(who) {
            if now.duration_since(since) < CLAIM
                && !self.ranked_by(id, who)
                && !self.skipped_by(id, who)
            {
                self.claims.insert(who.to_string(), (id, now));
                return Some(id);
            }
        }
        self.claims.remove(who);
        let id = (0..self.items.len()).find(|&id| {
            let working = self
                .claims
                .values()
                .filter(|&&(c, since)| c == id && now.duration_since(since) < CLAIM)
                .count();
            !self.ranked_by(id, who)
                && !self.skipped_by(id, who)
                && self.done[id].len() + working < self.overlap
        })?;
        self.claims.insert(who.to_string(), (id, now));
        Some(id)
    }

    /// `who` leaves prompt `id` (until the server restarts); another labeller may take it.
    pub fn skip(&mut self, who: &str, id: usize) -> Result<(), Refusal> {
        if id >= self.items.len() {
            return Err(Refusal::Bad(format!("no prompt with id {id}")));
        }
        self.skipped.entry(who.to_string()).or_default().insert(id);
        if self.claims.get(who).is_some_and(|&(c, _)| c == id) {
            self.claims.remove(who);
        }
        Ok(())
    }

    /// Check an answer and turn it into the line written to the output.
    pub fn line_for(&self, who: &str, a: &Answer) -> Result<PreferenceLine, Refusal> {
        let bad = |m: String| Err(Refusal::Bad(m));
        let Some(c) = self.items.get(a.id) else {
            return bad(format!("no prompt with id {}", a.id));
        };
        let k = c.responses.len();
        let order: Vec<usize> = a.order.iter().flatten().copied().collect();
        let mut seen = vec![false; k];
        for &i in &order {
            if i >= k || std::mem::replace(&mut seen[i], true) {
                return bad(format!(
                    "order: each of the {k} responses (0..{}) exactly once",
                    k - 1
                ));
            }
        }
        if order.len() != k || a.order.iter().any(Vec::is_empty) {
            return bad(format!(
                "order: each of the {k} responses exactly once, in non-empty groups"
            ));
        }
        let flags = match a.flags.len() {
            0 => vec![vec![]; k],
            n if n == k => a.flags.clone(),
            n => return bad(format!("flags: {n} lists for {k} responses")),
        };
        for f in flags.iter().flatten() {
            if !FLAGS.contains(&f.as_str()) {
                return bad(format!("flags: `{f}` is not one of {}", FLAGS.join(", ")));
            }
        }
        if flags
            .iter()
            .any(|f| f.iter().enumerate().any(|(i, x)| f[..i].contains(x)))
        {
            return bad("flags: a flag is given twice for one response".into());
        }
        if a.comment.chars().count() > MAX_COMMENT {
            return bad(format!("comment: at most {MAX_COMMENT} characters"));
        }
        if !a.seconds.is_finite() || a.seconds < 0.0 {
            return bad("seconds: a number ≥ 0".into());
        }
        let ranks = a
            .order
            .iter()
            .enumerate()
            .flat_map(|(g, members)| std::iter::repeat_n(g as u32 + 1, members.len()))
            .collect();
        Ok(PreferenceLine {
            prompt: c.prompt.clone(),
            responses: Some(order.iter().map(|&i| c.responses[i].clone()).collect()),
            ranks: Some(ranks),
            reference: c.reference.clone(),
            labeller: Some(who.to_string()),
            seconds: Some((a.seconds * 10.0).round() / 10.0),
            flags: Some(order.iter().map(|&i| flags[i].clone()).collect()),
            comment: Some(a.comment.clone()),
            ..Default::default()
        })
    }

    /// Write `who`'s answer: appended and fsynced before this returns `Ok`.
    pub fn submit(&mut self, who: &str, a: &Answer) -> Result<(), Refusal> {
        let line = self.line_for(who, a)?;
        if self.ranked_by(a.id, who) {
            return Err(Refusal::AlreadyRanked);
        }
        let mut bytes = serde_json::to_vec(&line).map_err(|e| Refusal::Io(e.to_string()))?;
        bytes.push(b'\n');
        if let Err(e) = self
            .file
            .write_all(&bytes)
            .and_then(|()| self.file.sync_data())
        {
            // cut a partly written line back off, so the next answer starts a whole line
            let _ = self.file.set_len(self.len);
            return Err(Refusal::Io(format!("{}: {e}", self.out.display())));
        }
        self.len += bytes.len() as u64;
        self.done[a.id].push(who.to_string());
        if self.claims.get(who).is_some_and(|&(c, _)| c == a.id) {
            self.claims.remove(who);
        }
        self.lines.push(line);
        Ok(())
    }

    pub fn progress(&self, who: &str) -> Progress {
        let n = self.items.len();
        Progress {
            mine: (0..n).filter(|&i| self.ranked_by(i, who)).count(),
            skipped: self.skipped.get(who).map_or(0, HashSet::len),
            open: (0..n)
                .filter(|&i| {
                    !self.ranked_by(i, who)
                        && !self.skipped_by(i, who)
                        && self.done[i].len() < self.overlap
                })
                .count(),
            team_done: self.done.iter().map(|d| d.len().min(self.overlap)).sum(),
            team_needed: n * self.overlap,
            prompts: n,
            overlap: self.overlap,
        }
    }
}

/// Hold an exclusive advisory lock on the output for as long as the file is open, so that
/// two servers (or a server and `candor rank`) never append to one file together.
#[cfg(unix)]
fn lock(file: &File, path: &Path) -> Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: flock only reads the descriptor number, which `file` keeps open for the call.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        return Err(err(format!(
            "{}: another `candor label serve` is writing to it (two writers must not share an output)",
            path.display()
        )));
    }
    Ok(())
}

#[cfg(not(unix))]
fn lock(_file: &File, _path: &Path) -> Result<()> {
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup(cands: &[&str]) -> (tempfile::TempDir, PathBuf, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("cand.jsonl");
        std::fs::write(&input, cands.join("\n") + "\n").unwrap();
        let out = dir.path().join("ranked.jsonl");
        (dir, input, out)
    }

    fn answer(id: usize, order: Vec<Vec<usize>>) -> Answer {
        Answer {
            id,
            order,
            flags: vec![],
            comment: String::new(),
            seconds: 1.0,
        }
    }

    const CANDS: [&str; 3] = [
        r#"{"prompt": "p0", "responses": ["a", "b"]}"#,
        r#"{"prompt": "p1", "responses": ["c", "d", "e"]}"#,
        r#"{"prompt": "p2", "responses": ["f", "g"]}"#,
    ];

    #[test]
    fn overlap_hands_each_prompt_to_that_many_labellers_and_claims_hold() {
        let (_d, input, out) = setup(&CANDS);
        let mut b = Book::open(&input, &out, 2).unwrap();
        let t = Instant::now();
        assert_eq!(b.next("ana", t), Some(0));
        assert_eq!(b.next("ana", t), Some(0), "a reload shows the same prompt");
        assert_eq!(b.next("ben", t), Some(0), "overlap 2: ben gets it too");
        assert_eq!(b.next("cy", t), Some(1), "p0 has two people on it");
        assert_eq!(
            b.next("cy", t + CLAIM + Duration::from_secs(1)),
            Some(0),
            "claims on p0 expired"
        );
        b.submit("ana", &answer(0, vec![vec![1], vec![0]])).unwrap();
        assert_eq!(
            b.submit("ana", &answer(0, vec![vec![0, 1]])),
            Err(Refusal::AlreadyRanked)
        );
        assert_eq!(b.next("ana", t), Some(1));
        b.skip("ana", 1).unwrap();
        assert_eq!(b.next("ana", t), Some(2));
        let p = b.progress("ana");
        assert_eq!(
            (p.mine, p.skipped, p.open, p.team_done, p.team_needed),
            (1, 1, 1, 1, 6)
        );
        assert_eq!(remaining(&input, &out, 2).unwrap(), (5, 6));
    }

    #[test]
    fn bad_answers_are_refused_with_a_reason() {
        let (_d, input, out) = setup(&CANDS);
        let b = Book::open(&input, &out, 1).unwrap();
        let mut flagged = answer(1, vec![vec![2], vec![0, 1]]);
        flagged.flags = vec![vec![], vec!["harmful".into()], vec![]];
        let line = b.line_for("ana", &flagged).unwrap();
        assert_eq!(line.responses.unwrap(), vec!["e", "c", "d"]);
        assert_eq!(line.ranks.unwrap(), vec![1, 2, 2]);
        assert_eq!(
            line.flags.unwrap(),
            vec![vec![], vec![], vec!["harmful".to_string()]]
        );
        for (a, want) in [
            (answer(9, vec![vec![0, 1]]), "no prompt with id 9"),
            (answer(1, vec![vec![0], vec![1]]), "exactly once"),
            (
                answer(1, vec![vec![0], vec![1, 1], vec![2]]),
                "exactly once",
            ),
            (answer(1, vec![vec![0], vec![], vec![1, 2]]), "non-empty"),
            (
                Answer {
                    flags: vec![vec!["rude".into()], vec![]],
                    ..answer(0, vec![vec![0], vec![1]])
                },
                "`rude` is not one of",
            ),
            (
                Answer {
                    seconds: -1.0,
                    ..answer(0, vec![vec![0], vec![1]])
                },
                "seconds",
            ),
        ] {
            match b.line_for("ana", &a) {
                Err(Refusal::Bad(m)) => assert!(m.contains(want), "{m}"),
                other => panic!("{a:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn a_second_server_on_the_same_output_is_refused() {
        let (_d, input, out) = setup(&CANDS);
        let _first = Book::open(&input, &out, 1).unwrap();
        let e = Book::open(&input, &out, 1).err().unwrap().to_string();
        assert!(e.contains("another `candor label serve`"), "{e}");
    }
}
