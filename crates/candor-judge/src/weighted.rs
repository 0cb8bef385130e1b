//! Several judges at once: a weighted sum of their scores, each also kept on its own (RL
//! stages log each as `reward_<label>`; `rank` ranks by the sum).

use crate::{judge_by_name, Error, Judge, Result, Sample};

/// Split `NAME[=WEIGHT]` (the CLI's `--judge`): the text after the last `=` is the weight
/// when it reads as a number, else the whole text is the judge spec with weight 1. (A
/// `command:` whose last argument ends in `=NUMBER` must therefore be given a weight.)
pub fn parse_weighted(spec: &str) -> Result<(String, f64)> {
    if let Some((name, w)) = spec.rsplit_once('=') {
        if let Ok(weight) = w.trim().parse::<f64>() {
            if !weight.is_finite() {
                return Err(Error::Msg(format!(
                    "judge `{spec}`: the weight must be a finite number"
                )));
            }
            return Ok((name.to_string(), weight));
        }
    }
    Ok((spec.to_string(), 1.0))
}

/// Judges with weights; a [`Judge`] itself, scoring the weighted sum.
pub struct WeightedJudges {
    /// (label, judge, weight), in the order given.
    pub judges: Vec<(String, Box<dyn Judge>, f64)>,
    name: String,
    needs: Vec<&'static str>,
}

impl WeightedJudges {
    /// Build each judge from its spec; `label` is what its score is logged as (the spec
    /// when `None`). Two judges may not share a label.
    pub fn new(specs: &[(String, Option<String>, f64)]) -> Result<Self> {
        if specs.is_empty() {
            return Err(Error::Msg("no judges given".into()));
        }
        let mut judges: Vec<(String, Box<dyn Judge>, f64)> = vec![];
        for (spec, label, weight) in specs {
            let label = label.clone().unwrap_or_else(|| spec.clone());
            if judges.iter().any(|(l, _, _)| *l == label) {
                return Err(Error::Msg(format!(
                    "judge `{label}` is given twice; give each a distinct `label`"
                )));
            }
            judges.push((label, judge_by_name(spec)?, *weight));
        }
        let name = judges
            .iter()
            .map(|(l, _, w)| {
                if *w == 1.0 {
                    l.clone()
                } else {
                    format!("{l}={w}")
                }
            })
            .collect::<Vec<_>>()
            .join(" + ");
        let mut needs: Vec<&'static str> = vec![];
        for (_, j, _) in &judges {
            for n in j.needs() {
                // a judge's needs are 'static in every judge candor has; copy the names
                let n: &'static str = Box::leak(n.to_string().into_boxed_str());
                if !needs.contains(&n) {
                    needs.push(n);
                }
            }
        }
        Ok(WeightedJudges {
            judges,
            name,
            needs,
        })
    }

    /// Each judge's scores of the batch, in the order of [`Self::judges`].
    pub fn score_each(&self, batch: &[Sample]) -> Result<Vec<Vec<f64>>> {
        self.judges
            .iter()
            .map(|(_, j, _)| j.score_batch(batch))
            .collect()
    }

    /// The weighted sum of per-judge scores from [`Self::score_each`].
    pub fn combine(&self, each: &[Vec<f64>]) -> Vec<f64> {
        let n = each.first().map_or(0, |s| s.len());
        (0..n)
            .map(|i| {
                self.judges
                    .iter()
                    .zip(each)
                    .map(|((_, _, w), s)| w * s[i])
                    .sum()
            })
            .collect()
    }
}

impl Judge for WeightedJudges {
    fn name(&self) -> &str {
        &self.name
    }

    fn needs(&self) -> &[&str] {
        &self.needs
    }

    fn score(&self, sample: &Sample) -> Result<f64> {
        Ok(self.score_batch(std::slice::from_ref(sample))?[0])
    }

    fn score_batch(&self, batch: &[Sample]) -> Result<Vec<f64>> {
        Ok(self.combine(&self.score_each(batch)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Fields;

    #[test]
    fn weights_split_at_the_last_equals_sign_when_numeric() {
        assert_eq!(
            parse_weighted("sentiment").unwrap(),
            ("sentiment".into(), 1.0)
        );
        assert_eq!(
            parse_weighted("reference=0.5").unwrap(),
            ("reference".into(), 0.5)
        );
        assert_eq!(
            parse_weighted("command:j.py --mode=fast").unwrap(),
            ("command:j.py --mode=fast".into(), 1.0)
        );
        assert_eq!(
            parse_weighted("command:j.py --x=1=2").unwrap(),
            ("command:j.py --x=1".into(), 2.0)
        );
        assert!(parse_weighted("sentiment=inf").is_err());
    }

    #[test]
    fn weighted_sum_of_sentiment_and_reference() {
        let specs = [
            ("sentiment".to_string(), None, 2.0),
            ("reference".to_string(), Some("ref".to_string()), -1.0),
        ];
        let w = WeightedJudges::new(&specs).unwrap();
        assert_eq!(w.name(), "sentiment=2 + ref=-1");
        let fields: Fields = serde_json::from_str(r#"{"reference": "good"}"#).unwrap();
        let batch = [
            Sample {
                prompt: "p",
                response: "good",
                fields: &fields,
            },
            Sample {
                prompt: "p",
                response: "terrible awful",
                fields: &fields,
            },
        ];
        let each = w.score_each(&batch).unwrap();
        let sentiment = crate::SentimentJudge::new();
        for (i, s) in batch.iter().enumerate() {
            let want = 2.0 * sentiment.score(s).unwrap() - crate::ReferenceJudge.score(s).unwrap();
            assert_eq!(each[0][i], sentiment.score(s).unwrap());
            assert!((w.score(s).unwrap() - want).abs() < 1e-12);
        }
        let dup = [
            ("sentiment".to_string(), None, 1.0),
            ("sentiment".to_string(), None, 1.0),
        ];
        let e = WeightedJudges::new(&dup).err().unwrap().to_string();
        assert!(e.contains("given twice"), "{e}");
    }
}
