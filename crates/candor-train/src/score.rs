//! The scalar score of a response, as RL stages optimise it: a reward model's score at the
//! last token (normalised by the mean/std its reward stage recorded), weighted and added to
//! rule judges' scores (`candor_judge`, each judge seeing every field of the prompt line),
//! with a penalty for responses that never stopped, clipped.

use std::path::Path;

use candor_core::checkpoint::{CandorMeta, Head};
use candor_data::Tokenizer;
use candor_model::Model;
use serde::{Deserialize, Serialize};

use crate::ckpt::RunOptions;
use crate::dist::Dist;
use crate::precision::{load_frozen, Precision};

use crate::rollout::Prompt;
use crate::seq::{grouped_sequence_scores, sequence_scores, SeqBatch};
use crate::{Error, Result};
/// The judges' trait, for stages that hold one.
pub use candor_judge::Judge;

/// How a response's scalar score is made (the `score` section of an RL stage's config).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ScoreConfig {
    /// Weight of the reward model's (normalised) score; 0 leaves the reward model
    /// unloaded. Default 1.0.
    pub reward_model_weight: f64,
    /// A rule judge (`candor_judge`, `NAME` or `NAME:ARG`), e.g. `sentiment`; its score is
    /// added with `judge_weight`. Default: none.
    pub judge: Option<String>,
    /// Weight of the judge's score. Default 0.
    pub judge_weight: f64,
    /// More judges beside the reward model (and `judge`), each `{name, weight, label?}`:
    /// `name` any judge spec (`sentiment`, `command:PROGRAM ARGS`, `http://HOST:PORT/PATH`;
    /// docs/judges.md), its score added × `weight` (default 1), its batch mean logged as
    /// `reward_<label>` (`label` defaults to `name`). Default: none.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub judges: Vec<WeightedJudge>,
    /// Normalise reward-model scores with the mean/std the reward stage stored in its
    /// candor.json (`reward_mean`, `reward_std`). Default true.
    pub normalize: bool,
    /// Clip the combined score to ±clip, 0 = off. Default 0.
    pub clip: f64,
    /// Added to the score of responses that hit `max_new_tokens` without a stop token
    /// (TRL's `missing_eos_penalty`; 0 = off). Default 0.
    pub missing_eos_penalty: f64,
}

/// One entry of `score.judges`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct WeightedJudge {
    /// The judge spec.
    pub name: String,
    /// Its score's weight in the combined score. Default 1.
    #[serde(default = "one")]
    pub weight: f64,
    /// What its score is logged as (`reward_<label>`). Default: `name`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
}

fn one() -> f64 {
    1.0
}

impl WeightedJudge {
    /// The `metrics.jsonl` key its batch mean is logged under: `reward_<label>` (the label,
    /// else the name).
    pub fn metric_key(&self) -> String {
        format!("reward_{}", self.label.as_deref().unwrap_or(&self.name))
    }
}

/// Each of `score.judges`' mean over a batch, as `(reward_<label>, mean)`: `per_judge`
/// holds this rank's rows of each judge ([`Scores::per_judge`]); sums and the row count
/// are added over every rank of `dist` first (pass [`Dist::single`] for rows that are
/// already the whole batch). What PPO and GRPO log beside `reward_mean`.
pub fn judge_means(per_judge: &[(String, Vec<f64>)], dist: &Dist) -> Result<Vec<(String, f64)>> {
    if per_judge.is_empty() {
        return Ok(vec![]);
    }
    let mut sums: Vec<f64> = per_judge.iter().map(|(_, s)| s.iter().sum()).collect();
    sums.push(per_judge[0].1.len() as f64);
    let sums = dist.all_reduce_f64(&sums)?;
    let count = sums[sums.len() - 1].max(1.0);
    Ok(per_judge
        .iter()
        .zip(&sums)
        .map(|((label, _), sum)| (format!("reward_{label}"), sum / count))
        .collect())
}

impl Default for ScoreConfig {
    fn default() -> Self {
        ScoreConfig {
            reward_model_weight: 1.0,
            judge: None,
            judge_weight: 0.0,
            judges: vec![],
            normalize: true,
            clip: 0.0,
            missing_eos_penalty: 0.0,
        }
    }
}

/// Whether two tokenizers have the same vocabulary (a reward model that reads the policy's
/// tokens directly must).
pub fn same_tokenizer(a: &Tokenizer, b: &Tokenizer) -> bool {
    let (va, vb) = (a.inner.get_vocab(true), b.inner.get_vocab(true));
    va == vb
}

/// A judge by its `NAME` or `NAME:ARG` spelling.
pub fn judge(name: &str) -> Result<Box<dyn candor_judge::Judge>> {
    candor_judge::judge_by_name(name).map_err(|e| Error::Msg(e.to_string()))
}

/// Responses to prompts as a judge sees them (each with every field of its prompt line).
fn samples<'a>(prompts: &[&'a Prompt], responses: &'a [String]) -> Vec<candor_judge::Sample<'a>> {
    prompts
        .iter()
        .zip(responses)
        .map(|(p, r)| candor_judge::Sample {
            prompt: &p.text,
            response: r,
            fields: &p.fields,
        })
        .collect()
}

/// A judge's scores of responses to prompts (each judge sees every field of the line).
pub fn judge_scores(
    judge: &dyn candor_judge::Judge,
    prompts: &[&Prompt],
    responses: &[String],
) -> Result<Vec<f64>> {
    judge
        .score_batch(&samples(prompts, responses))
        .map_err(|e| Error::Msg(e.to_string()))
}

/// Build `score.judges` (none when the list is empty).
pub fn weighted_judges(list: &[WeightedJudge]) -> Result<Option<candor_judge::WeightedJudges>> {
    if list.is_empty() {
        return Ok(None);
    }
    let specs: Vec<(String, Option<String>, f64)> = list
        .iter()
        .map(|j| (j.name.clone(), j.label.clone(), j.weight))
        .collect();
    candor_judge::WeightedJudges::new(&specs)
        .map(Some)
        .map_err(|e| Error::Msg(format!("score.judges: {e}")))
}

/// Mean and std a reward checkpoint recorded over its training responses.
pub fn reward_stats(dir: &Path) -> Result<Option<(f64, f64)>> {
    let Some(meta) = CandorMeta::read(dir)? else {
        return Ok(None);
    };
    let get = |k: &str| meta.metrics.get(k).and_then(|v| v.as_f64());
    Ok(match (get("reward_mean"), get("reward_std")) {
        (Some(m), Some(s)) if s > 0.0 => Some((m, s)),
        _ => None,
    })
}

/// Everything the scores of a batch of responses are made from.
pub struct Scorer {
    pub reward_model: Option<Model>,
    /// The reward model's recorded (mean, std), when scores are normalised.
    pub stats: Option<(f64, f64)>,
    pub judge: Option<Box<dyn candor_judge::Judge>>,
    /// `score.judges`, with their weights.
    pub judges: Option<candor_judge::WeightedJudges>,
    pub cfg: ScoreConfig,
}

/// The scores of a batch of responses.
pub struct Scores {
    /// The combined, normalised, clipped score the stage optimises.
    pub combined: Vec<f64>,
    /// The reward model's raw score (or the judge's when there is no reward model, or the
    /// weighted sum of `score.judges` when there is neither).
    pub raw: Vec<f64>,
    /// Each of `score.judges`' scores, by label (what is logged as `reward_<label>`).
    pub per_judge: Vec<(String, Vec<f64>)>,
}

impl Scorer {
    /// Every judge the score is made from (`score.judge` and `score.judges`): what the
    /// prompt lines must carry fields for ([`check_judge_fields`]).
    pub fn judges(&self) -> Vec<&dyn candor_judge::Judge> {
        let weighted = self.judges.as_ref().map(|w| w as &dyn candor_judge::Judge);
        self.judge
            .iter()
            .map(|j| j.as_ref())
            .chain(weighted)
            .collect()
    }

    /// Load what `cfg` asks for: the reward model in `reward` (frozen, in `dtype`, on
    /// `opts.device`; it must have a score head and the policy's tokenizer `policy_tok`), its
    /// normalising stats, the judge. `stage` prefixes the notice printed when the stats are
    /// missing; the error when there is no reward at all names `opts.origin`.
    pub fn load(
        cfg: &ScoreConfig,
        reward: Option<&Path>,
        (policy_tok, policy_dir): (&Tokenizer, &Path),
        dtype: Precision,
        opts: &RunOptions,
        stage: &str,
    ) -> Result<Scorer> {
        let (device, origin) = (&opts.device, &opts.origin);
        let reward_model = match reward {
            Some(dir) if cfg.reward_model_weight != 0.0 => {
                let rm_tok = Tokenizer::from_dir(dir)?;
                if !same_tokenizer(policy_tok, &rm_tok) {
                    return Err(Error::Msg(format!(
                        "policy ({}) and reward model ({}) use different tokenizers; {} scores the policy's tokens directly, so they must match",
                        policy_dir.display(),
                        dir.display(),
                        stage.to_uppercase()
                    )));
                }
                let rm = load_frozen(dir, dtype, device)?;
                if rm.head != Head::Score {
                    return Err(Error::Msg(format!(
                        "{}: the reward model must have a score head (LlamaForSequenceClassification)",
                        dir.display()
                    )));
                }
                Some(rm)
            }
            _ => None,
        };
        if reward_model.is_none() && cfg.judge.is_none() && cfg.judges.is_empty() {
            return Err(Error::Msg(format!("{origin}: no reward: give --reward REWARD_DIR (with score.reward_model_weight ≠ 0), score.judge or score.judges")));
        }
        let stats = match (reward, cfg.normalize) {
            (Some(dir), true) if reward_model.is_some() => {
                let s = reward_stats(dir)?;
                if s.is_none() {
                    eprintln!(
                        "[{stage}] {}: no reward_mean/reward_std in candor.json; scores are not normalised",
                        dir.display()
                    );
                }
                s
            }
            _ => None,
        };
        Ok(Scorer {
            reward_model,
            stats,
            judge: cfg.judge.as_deref().map(judge).transpose()?,
            judges: weighted_judges(&cfg.judges)?,
            cfg: cfg.clone(),
        })
    }

    /// `score.judges` as one name (`a + b=0.5`), when there are any.
    pub fn judges_name(&self) -> Option<&str> {
        use candor_judge::Judge;
        self.judges.as_ref().map(|w| w.name())
    }

    /// Score responses (`sb`: the prompts and responses as one batch, for the reward model;
    /// `responses`: their text, for the judge; `stopped`: whether each ended on a stop token).
    pub fn score(
        &self,
        sb: &SeqBatch,
        prompts: &[&Prompt],
        responses: &[String],
        stopped: &[bool],
    ) -> Result<Scores> {
        let rm = match &self.reward_model {
            Some(rm) => Some(sequence_scores(rm, sb)?),
            None => None,
        };
        self.combine(rm, prompts, responses, stopped)
    }

    /// [`Scorer::score`] with the reward model reading the rows in length groups
    /// ([`crate::seq::grouped_sequence_scores`]): `tokens[i]` is row i's response tokens.
    pub fn score_grouped(
        &self,
        prompts: &[&Prompt],
        tokens: &[Vec<u32>],
        pad: u32,
        responses: &[String],
        stopped: &[bool],
    ) -> Result<Scores> {
        let rm = match &self.reward_model {
            Some(rm) => {
                let pr: Vec<&[u32]> = prompts.iter().map(|p| p.ids.as_slice()).collect();
                let rs: Vec<&[u32]> = tokens.iter().map(Vec::as_slice).collect();
                Some(grouped_sequence_scores(rm, &pr, &rs, pad)?)
            }
            None => None,
        };
        self.combine(rm, prompts, responses, stopped)
    }

    /// The scores from the reward model's raw scores `rm` (when there is one) and the judges.
    fn combine(
        &self,
        rm: Option<Vec<f64>>,
        prompts: &[&Prompt],
        responses: &[String],
        stopped: &[bool],
    ) -> Result<Scores> {
        let n = prompts.len();
        let mut combined = vec![0.0; n];
        let mut raw = vec![0.0; n];
        if let Some(rm_raw) = rm {
            raw = rm_raw;
            for i in 0..n {
                let norm = match (self.cfg.normalize, self.stats) {
                    (true, Some((m, s))) => (raw[i] - m) / s,
                    _ => raw[i],
                };
                combined[i] += self.cfg.reward_model_weight * norm;
            }
        }
        if let Some(j) = &self.judge {
            let js = judge_scores(j.as_ref(), prompts, responses)?;
            for i in 0..n {
                combined[i] += self.cfg.judge_weight * js[i];
            }
            if self.reward_model.is_none() {
                raw = js;
            }
        }
        let mut per_judge = vec![];
        if let Some(w) = &self.judges {
            let each = w
                .score_each(&samples(prompts, responses))
                .map_err(|e| Error::Msg(e.to_string()))?;
            let sum = w.combine(&each);
            for i in 0..n {
                combined[i] += sum[i];
            }
            if self.reward_model.is_none() && self.judge.is_none() {
                raw = sum;
            }
            per_judge = w
                .judges
                .iter()
                .map(|(l, _, _)| l.clone())
                .zip(each)
                .collect();
        }
        for i in 0..n {
            if !stopped[i] {
                combined[i] += self.cfg.missing_eos_penalty;
            }
            if self.cfg.clip > 0.0 {
                combined[i] = combined[i].clamp(-self.cfg.clip, self.cfg.clip);
            }
        }
        Ok(Scores {
            combined,
            raw,
            per_judge,
        })
    }
}

/// Every line of the prompt file `path` carries the fields `judges` read
/// ([`candor_judge::Judge::needs`]), checked before anything is sampled; else an error
/// naming the file, the line, the judge and the field.
pub fn check_judge_fields(path: &Path, judges: &[&dyn candor_judge::Judge]) -> Result<()> {
    if judges.iter().all(|j| j.needs().is_empty()) {
        return Ok(());
    }
    for (line, p) in candor_data::prompts::read_prompts(path)? {
        for j in judges {
            for field in j.needs() {
                if p.fields.get(*field).is_none_or(|v| v.is_null()) {
                    return Err(Error::Msg(format!(
                        "{}:{line}: judge `{}` reads the field `{field}`, which this prompt line lacks",
                        path.display(),
                        j.name()
                    )));
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn prompt(text: &str, reference: &str) -> Prompt {
        let mut fields = candor_data::prompts::Fields::new();
        fields.insert("reference".into(), reference.into());
        Prompt {
            text: text.into(),
            fields,
            ids: vec![1, 2],
        }
    }

    /// Judge-only scoring: the judge sees the line's fields; weight, missing-EOS penalty and
    /// clip apply in that order; the raw score is the judge's. By hand: `reference` gives an
    /// exact answer 1 and "a" against "a b" 0.9 · F1(P 1, R ½) = 0.9 · ⅔ = 0.6; weighted by 2
    /// → 2.0 and 1.2; the second never stopped: 1.2 − 1 = 0.2; clipped at 1.5 → 1.5, 0.2.
    #[test]
    fn judge_scores_are_weighted_penalised_and_clipped() {
        let cfg = ScoreConfig {
            judge: Some("reference".into()),
            judge_weight: 2.0,
            clip: 1.5,
            missing_eos_penalty: -1.0,
            ..Default::default()
        };
        let scorer = Scorer {
            reward_model: None,
            stats: None,
            judge: Some(judge("reference").unwrap()),
            judges: None,
            cfg,
        };
        let (a, b) = (prompt("2+2?", "4"), prompt("q", "a b"));
        let texts: Vec<String> = vec!["4".into(), "a".into()];
        let sb =
            crate::seq::seq_batch(&[&[1, 2], &[3]], &[&[4], &[5, 6]], 0, &Device::Cpu).unwrap();
        let s = scorer
            .score(&sb, &[&a, &b], &texts, &[true, false])
            .unwrap();
        assert!((s.raw[0] - 1.0).abs() < 1e-12 && (s.raw[1] - 0.6).abs() < 1e-12);
        assert!((s.combined[0] - 1.5).abs() < 1e-12, "{:?}", s.combined);
        assert!((s.combined[1] - 0.2).abs() < 1e-12, "{:?}", s.combined);
    }

    /// A prompt line without a field a judge needs is named by file and line; a null counts
    /// as missing; judges that need nothing pass any file.
    #[test]
    fn a_prompt_line_lacking_a_judged_field_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.jsonl");
        std::fs::write(
            &path,
            "{\"prompt\": \"a\", \"reference\": \"1\"}\n{\"prompt\": \"b\", \"reference\": null}\n",
        )
        .unwrap();
        let math = judge("math").unwrap();
        let e = check_judge_fields(&path, &[math.as_ref()])
            .err()
            .unwrap()
            .to_string();
        assert_eq!(
            e,
            format!(
                "{}:2: judge `math` reads the field `reference`, which this prompt line lacks",
                path.display()
            )
        );
        let sentiment = judge("sentiment").unwrap();
        check_judge_fields(&path, &[sentiment.as_ref()]).unwrap();
    }

    /// `score.judges`: each judge weighted into the combined score and kept by its label.
    /// By hand, with the scores above (1 and 0.6): labels `exact` (weight 2) and `half`
    /// (weight −0.5): combined 2·1 − 0.5·1 = 1.5 and 2·0.6 − 0.5·0.6 = 0.9; raw = the same sum
    /// (no reward model, no `judge`).
    #[test]
    fn the_fields_check_sees_weighted_judges_too() {
        let list: Vec<WeightedJudge> =
            serde_json::from_str(r#"[{"name": "math", "weight": 1}]"#).unwrap();
        let scorer = Scorer {
            reward_model: None,
            stats: None,
            judge: Some(judge("sentiment").unwrap()),
            judges: weighted_judges(&list).unwrap(),
            cfg: ScoreConfig::default(),
        };
        let judges = scorer.judges();
        assert_eq!(judges.len(), 2);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.jsonl");
        std::fs::write(&path, "{\"prompt\": \"a\"}\n").unwrap();
        let e = check_judge_fields(&path, &judges)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains(":1: judge ") && e.contains("`reference`"), "{e}");
    }

    #[test]
    fn several_judges_add_with_weights_and_are_kept_apart() {
        let list: Vec<WeightedJudge> = serde_json::from_str(
            r#"[{"name": "reference", "weight": 2, "label": "exact"}, {"name": "reference", "weight": -0.5, "label": "half"}]"#,
        )
        .unwrap();
        let cfg = ScoreConfig {
            reward_model_weight: 0.0,
            judges: list.clone(),
            ..Default::default()
        };
        let scorer = Scorer {
            reward_model: None,
            stats: None,
            judge: None,
            judges: weighted_judges(&list).unwrap(),
            cfg,
        };
        let (a, b) = (prompt("2+2?", "4"), prompt("q", "a b"));
        let texts: Vec<String> = vec!["4".into(), "a".into()];
        let sb =
            crate::seq::seq_batch(&[&[1, 2], &[3]], &[&[4], &[5, 6]], 0, &Device::Cpu).unwrap();
        let s = scorer.score(&sb, &[&a, &b], &texts, &[true, true]).unwrap();
        assert!(
            (s.combined[0] - 1.5).abs() < 1e-12 && (s.combined[1] - 0.9).abs() < 1e-12,
            "{:?}",
            s.combined
        );
        assert_eq!(s.raw, s.combined);
        assert_eq!(s.per_judge.len(), 2);
        assert_eq!(
            (s.per_judge[0].0.as_str(), s.per_judge[1].0.as_str()),
            ("exact", "half")
        );
        assert!((s.per_judge[1].1[1] - 0.6).abs() < 1e-12);
        // logged as reward_<label>: the batch means of each judge's scores (1, 0.6)
        let means = judge_means(&s.per_judge, &Dist::single()).unwrap();
        assert_eq!(means.len(), 2);
        assert_eq!(
            (means[0].0.as_str(), means[1].0.as_str()),
            ("reward_exact", "reward_half")
        );
        assert!((means[0].1 - 0.8).abs() < 1e-12 && (means[1].1 - 0.8).abs() < 1e-12);
        assert_eq!(list[0].metric_key(), "reward_exact");
        let dup: Vec<WeightedJudge> =
            serde_json::from_str(r#"[{"name": "reference"}, {"name": "reference"}]"#).unwrap();
        let e = weighted_judges(&dup).err().unwrap().to_string();
        assert!(
            e.contains("score.judges: judge `reference` is given twice"),
            "{e}"
        );
        assert!(
            serde_json::from_str::<Vec<WeightedJudge>>(r#"[{"name": "x", "wieght": 1}]"#).is_err()
        );
    }

    /// Over ranks, the means are of every rank's rows together: rank 0 scored (1, 0), rank 1
    /// scored (1): 2/3, not the mean of the ranks' means (3/4).
    #[test]
    fn judge_means_add_every_ranks_rows() {
        let parts = [vec![1.0, 0.0], vec![1.0]];
        let handles: Vec<_> = crate::dist::LocalGroup::new(2)
            .into_iter()
            .zip(parts)
            .map(|(member, rows)| {
                std::thread::spawn(move || {
                    judge_means(&[("math".to_string(), rows)], &Dist::new(member)).unwrap()
                })
            })
            .collect();
        for h in handles {
            let m = h.join().unwrap();
            assert_eq!(m[0].0, "reward_math");
            assert!((m[0].1 - 2.0 / 3.0).abs() < 1e-12, "{m:?}");
        }
    }
}
