//! A trained reward model, loaded for scoring (`candor score`) and evaluation (`candor eval`).

use std::path::{Path, PathBuf};

use candle_core::Device;
use candor_core::checkpoint::Head;
use candor_data::chat::ChatTemplate;
use candor_data::Tokenizer;
use candor_model::io::{load_frozen, read_config};
use candor_model::Model;
use candor_train::sample::encode_exchanges;

use crate::data::{encode_comparisons, load_comparisons};
use crate::{evaluate, rewards_of, Error, EvalStats, Result};
use candor_data::preference::Labellers;

pub struct RewardModel {
    pub model: Model,
    pub tokenizer: Tokenizer,
    pub template: ChatTemplate,
    pub dir: PathBuf,
}

impl RewardModel {
    /// Load a `score` checkpoint; an `lm` one is refused with the reason.
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        candor_core::checkpoint::require_model_dir(dir)?;
        if read_config(dir)?.head() != Head::Score {
            return Err(Error::Msg(format!(
                "{}: holds a language model (`lm` head), not a reward model (`score` head); train one with `candor reward`",
                dir.display()
            )));
        }
        let model = load_frozen(dir, device)?;
        let tokenizer = Tokenizer::from_dir(dir)?;
        let template = ChatTemplate::for_tokenizer(&tokenizer);
        Ok(RewardModel {
            model,
            tokenizer,
            template,
            dir: dir.to_path_buf(),
        })
    }

    fn max_len(&self) -> usize {
        self.model.config.max_position_embeddings
    }

    /// The reward of each (prompt, response), `batch_size` exchanges at a time. An exchange
    /// longer than the model's context keeps its last tokens.
    pub fn score(&self, pairs: &[(&str, &str)], batch_size: usize) -> Result<Vec<f64>> {
        let max = self.max_len();
        let seqs: Vec<Vec<u32>> = encode_exchanges(&self.tokenizer, &self.template, pairs)?
            .into_iter()
            .map(|s| {
                if s.len() > max {
                    s[s.len() - max..].to_vec()
                } else {
                    s
                }
            })
            .collect();
        let refs: Vec<&[u32]> = seqs.iter().map(Vec::as_slice).collect();
        rewards_of(&self.model, &refs, batch_size, self.tokenizer.pad_id())
    }

    /// Pairwise accuracy, margin and loss on a preference file (every pair of every prompt).
    pub fn evaluate_file(&self, path: &Path, batch_size: usize) -> Result<EvalStats> {
        let comparisons = load_comparisons(&[path.to_path_buf()], Labellers::Each)?;
        let (encoded, _) = encode_comparisons(
            &comparisons,
            &self.tokenizer,
            &self.template,
            self.max_len(),
        )?;
        let stats = evaluate(
            &self.model,
            &encoded,
            batch_size,
            0,
            self.tokenizer.pad_id(),
        )?;
        if stats.pairs == 0 {
            return Err(Error::Msg(format!(
                "{}: no pairs to evaluate (every ranking is a single tie)",
                path.display()
            )));
        }
        Ok(stats)
    }
}
