//! `reference`: agreement of the response with the prompt line's `reference` answer.
//!
//! Both are normalised (lower case, punctuation to spaces, whitespace collapsed). An exact
//! match scores 1; otherwise the score is 0.9 × the token F1 of SQuAD (Rajpurkar et al. 2016:
//! the harmonic mean of token precision and recall over token multisets). The 0.9 keeps any
//! exact answer above every inexact one, including a reordering of the right tokens
//! (`3 1 2` for a sort whose answer is `1 2 3` has F1 = 1).

use std::collections::HashMap;

use crate::{Error, Judge, Result, Sample};

pub struct ReferenceJudge;

/// Lower case, every non-alphanumeric character a space, whitespace collapsed.
pub fn normalise(text: &str) -> String {
    let spaced: String = text
        .chars()
        .map(|c| if c.is_alphanumeric() { c } else { ' ' })
        .collect();
    spaced
        .to_lowercase()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

/// SQuAD token F1 between two normalised strings (0 when either has no tokens).
pub fn token_f1(a: &str, b: &str) -> f64 {
    let mut counts: HashMap<&str, i64> = HashMap::new();
    for t in b.split_whitespace() {
        *counts.entry(t).or_default() += 1;
    }
    let (na, nb) = (a.split_whitespace().count(), b.split_whitespace().count());
    let mut common = 0;
    for t in a.split_whitespace() {
        if let Some(c) = counts.get_mut(t) {
            if *c > 0 {
                *c -= 1;
                common += 1;
            }
        }
    }
    if common == 0 {
        return 0.0;
    }
    let (p, r) = (common as f64 / na as f64, common as f64 / nb as f64);
    2.0 * p * r / (p + r)
}

impl Judge for ReferenceJudge {
    fn name(&self) -> &str {
        "reference"
    }

    fn needs(&self) -> &[&str] {
        &["reference"]
    }

    fn score(&self, sample: &Sample) -> Result<f64> {
        let response = sample.response;
        let reference = sample.text_field("reference").ok_or_else(|| {
            Error::Msg("judge `reference` needs a `reference` field (the expected answer) on every prompt line".into())
        })?;
        let (r, a) = (normalise(response), normalise(&reference));
        Ok(if r == a { 1.0 } else { 0.9 * token_f1(&r, &a) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_match_after_normalisation_scores_one() {
        let j = ReferenceJudge;
        assert_eq!(
            crate::score_with_reference(&j, "What is 15 + 24?", " 39. ", Some("39")).unwrap(),
            1.0
        );
        assert_eq!(
            crate::score_with_reference(
                &j,
                "p",
                "Sea (noun): a large body of salt water.",
                Some("sea (noun):  a large body of salt water")
            )
            .unwrap(),
            1.0
        );
    }

    #[test]
    fn inexact_answers_get_token_f1_by_hand() {
        let j = ReferenceJudge;
        // response "the cat sat" vs reference "the cat sat down": common 3, P = 1, R = 3/4,
        // F1 = 2·(3/4)/(7/4) = 6/7
        let s =
            crate::score_with_reference(&j, "p", "The cat sat", Some("the cat sat down")).unwrap();
        assert!((s - 0.9 * 6.0 / 7.0).abs() < 1e-12, "{s}");
        // a reordering has F1 = 1 but stays below an exact answer
        assert!(
            (crate::score_with_reference(&j, "p", "3 1 2", Some("1 2 3")).unwrap() - 0.9).abs()
                < 1e-12
        );
        // repeated tokens count once per occurrence: "a a a" vs "a b": common 1, P 1/3, R 1/2
        let s = crate::score_with_reference(&j, "p", "a a a", Some("a b")).unwrap();
        assert!((s - 0.9 * 0.4).abs() < 1e-12, "{s}");
        assert_eq!(
            crate::score_with_reference(&j, "p", "", Some("39")).unwrap(),
            0.0
        );
        assert_eq!(
            crate::score_with_reference(&j, "p", "forty", Some("39")).unwrap(),
            0.0
        );
    }

    #[test]
    fn missing_reference_is_a_clear_error() {
        let e = crate::score_with_reference(&ReferenceJudge, "p", "r", None)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("needs a `reference` field"), "{e}");
    }
}
