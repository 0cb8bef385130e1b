//! Preference data for training: rankings grouped by prompt, split by prompt, tokenised,
//! and laid out so that all pairs of a prompt go through the model together.

use std::collections::HashMap;
use std::path::PathBuf;

use candor_data::chat::ChatTemplate;
use candor_data::preference::{read_preferences, Labellers};
use candor_data::Tokenizer;
use candor_train::sample::encode_exchanges;

use crate::loss::expand_pairs;
use crate::Result;

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
/// chosen/rejected lines. A team's rankings of the same responses are first combined as
/// `labellers` says.
pub fn load_comparisons(files: &[PathBuf], labellers: Labellers) -> Result<Vec<Comparisons>> {
    let mut out: Vec<Comparisons> = vec![];
    let mut by_prompt: HashMap<String, usize> = HashMap::new();
    let mut prefs = vec![];
    for file in files {
        prefs.extend(read_preferences(file)?.into_iter().map(|(_, p)| p));
    }
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
    Ok(out)
}

/// A prompt's exchanges as token ids (one per response) and its pairs.
#[derive(Clone, Debug)]
pub struct Encoded {
    pub seqs: Vec<Vec<u32>>,
    pub pairs: Vec<(usize, usize)>,
}

/// Tokenise each exchange with the chat template ([`encode_exchanges`]); one longer than
/// `max_len` keeps its last `max_len` tokens (the reward is read at the end). Returns the
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
        let seqs = encode_exchanges(tok, template, &pairs)?
            .into_iter()
            .map(|s| {
                if s.len() > max_len {
                    cut += 1;
                    s[s.len() - max_len..].to_vec()
                } else {
                    s
                }
            })
            .collect();
        out.push(Encoded {
            seqs,
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

    #[test]
    fn lines_of_one_prompt_merge_and_pairs_map_to_the_united_responses() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("prefs.jsonl");
        std::fs::write(
            &path,
            [
                r#"{"prompt": "p", "chosen": "a", "rejected": "b"}"#,
                r#"{"prompt": "q", "responses": ["x", "y", "z"], "ranks": [1, 1, 2]}"#,
                r#"{"prompt": "p", "chosen": "c", "rejected": "a"}"#,
                r#"{"prompt": "p", "chosen": "a", "rejected": "b"}"#,
            ]
            .join("\n"),
        )
        .unwrap();
        let c = load_comparisons(&[path], Labellers::Each).unwrap();
        assert_eq!(c.len(), 2);
        assert_eq!(c[0].responses, vec!["a", "b", "c"]);
        assert_eq!(c[0].pairs, vec![(0, 1), (2, 0)]);
        assert_eq!(c[1].pairs, vec![(0, 2), (1, 2)]);
        let a = Encoded {
            seqs: vec![vec![1, 2], vec![3]],
            pairs: vec![(0, 1)],
        };
        let b = Encoded {
            seqs: vec![vec![4], vec![5, 6, 7], vec![8]],
            pairs: vec![(2, 0), (1, 0)],
        };
        let l = pair_layout(&[&a, &b]);
        assert_eq!(
            (l.better, l.worse, l.tokens),
            (vec![0, 4, 3], vec![1, 2, 2], 8)
        );
    }
}
