//! Rankings of K candidate responses, best first, with ties.
//!
//! A [`Ranking`] is a list of groups of response indices (0-based), best group first; a
//! group of two or more is a tie. Written out, the responses go best → worst and `ranks`
//! gives each one's dense rank (1 = best; equal numbers are tied): the order `3 1=2 4`
//! over responses 1..4 is `responses: [r3, r1, r2, r4]`, `ranks: [1, 2, 2, 3]`.

use crate::{Error, Result};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ranking {
    /// Response indices (0-based), best group first; a group of several is a tie.
    pub groups: Vec<Vec<usize>>,
}

impl Ranking {
    /// The response indices best → worst (tied ones in the order given).
    pub fn order(&self) -> Vec<usize> {
        self.groups.iter().flatten().copied().collect()
    }

    /// Dense ranks aligned with [`order`](Self::order): 1 for the best group, then 2, ...
    pub fn ranks(&self) -> Vec<u32> {
        self.groups
            .iter()
            .enumerate()
            .flat_map(|(g, members)| std::iter::repeat_n(g as u32 + 1, members.len()))
            .collect()
    }

    /// Number of tied groups (groups of two or more).
    pub fn ties(&self) -> usize {
        self.groups.iter().filter(|g| g.len() > 1).count()
    }
}

/// What a person typed at the ranking prompt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer {
    Order(Ranking),
    /// `s`: leave this prompt for later (it is asked again next time).
    Skip,
    /// `q`: stop here; everything answered so far is saved.
    Quit,
}

/// Parse one typed line for K responses: `s`, `q`, or an order of the numbers 1..=K, best
/// first, separated by spaces or commas, `=` joining tied ones (`3 1=2 4`, `3, 1 = 2, 4`).
/// The error says what is wrong, for the person to try again.
pub fn parse_answer(line: &str, k: usize) -> Result<Answer, String> {
    match line.trim().to_lowercase().as_str() {
        "s" | "skip" => return Ok(Answer::Skip),
        "q" | "quit" => return Ok(Answer::Quit),
        _ => {}
    }
    parse_order(line, k).map(Answer::Order)
}

/// Parse an order of the response numbers 1..=K (see [`parse_answer`]).
pub fn parse_order(text: &str, k: usize) -> Result<Ranking, String> {
    let example = if k >= 3 {
        "`2 1 3`, or `2 1=3` for a tie"
    } else {
        "`2 1`, or `1=2` for a tie"
    };
    let mut groups: Vec<Vec<usize>> = vec![];
    let mut tie_next = false; // the last thing seen was `=`
    let mut rest = text.trim();
    if rest.is_empty() {
        return Err(format!(
            "type the response numbers best first, e.g. {example} (s = skip, q = quit)"
        ));
    }
    while !rest.is_empty() {
        let c = rest.chars().next().unwrap();
        if c.is_whitespace() || c == ',' {
            rest = &rest[c.len_utf8()..];
        } else if c == '=' {
            if groups.is_empty() || tie_next {
                return Err(
                    "`=` must stand between two response numbers (`1=2` ties 1 and 2)".into(),
                );
            }
            tie_next = true;
            rest = &rest[1..];
        } else {
            let end = rest
                .find(|c: char| c.is_whitespace() || c == ',' || c == '=')
                .unwrap_or(rest.len());
            let token = &rest[..end];
            let n: usize = token
                .parse()
                .map_err(|_| format!("`{token}` is not a response number; type the numbers 1 to {k} best first, e.g. {example}"))?;
            if n == 0 || n > k {
                return Err(format!(
                    "there is no response {n}: the responses are numbered 1 to {k}"
                ));
            }
            if groups.iter().flatten().any(|&i| i == n - 1) {
                return Err(format!(
                    "response {n} is listed twice: list each of the {k} responses once"
                ));
            }
            if tie_next {
                groups.last_mut().unwrap().push(n - 1);
                tie_next = false;
            } else {
                groups.push(vec![n - 1]);
            }
            rest = &rest[end..];
        }
    }
    if tie_next {
        return Err("`=` must stand between two response numbers (`1=2` ties 1 and 2)".into());
    }
    let seen: Vec<usize> = groups.iter().flatten().copied().collect();
    if let Some(missing) = (0..k).find(|i| !seen.contains(i)) {
        return Err(format!(
            "response {} is missing: rank all {k} responses, e.g. {example}",
            missing + 1
        ));
    }
    Ok(Ranking { groups })
}

/// Rank responses by score, highest first; equal scores are tied. Ties keep the input order.
pub fn rank_by_scores(scores: &[f64]) -> Result<Ranking> {
    if let Some(i) = scores.iter().position(|s| !s.is_finite()) {
        return Err(Error::Msg(format!(
            "response {} has score {}: a judge must give finite scores",
            i + 1,
            scores[i]
        )));
    }
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    idx.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
    let mut groups: Vec<Vec<usize>> = vec![];
    for i in idx {
        match groups.last_mut() {
            Some(g) if scores[g[0]] == scores[i] => g.push(i),
            _ => groups.push(vec![i]),
        }
    }
    Ok(Ranking { groups })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn order(text: &str, k: usize) -> Ranking {
        parse_order(text, k).unwrap()
    }

    #[test]
    fn a_typed_order_with_a_tie_gives_responses_best_first_and_dense_ranks() {
        let r = order("3 1=2 4", 4);
        assert_eq!(r.groups, vec![vec![2], vec![0, 1], vec![3]]);
        assert_eq!(r.order(), vec![2, 0, 1, 3]);
        assert_eq!(r.ranks(), vec![1, 2, 2, 3]);
        assert_eq!(r.ties(), 1);
        // spaces around `=`, commas
        assert_eq!(order(" 3, 1 = 2 ,4 ", 4), r);
        assert_eq!(order("2 1", 2).ranks(), vec![1, 2]);
        assert_eq!(order("1=2=3", 3).ranks(), vec![1, 1, 1]);
    }

    #[test]
    fn orders_that_are_not_permutations_are_refused_with_the_reason() {
        let e = |t: &str| parse_order(t, 4).unwrap_err();
        assert!(
            e("3 1 2").contains("response 4 is missing"),
            "{}",
            e("3 1 2")
        );
        assert!(e("3 1 2 2 4").contains("response 2 is listed twice"));
        assert!(e("3 1 2 5").contains("there is no response 5: the responses are numbered 1 to 4"));
        assert!(e("0 1 2 3").contains("there is no response 0"));
        assert!(e("3 x 2 4").contains("`x` is not a response number"));
        assert!(e("1 -2 3 4").contains("`-2` is not a response number"));
        assert!(e("=1 2 3 4").contains("`=` must stand between"));
        assert!(e("1 2 3 4=").contains("`=` must stand between"));
        assert!(e("1==2 3 4").contains("`=` must stand between"));
        assert!(e("").contains("best first"));
    }

    #[test]
    fn skip_and_quit() {
        assert_eq!(parse_answer(" s ", 3), Ok(Answer::Skip));
        assert_eq!(parse_answer("Q", 3), Ok(Answer::Quit));
        assert_eq!(
            parse_answer("2 3 1", 3),
            Ok(Answer::Order(order("2 3 1", 3)))
        );
        assert!(parse_answer("sq", 3).is_err());
    }

    #[test]
    fn scores_rank_highest_first_and_equal_scores_tie() {
        let r = rank_by_scores(&[0.2, 0.9, 0.2, -0.5]).unwrap();
        assert_eq!(r.groups, vec![vec![1], vec![0, 2], vec![3]]);
        assert_eq!(r.ranks(), vec![1, 2, 2, 3]);
        assert_eq!(rank_by_scores(&[0.0, 0.0]).unwrap().ranks(), vec![1, 1]);
        assert!(rank_by_scores(&[0.0, f64::NAN])
            .unwrap_err()
            .to_string()
            .contains("response 2 has score NaN"));
    }
}
