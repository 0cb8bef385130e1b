//! `sentiment`: the VADER compound valence of the response (Hutto & Gilbert 2014, "VADER: A
//! Parsimonious Rule-based Model for Sentiment Analysis of Social Media Text", ICWSM-14).
//!
//! Scoring is the `vader-parity` crate, a transcription of Python vaderSentiment 3.3.2's
//! rules over that package's own lexicon (the same `vader_lexicon.txt` as
//! `data/sentiment/`, MIT), whose compound scores equal Python's to the 4 decimals it
//! rounds to. The test below checks that on `data/sentiment/vader_reference.jsonl`.

use vader_parity::SentimentIntensityAnalyzer;

use crate::{Judge, Result, Sample};

pub struct SentimentJudge {
    analyzer: SentimentIntensityAnalyzer,
}

impl SentimentJudge {
    /// Parses the lexicon (about 11,000 lines) once; build one and score many responses.
    pub fn new() -> Self {
        SentimentJudge {
            analyzer: SentimentIntensityAnalyzer::new(),
        }
    }
}

impl Default for SentimentJudge {
    fn default() -> Self {
        Self::new()
    }
}

impl Judge for SentimentJudge {
    fn name(&self) -> &str {
        "sentiment"
    }

    /// The compound score in [-1, 1] of the response alone; the prompt is not scored.
    fn score(&self, sample: &Sample) -> Result<f64> {
        Ok(self.analyzer.polarity_scores(sample.response).compound)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `compound` of Python vaderSentiment 3.3.2's `SentimentIntensityAnalyzer().polarity_scores`
    /// for 20 sentences (negation, boosters, ALL CAPS, "but", "kind of", emoticons, `!`),
    /// written by `scripts/data/fetch_vader.sh`.
    #[test]
    fn matches_python_vader_reference_scores() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../data/sentiment/vader_reference.jsonl"
        );
        let judge = SentimentJudge::new();
        let mut worst = 0.0f64;
        let mut n = 0;
        for line in std::fs::read_to_string(path).unwrap().lines() {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            let (text, want) = (v["text"].as_str().unwrap(), v["compound"].as_f64().unwrap());
            let got = crate::score_with_reference(&judge, "any prompt", text, None).unwrap();
            assert!(
                (got - want).abs() <= 1e-4,
                "{text:?}: got {got}, Python vaderSentiment gives {want}"
            );
            worst = worst.max((got - want).abs());
            n += 1;
        }
        assert_eq!(n, 20);
        eprintln!("vader: {n} reference sentences, worst |error| {worst:e}");
    }

    #[test]
    fn ignores_the_prompt_and_orders_by_valence() {
        let j = SentimentJudge::new();
        let good = crate::score_with_reference(
            &j,
            "Describe a day.",
            "What a wonderful, happy day!",
            None,
        )
        .unwrap();
        let bad =
            crate::score_with_reference(&j, "Describe a day.", "A terrible, miserable day.", None)
                .unwrap();
        assert!(good > 0.5 && bad < -0.5, "{good} {bad}");
        assert_eq!(
            crate::score_with_reference(&j, "I hate this", "The sea.", None).unwrap(),
            0.0
        );
    }
}
