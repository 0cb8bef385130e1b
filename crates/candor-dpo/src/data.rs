//! Preference data for DPO: every prompt's responses tokenised once, its prompt once, and
//! the (better, worse) pairs among them — all K·(K−1)/2 pairs of a K-way ranking, ties
//! making none — so that a step scores each response once for all the pairs it is in.

use candor_data::chat::{encode_exchange_parts, ChatTemplate};
use candor_data::preference::Comparisons;
use candor_data::Tokenizer;

use crate::config::TooLong;
use crate::forward::Group;
use crate::Result;

/// One prompt's tokens, its responses' tokens (the assistant turn: response and end-of-turn
/// token, what DPO scores), and the pairs among the responses.
#[derive(Clone, Debug, PartialEq)]
pub struct PromptPairs {
    pub prompt: Vec<u32>,
    pub responses: Vec<Vec<u32>>,
    /// (better, worse) indices into `responses`.
    pub pairs: Vec<(usize, usize)>,
}

impl PromptPairs {
    /// Tokens of all its exchanges (prompt counted with each response, as they are run).
    pub fn tokens(&self) -> usize {
        self.responses
            .iter()
            .map(|r| self.prompt.len() + r.len())
            .sum()
    }
}

/// Encoded prompts and what `data.max_len` did to them.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Prepared {
    /// Prompts with at least one pair left.
    pub prompts: Vec<PromptPairs>,
    /// Responses cut to fit `max_len` (`truncate`).
    pub truncated: usize,
    /// Responses left out for being too long (`drop`, or a prompt that alone fills `max_len`).
    pub dropped: usize,
    /// Prompts with no pair (all tied, or every pair lost to `max_len`).
    pub without_pairs: usize,
}

impl Prepared {
    pub fn pairs(&self) -> usize {
        self.prompts.iter().map(|p| p.pairs.len()).sum()
    }
}

/// Tokenise each prompt's exchanges with the chat template (the prompt as posed, then the
/// assistant turn up to its end-of-turn token) and fit them to `max_len`: `truncate` keeps an
/// exchange's first `max_len` tokens (the prompt and the start of the response, TRL's
/// `keep_start`; a prompt that leaves no room for a response token is dropped), `drop`
/// leaves a too-long response out. Pairs whose responses are gone go too.
pub fn prepare(
    comparisons: &[Comparisons],
    tok: &Tokenizer,
    template: &ChatTemplate,
    max_len: usize,
    too_long: TooLong,
) -> Result<Prepared> {
    let mut out = Prepared::default();
    for c in comparisons {
        let exchanges: Vec<(&str, &str)> = c
            .responses
            .iter()
            .map(|r| (c.prompt.as_str(), r.as_str()))
            .collect();
        let parts = encode_exchange_parts(tok, template, &exchanges)?;
        let prompt = parts.first().map(|p| p.0.clone()).unwrap_or_default();
        // kept[i]: the new index of response i, if it stays
        let mut kept: Vec<Option<usize>> = vec![];
        let mut responses = vec![];
        for (_, mut turn) in parts {
            let fits = prompt.len() + turn.len() <= max_len;
            let keep = if fits {
                true
            } else if too_long == TooLong::Truncate && prompt.len() < max_len {
                turn.truncate(max_len - prompt.len());
                out.truncated += 1;
                true
            } else {
                out.dropped += 1;
                false
            };
            kept.push(keep.then(|| {
                responses.push(turn);
                responses.len() - 1
            }));
        }
        let pairs: Vec<(usize, usize)> = c
            .pairs
            .iter()
            .filter_map(|&(b, w)| Some((kept[b]?, kept[w]?)))
            .collect();
        if pairs.is_empty() {
            out.without_pairs += 1;
            continue;
        }
        out.prompts.push(PromptPairs {
            prompt,
            responses,
            pairs,
        });
    }
    Ok(out)
}

/// Several prompts' pairs as indices into their responses taken in order (prompt by prompt),
/// each response once however many pairs it is in.
#[derive(Debug, Default, PartialEq)]
pub struct PairLayout {
    pub better: Vec<u32>,
    pub worse: Vec<u32>,
    pub responses: usize,
}

pub fn pair_layout(examples: &[&PromptPairs]) -> PairLayout {
    let mut l = PairLayout::default();
    for e in examples {
        let base = l.responses as u32;
        for &(b, w) in &e.pairs {
            l.better.push(base + b as u32);
            l.worse.push(base + w as u32);
        }
        l.responses += e.responses.len();
    }
    l
}

/// The prompts' responses as the forward pass takes them.
pub fn groups<'a>(examples: &[&'a PromptPairs]) -> Vec<Group<'a>> {
    examples
        .iter()
        .map(|e| Group {
            prompt: &e.prompt,
            responses: e.responses.iter().map(Vec::as_slice).collect(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candor_data::preference::expand_pairs;

    fn tokenizer() -> Tokenizer {
        let text = "the cat sat on the mat and the dog ate the log ".repeat(30);
        Tokenizer::train(std::iter::once(text.as_str()), 300).unwrap()
    }

    fn comparisons() -> Vec<Comparisons> {
        vec![
            // K = 4 with a tie: 5 pairs
            Comparisons {
                prompt: "the cat".into(),
                responses: vec![
                    "sat".into(),
                    "the mat".into(),
                    "ate".into(),
                    "the dog ate the log and the cat sat on the mat".into(),
                ],
                pairs: expand_pairs(&[1, 2, 2, 3]),
            },
            // all tied: no pair
            Comparisons {
                prompt: "the dog".into(),
                responses: vec!["sat".into(), "ate".into()],
                pairs: expand_pairs(&[1, 1]),
            },
        ]
    }

    #[test]
    fn all_pairs_of_a_ranking_ties_make_none_and_max_len_truncates_or_drops() {
        let tok = tokenizer();
        let t = ChatTemplate::for_tokenizer(&tok);
        let c = comparisons();
        let all = prepare(&c, &tok, &t, 1000, TooLong::Truncate).unwrap();
        assert_eq!(
            (all.prompts.len(), all.without_pairs, all.pairs()),
            (1, 1, 5)
        );
        let p = &all.prompts[0];
        assert_eq!(p.pairs, vec![(0, 1), (0, 2), (0, 3), (1, 3), (2, 3)]);
        let im_end = tok.token_id("<|im_end|>").unwrap();
        assert!(p.responses.iter().all(|r| r.last() == Some(&im_end)));
        assert_eq!(
            tok.decode(&p.prompt, false).unwrap(),
            "<|im_start|>user\nthe cat<|im_end|>\n<|im_start|>assistant\n"
        );
        // the long response does not fit in max_len: cut to fit, or dropped with its pairs
        let long = p.prompt.len() + p.responses[3].len();
        let max_len = long - 3;
        let cut = prepare(&c, &tok, &t, max_len, TooLong::Truncate).unwrap();
        assert_eq!((cut.truncated, cut.dropped, cut.pairs()), (1, 0, 5));
        assert_eq!(
            cut.prompts[0].responses[3],
            p.responses[3][..p.responses[3].len() - 3].to_vec()
        );
        let dropped = prepare(&c, &tok, &t, max_len, TooLong::Drop).unwrap();
        assert_eq!(
            (dropped.truncated, dropped.dropped, dropped.pairs()),
            (0, 1, 2)
        );
        assert_eq!(dropped.prompts[0].pairs, vec![(0, 1), (0, 2)]);
        // a prompt that fills max_len alone is dropped, even when truncating
        let none = prepare(&c, &tok, &t, p.prompt.len(), TooLong::Truncate).unwrap();
        assert_eq!(
            (none.prompts.len(), none.dropped, none.without_pairs),
            (0, 6, 2)
        );
    }

    #[test]
    fn a_layout_runs_each_response_once_for_all_its_pairs() {
        let a = PromptPairs {
            prompt: vec![1, 2],
            responses: vec![vec![3], vec![4, 5], vec![6]],
            pairs: vec![(0, 1), (0, 2), (1, 2)],
        };
        let b = PromptPairs {
            prompt: vec![7],
            responses: vec![vec![8], vec![9]],
            pairs: vec![(1, 0)],
        };
        let l = pair_layout(&[&a, &b]);
        assert_eq!(l.responses, 5);
        assert_eq!((l.better, l.worse), (vec![0, 0, 1, 4], vec![1, 2, 2, 3]));
        assert_eq!(groups(&[&a, &b])[1].responses, vec![&[8u32][..], &[9]]);
        assert_eq!(a.tokens(), 2 * 3 + 4);
    }
}
