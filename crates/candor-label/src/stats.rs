//! What a team's rankings say: per-labeller counts and time, how often two labellers order
//! a pair of responses the same way, Kendall's τ-b between them, and the flags raised.
//!
//! Two labellers are compared on the prompts both ranked (the same prompt text and set of
//! responses; a labeller's first ranking of a prompt counts). Each unordered pair of that
//! prompt's responses is *ordered* by a labeller as better, worse or tied:
//!
//! - **agreement** is the share of pairs both order the same way (a tie matches a tie);
//! - **τ-b** (Kendall 1945, the variant that corrects for ties) over the same pairs:
//!   τ_b = (C − D) / √((n₀ − n₁)(n₀ − n₂)), C and D the pairs ordered alike and oppositely
//!   (neither tied), n₀ all pairs, n₁ and n₂ the pairs each labeller tied; undefined when
//!   either labeller tied every pair.
//!
//! The team line pools the pairs of every two labellers for agreement, and weights each
//! two labellers' τ-b by their number of pairs.

use std::cmp::Ordering;
use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::path::Path;

use candor_data::jsonl::read_jsonl;
use candor_data::preference::PreferenceLine;
use serde::Serialize;

use crate::book::{FLAGS, UNNAMED};
use crate::Result;

/// One labeller's work.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct LabellerStats {
    pub name: String,
    pub rankings: usize,
    /// Rankings with at least one tie.
    pub with_ties: usize,
    /// Total and median seconds per ranking (over the rankings that record it).
    pub seconds: f64,
    pub median_seconds: Option<f64>,
    /// Flags raised, by flag.
    pub flags: BTreeMap<String, usize>,
    pub comments: usize,
}

/// How two labellers (or the whole team) agree.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Agreement {
    pub a: String,
    pub b: String,
    /// Prompts both ranked.
    pub prompts: usize,
    /// Response pairs compared (over those prompts).
    pub pairs: usize,
    /// Share of the pairs ordered the same way.
    pub agreement: Option<f64>,
    /// Kendall's τ-b over the pairs.
    pub tau_b: Option<f64>,
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Stats {
    pub rankings: usize,
    /// Distinct prompts (prompt text and set of responses) ranked.
    pub prompts: usize,
    pub labellers: Vec<LabellerStats>,
    /// Every two labellers who ranked a prompt in common.
    pub pairwise: Vec<Agreement>,
    /// All of those pooled (`a` = `b` = "team"); absent without two such labellers.
    pub team: Option<Agreement>,
    pub flags: BTreeMap<String, usize>,
}

/// Pair counts of two labellers over their shared prompts.
#[derive(Clone, Copy, Default)]
struct Counts {
    prompts: usize,
    pairs: usize,
    same: usize,
    concordant: usize,
    discordant: usize,
    tied_a: usize,
    tied_b: usize,
}

impl Counts {
    fn tau_b(&self) -> Option<f64> {
        let denominator =
            ((self.pairs - self.tied_a) as f64 * (self.pairs - self.tied_b) as f64).sqrt();
        (denominator > 0.0).then(|| (self.concordant as f64 - self.discordant as f64) / denominator)
    }

    fn agreement(&self) -> Option<f64> {
        (self.pairs > 0).then(|| self.same as f64 / self.pairs as f64)
    }
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

/// A ranking as each response's rank, and its prompt's key.
type Key = (String, Vec<String>);

fn ranked(line: &PreferenceLine) -> Option<(Key, HashMap<String, u32>)> {
    let (responses, ranks) = match (&line.responses, &line.chosen, &line.rejected) {
        (Some(r), _, _) => (
            r.clone(),
            line.ranks
                .clone()
                .unwrap_or_else(|| (1..=r.len() as u32).collect()),
        ),
        (None, Some(c), Some(w)) => (vec![c.clone(), w.clone()], vec![1, 2]),
        _ => return None,
    };
    if ranks.len() != responses.len() {
        return None;
    }
    let mut set = responses.clone();
    set.sort();
    let by_response = responses.into_iter().zip(ranks).collect();
    Some(((line.prompt.clone(), set), by_response))
}

/// The figures of a set of rankings (the lines of a rankings file, in order).
pub fn stats(lines: &[PreferenceLine]) -> Stats {
    let mut order: Vec<String> = vec![];
    let mut work: HashMap<String, (LabellerStats, Vec<f64>)> = HashMap::new();
    let mut rankings: HashMap<String, HashMap<Key, HashMap<String, u32>>> = HashMap::new();
    let mut prompts: Vec<Key> = vec![];
    let mut flags: BTreeMap<String, usize> = FLAGS.iter().map(|f| (f.to_string(), 0)).collect();
    for line in lines {
        let who = line.labeller.clone().unwrap_or_else(|| UNNAMED.to_string());
        if !work.contains_key(&who) {
            order.push(who.clone());
        }
        let (s, seconds) = work.entry(who.clone()).or_insert_with(|| {
            (
                LabellerStats {
                    name: who.clone(),
                    rankings: 0,
                    with_ties: 0,
                    seconds: 0.0,
                    median_seconds: None,
                    flags: FLAGS.iter().map(|f| (f.to_string(), 0)).collect(),
                    comments: 0,
                },
                vec![],
            )
        });
        s.rankings += 1;
        if let Some(t) = line.seconds {
            s.seconds += t;
            seconds.push(t);
        }
        if line
            .comment
            .as_deref()
            .is_some_and(|c| !c.trim().is_empty())
        {
            s.comments += 1;
        }
        for f in line.flags.iter().flatten().flatten() {
            *s.flags.entry(f.clone()).or_default() += 1;
            *flags.entry(f.clone()).or_default() += 1;
        }
        if let Some((key, by_response)) = ranked(line) {
            let mut r: Vec<u32> = by_response.values().copied().collect();
            r.sort();
            if r.windows(2).any(|w| w[0] == w[1]) {
                s.with_ties += 1;
            }
            if !prompts.contains(&key) {
                prompts.push(key.clone());
            }
            rankings
                .entry(who)
                .or_default()
                .entry(key)
                .or_insert(by_response);
        }
    }

    let mut pairwise = vec![];
    let mut team = Counts::default();
    let mut weighted_tau = (0.0, 0usize);
    for (i, a) in order.iter().enumerate() {
        for b in &order[i + 1..] {
            let (Some(ra), Some(rb)) = (rankings.get(a), rankings.get(b)) else {
                continue;
            };
            let mut c = Counts::default();
            for (key, x) in ra {
                let Some(y) = rb.get(key) else { continue };
                c.prompts += 1;
                let set = &key.1;
                for (p, r) in set.iter().enumerate() {
                    for s in &set[p + 1..] {
                        let sa = x[r].cmp(&x[s]);
                        let sb = y[r].cmp(&y[s]);
                        c.pairs += 1;
                        c.same += (sa == sb) as usize;
                        c.tied_a += (sa == Ordering::Equal) as usize;
                        c.tied_b += (sb == Ordering::Equal) as usize;
                        if sa != Ordering::Equal && sb != Ordering::Equal {
                            if sa == sb {
                                c.concordant += 1;
                            } else {
                                c.discordant += 1;
                            }
                        }
                    }
                }
            }
            if c.prompts == 0 {
                continue;
            }
            team.prompts += c.prompts;
            team.pairs += c.pairs;
            team.same += c.same;
            if let Some(t) = c.tau_b() {
                weighted_tau.0 += t * c.pairs as f64;
                weighted_tau.1 += c.pairs;
            }
            pairwise.push(Agreement {
                a: a.clone(),
                b: b.clone(),
                prompts: c.prompts,
                pairs: c.pairs,
                agreement: c.agreement(),
                tau_b: c.tau_b(),
            });
        }
    }
    let team = (!pairwise.is_empty()).then(|| Agreement {
        a: "team".into(),
        b: "team".into(),
        prompts: team.prompts,
        pairs: team.pairs,
        agreement: team.agreement(),
        tau_b: (weighted_tau.1 > 0).then(|| weighted_tau.0 / weighted_tau.1 as f64),
    });
    let labellers = order
        .iter()
        .map(|name| {
            let (mut s, seconds) = work.remove(name).unwrap();
            s.median_seconds = median(seconds);
            s
        })
        .collect();
    Stats {
        rankings: lines.len(),
        prompts: prompts.len(),
        labellers,
        pairwise,
        team,
        flags,
    }
}

/// Read a rankings file and compute its figures.
pub fn read_stats(path: &Path) -> Result<Stats> {
    let lines: Vec<PreferenceLine> = read_jsonl(path)?.into_iter().map(|(_, l)| l).collect();
    Ok(stats(&lines))
}

fn fmt_opt(x: Option<f64>, digits: usize) -> String {
    x.map_or("-".into(), |v| format!("{v:.digits$}"))
}

impl Stats {
    /// The figures as a plain-text report.
    pub fn render(&self) -> String {
        let mut o = String::new();
        let _ = writeln!(
            o,
            "{} rankings of {} prompts by {} labellers",
            self.rankings,
            self.prompts,
            self.labellers.len()
        );
        let _ = writeln!(
            o,
            "\n{:<16} {:>8} {:>10} {:>10} {:>6} {:>8} {:>10} {:>9} {:>8}",
            "labeller",
            "rankings",
            "seconds",
            "median s",
            "ties",
            "harmful",
            "untruthful",
            "off_topic",
            "comments"
        );
        for l in &self.labellers {
            let f = |k: &str| l.flags.get(k).copied().unwrap_or(0);
            let _ = writeln!(
                o,
                "{:<16} {:>8} {:>10.1} {:>10} {:>6} {:>8} {:>10} {:>9} {:>8}",
                l.name,
                l.rankings,
                l.seconds,
                fmt_opt(l.median_seconds, 1),
                l.with_ties,
                f("harmful"),
                f("untruthful"),
                f("off_topic"),
                l.comments
            );
        }
        if self.pairwise.is_empty() {
            let _ = writeln!(
                o,
                "\nno prompt was ranked by two labellers: no agreement figures"
            );
        } else {
            let _ = writeln!(
                o,
                "\nagreement on the prompts both ranked (share of response pairs ordered the same; Kendall's tau-b over those pairs)"
            );
            let _ = writeln!(
                o,
                "{:<35} {:>7} {:>6} {:>9} {:>6}",
                "labellers", "prompts", "pairs", "agreement", "tau-b"
            );
            for a in self.pairwise.iter().chain(&self.team) {
                let who = if a.a == "team" {
                    "team (pooled; tau-b pair-weighted)".to_string()
                } else {
                    format!("{} / {}", a.a, a.b)
                };
                let _ = writeln!(
                    o,
                    "{:<35} {:>7} {:>6} {:>9} {:>6}",
                    who,
                    a.prompts,
                    a.pairs,
                    fmt_opt(a.agreement, 3),
                    fmt_opt(a.tau_b, 3)
                );
            }
        }
        let flags: Vec<String> = self.flags.iter().map(|(k, v)| format!("{k} {v}")).collect();
        let _ = writeln!(o, "\nflags: {}", flags.join(", "));
        o
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(
        who: &str,
        prompt: &str,
        responses: &[&str],
        ranks: &[u32],
        secs: f64,
    ) -> PreferenceLine {
        PreferenceLine {
            prompt: prompt.into(),
            responses: Some(responses.iter().map(|s| s.to_string()).collect()),
            ranks: Some(ranks.to_vec()),
            labeller: Some(who.into()),
            seconds: Some(secs),
            ..Default::default()
        }
    }

    /// Three labellers, three prompts, known answers. Each unordered pair of a prompt's
    /// responses (in sorted order) gets the sign of rank(first) − rank(second): − the first
    /// is better, + worse, 0 tied.
    ///
    /// ```text
    /// P1 {a,b,c}  pairs ab ac bc     ana a>b>c  − − −    ben a>c>b  − − +    cy a=b>c  0 − −
    /// P2 {x,y}    pair  xy           ana x>y    −        ben y>x    +
    /// P3 {p,q,r,s} pairs pq pr ps qr qs rs       ana p>q>r>s  − − − − − −    cy q>p>r=s  + − − − − 0
    ///
    /// ana/ben: P1, P2; 4 pairs. Same: ab ac (2) → agreement 2/4 = 0.5.
    ///          C = 2 (ab ac), D = 2 (bc xy), no ties: τ-b = (2−2)/√(4·4) = 0.
    /// ana/cy:  P1, P3; 3 + 6 = 9 pairs. Same: ac bc pr ps qr qs (6) → 6/9 = 0.6667.
    ///          C = 6, D = 1 (pq), ana ties 0, cy ties 2 (ab, rs):
    ///          τ-b = (6−1)/√((9−0)(9−2)) = 5/√63 = 0.629941.
    /// ben/cy:  P1; 3 pairs. Same: ac (1) → 1/3. C = 1 (ac), D = 1 (bc), cy ties 1 (ab):
    ///          τ-b = 0/√(3·2) = 0.
    /// team:    agreement (2+6+1)/(4+9+3) = 9/16 = 0.5625;
    ///          τ-b weighted by pairs (0·4 + 0.629941·9 + 0·3)/16 = 0.354342.
    /// ```
    /// Seconds: ana 10, 20, 30 (total 60, median 20); ben 5, 7 (12, median 6); cy 40, 50
    /// (90, median 45). Flags: ana marks b harmful on P1; ben marks y untruthful and
    /// off_topic on P2.
    #[test]
    fn agreement_and_tau_b_match_the_hand_computation() {
        let mut lines = vec![
            line("ana", "P1", &["a", "b", "c"], &[1, 2, 3], 10.0),
            line("ben", "P1", &["a", "c", "b"], &[1, 2, 3], 5.0),
            line("cy", "P1", &["a", "b", "c"], &[1, 1, 2], 40.0),
            line("ana", "P2", &["x", "y"], &[1, 2], 20.0),
            line("ben", "P2", &["y", "x"], &[1, 2], 7.0),
            line("ana", "P3", &["p", "q", "r", "s"], &[1, 2, 3, 4], 30.0),
            line("cy", "P3", &["q", "p", "r", "s"], &[1, 2, 3, 3], 50.0),
        ];
        lines[0].flags = Some(vec![vec![], vec!["harmful".into()], vec![]]);
        lines[4].flags = Some(vec![vec!["untruthful".into(), "off_topic".into()], vec![]]);
        lines[4].comment = Some("y is made up".into());
        let s = stats(&lines);
        assert_eq!((s.rankings, s.prompts), (7, 3));
        let close = |x: Option<f64>, want: f64| (x.unwrap() - want).abs() < 1e-6;
        let pair = |a: &str, b: &str| s.pairwise.iter().find(|p| p.a == a && p.b == b).unwrap();
        let ab = pair("ana", "ben");
        assert_eq!((ab.prompts, ab.pairs), (2, 4));
        assert!(close(ab.agreement, 0.5) && close(ab.tau_b, 0.0), "{ab:?}");
        let ac = pair("ana", "cy");
        assert_eq!((ac.prompts, ac.pairs), (2, 9));
        assert!(
            close(ac.agreement, 6.0 / 9.0) && close(ac.tau_b, 0.629941),
            "{ac:?}"
        );
        let bc = pair("ben", "cy");
        assert_eq!((bc.prompts, bc.pairs), (1, 3));
        assert!(
            close(bc.agreement, 1.0 / 3.0) && close(bc.tau_b, 0.0),
            "{bc:?}"
        );
        let team = s.team.as_ref().unwrap();
        assert_eq!(team.pairs, 16);
        assert!(
            close(team.agreement, 0.5625) && close(team.tau_b, 0.354342),
            "{team:?}"
        );
        let who = |n: &str| s.labellers.iter().find(|l| l.name == n).unwrap();
        assert_eq!(
            (
                who("ana").rankings,
                who("ana").seconds,
                who("ana").median_seconds
            ),
            (3, 60.0, Some(20.0))
        );
        assert_eq!(
            (
                who("ben").seconds,
                who("ben").median_seconds,
                who("ben").comments
            ),
            (12.0, Some(6.0), 1)
        );
        assert_eq!(
            (who("cy").with_ties, who("cy").median_seconds),
            (2, Some(45.0))
        );
        assert_eq!(who("ana").flags["harmful"], 1);
        assert_eq!(
            (
                who("ben").flags["untruthful"],
                who("ben").flags["off_topic"]
            ),
            (1, 1)
        );
        assert_eq!(
            s.flags
                .iter()
                .map(|(k, v)| (k.as_str(), *v))
                .collect::<Vec<_>>(),
            vec![("harmful", 1), ("off_topic", 1), ("untruthful", 1)]
        );
        let text = s.render();
        assert!(text.contains("ana / cy"), "{text}");
        assert!(text.contains("0.667  0.630"), "{text}");
    }

    #[test]
    fn tau_b_is_undefined_when_a_labeller_ties_everything() {
        let lines = vec![
            line("ana", "P", &["a", "b"], &[1, 1], 1.0),
            line("ben", "P", &["a", "b"], &[1, 1], 1.0),
        ];
        let s = stats(&lines);
        assert_eq!(s.pairwise[0].agreement, Some(1.0));
        assert_eq!(s.pairwise[0].tau_b, None);
    }
}
