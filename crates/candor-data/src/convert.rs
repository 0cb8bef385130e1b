//! Tokenizers from other formats, as Hugging Face `tokenizer.json`:
//!
//! - GPT-2's original BPE files: `encoder.json`/`vocab.json` (token → id) and
//!   `vocab.bpe`/`merges.txt` (one merge per line after a `#version` header). The result is
//!   what `transformers`' GPT-2 fast tokenizer is: byte-level pre-tokenizer with GPT-2's
//!   regex and no prefix space, BPE, byte-level decoder, `<|endoftext|>` special.
//! - A GGUF file's vocabulary (`tokenizer.ggml.tokens` / `merges` / `token_type`), as
//!   llama.cpp stores byte-level BPE models (`tokenizer.ggml.model = gpt2`); SmolLM's
//!   pre-tokenizer (`tokenizer.ggml.pre = smollm`, also StarCoder's) splits digits one by one
//!   before the byte-level split.

use std::collections::HashMap;
use std::path::Path;

use serde_json::Value;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::AddedToken;

use crate::error::{file_err, line_err, Error, Result};
use crate::tokenizer::{TokenValue, Tokenizer, TokenizerConfig, EOT};

/// A byte-level BPE vocabulary: tokens in id order (GPT-2's byte-to-unicode alphabet),
/// merges as `"left right"`, and which ids are special (control) tokens.
#[derive(Clone, Debug, Default)]
pub struct ByteLevelBpe {
    pub tokens: Vec<String>,
    pub merges: Vec<String>,
    pub special_ids: Vec<u32>,
    /// Split every digit into its own pre-token first (SmolLM2, StarCoder).
    pub individual_digits: bool,
}

/// Pre-tokenizer names in GGUF's `tokenizer.ggml.pre` that candor reproduces, and whether
/// each splits digits individually. Others are refused rather than tokenised differently.
pub fn gguf_pre_tokenizer(pre: Option<&str>) -> Option<bool> {
    match pre.unwrap_or("default") {
        "default" | "gpt2" | "gpt-2" => Some(false),
        "smollm" | "starcoder" | "refact" => Some(true),
        _ => None,
    }
}

impl ByteLevelBpe {
    /// Build the `tokenizers` tokenizer (special tokens registered as added tokens).
    pub fn build(&self) -> Result<tokenizers::Tokenizer> {
        let vocab: Vocab = self
            .tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        if vocab.len() != self.tokens.len() {
            return Err(Error::Msg("vocabulary has duplicate tokens".into()));
        }
        let mut merges = Vec::with_capacity(self.merges.len());
        for (i, m) in self.merges.iter().enumerate() {
            let Some((a, b)) = m.split_once(' ') else {
                return Err(Error::Msg(format!(
                    "merge {} `{m}` is not two tokens separated by a space",
                    i + 1
                )));
            };
            merges.push((a.to_string(), b.to_string()));
        }
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(|e| {
                Error::Tokenizer(format!(
                    "BPE vocabulary and merges do not fit together: {e}"
                ))
            })?;
        let mut tok = tokenizers::Tokenizer::new(bpe);
        let byte_level = ByteLevel::new(false, true, true);
        if self.individual_digits {
            let seq: Vec<PreTokenizerWrapper> = vec![Digits::new(true).into(), byte_level.into()];
            tok.with_pre_tokenizer(Some(Sequence::new(seq)));
        } else {
            tok.with_pre_tokenizer(Some(byte_level));
        }
        tok.with_decoder(Some(ByteLevel::default()));
        tok.with_post_processor(Some(ByteLevel::new(true, false, true)));
        let specials: Vec<AddedToken> = self
            .special_ids
            .iter()
            .map(|&i| AddedToken::from(self.tokens[i as usize].clone(), true))
            .collect();
        tok.add_special_tokens(specials)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(tok)
    }
}

/// GPT-2's `encoder.json`/`vocab.json` + `vocab.bpe`/`merges.txt` as a candor tokenizer
/// (`<|endoftext|>` is BOS, EOS and the unknown token, as in transformers' GPT-2).
pub fn from_gpt2_files(vocab_path: &Path, merges_path: &Path) -> Result<Tokenizer> {
    let text = std::fs::read_to_string(vocab_path)
        .map_err(|e| file_err(vocab_path, format!("cannot read: {e}")))?;
    let map: HashMap<String, u32> = serde_json::from_str(&text).map_err(|e| {
        file_err(
            vocab_path,
            format!("not a GPT-2 vocabulary (a JSON object of token → id): {e}"),
        )
    })?;
    let mut tokens = vec![None; map.len()];
    for (t, &id) in &map {
        match tokens.get_mut(id as usize) {
            Some(slot @ None) => *slot = Some(t.clone()),
            Some(Some(other)) => {
                return Err(file_err(
                    vocab_path,
                    format!("tokens `{other}` and `{t}` share id {id}"),
                ));
            }
            None => {
                return Err(file_err(
                    vocab_path,
                    format!("token `{t}` has id {id}, outside 0..{}", map.len()),
                ))
            }
        }
    }
    let tokens: Vec<String> = tokens.into_iter().map(Option::unwrap).collect();
    let text = std::fs::read_to_string(merges_path)
        .map_err(|e| file_err(merges_path, format!("cannot read: {e}")))?;
    let mut merges = vec![];
    for (i, line) in text.lines().enumerate() {
        if (i == 0 && line.starts_with("#version")) || line.is_empty() {
            continue;
        }
        let parts: Vec<&str> = line.split(' ').collect();
        if parts.len() != 2 {
            return Err(line_err(
                merges_path,
                i + 1,
                format!("expected two tokens separated by a space, got `{line}`"),
            ));
        }
        for p in &parts {
            if !map.contains_key(*p) {
                return Err(line_err(
                    merges_path,
                    i + 1,
                    format!("merge part `{p}` is not in {}", vocab_path.display()),
                ));
            }
        }
        merges.push(line.to_string());
    }
    let special_ids: Vec<u32> = map.get(EOT).copied().into_iter().collect();
    let bpe = ByteLevelBpe {
        tokens,
        merges,
        special_ids,
        individual_digits: false,
    };
    let inner = bpe.build()?;
    let eot = map.contains_key(EOT).then(|| TokenValue::Text(EOT.into()));
    let config = TokenizerConfig {
        bos_token: eot.clone(),
        eos_token: eot.clone(),
        pad_token: None,
        chat_template: None,
        extra: serde_json::Map::from_iter([
            (
                "tokenizer_class".to_string(),
                Value::String("PreTrainedTokenizerFast".into()),
            ),
            ("add_bos_token".to_string(), Value::Bool(false)),
            ("add_prefix_space".to_string(), Value::Bool(false)),
            (
                "clean_up_tokenization_spaces".to_string(),
                Value::Bool(false),
            ),
            (
                "unk_token".to_string(),
                eot.map_or(Value::Null, |t| Value::String(t.content().into())),
            ),
        ]),
    };
    Ok(Tokenizer { inner, config })
}

/// The special-token ids and chat template a GGUF file names for its vocabulary.
#[derive(Clone, Debug, Default)]
pub struct SpecialTokens {
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub unk: Option<u32>,
    pub pad: Option<u32>,
    pub chat_template: Option<String>,
    pub model_max_length: Option<usize>,
}

/// A candor tokenizer from a byte-level BPE vocabulary and its special tokens.
pub fn from_byte_level_bpe(bpe: &ByteLevelBpe, special: &SpecialTokens) -> Result<Tokenizer> {
    let inner = bpe.build()?;
    let name = |id: Option<u32>| -> Result<Option<TokenValue>> {
        match id {
            None => Ok(None),
            Some(i) => match bpe.tokens.get(i as usize) {
                Some(t) => Ok(Some(TokenValue::Text(t.clone()))),
                None => Err(Error::Msg(format!(
                    "special token id {i} is outside the vocabulary of {}",
                    bpe.tokens.len()
                ))),
            },
        }
    };
    let mut extra = serde_json::Map::from_iter([
        (
            "tokenizer_class".to_string(),
            Value::String("PreTrainedTokenizerFast".into()),
        ),
        ("add_bos_token".to_string(), Value::Bool(false)),
        ("add_prefix_space".to_string(), Value::Bool(false)),
        (
            "clean_up_tokenization_spaces".to_string(),
            Value::Bool(false),
        ),
    ]);
    if let Some(unk) = name(special.unk)? {
        extra.insert("unk_token".into(), Value::String(unk.content().into()));
    }
    if let Some(n) = special.model_max_length {
        extra.insert("model_max_length".into(), Value::from(n));
    }
    let config = TokenizerConfig {
        bos_token: name(special.bos)?,
        eos_token: name(special.eos)?,
        pad_token: name(special.pad)?,
        chat_template: Some(Value::String(
            special
                .chat_template
                .clone()
                .unwrap_or_else(|| crate::chat::DEFAULT_TEMPLATE.to_string()),
        )),
        extra,
    };
    Ok(Tokenizer { inner, config })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A byte-level vocabulary: the 256 byte symbols, a few merges, specials at the end.
    fn tiny() -> ByteLevelBpe {
        let mut tokens: Vec<String> = tokenizers::pre_tokenizers::byte_level::ByteLevel::alphabet()
            .into_iter()
            .map(|c| c.to_string())
            .collect();
        tokens.sort();
        for t in ["Ġt", "he", "Ġthe", "12", "<|im_start|>", "<|im_end|>"] {
            tokens.push(t.into());
        }
        let n = tokens.len() as u32;
        ByteLevelBpe {
            tokens,
            merges: vec!["Ġ t".into(), "h e".into(), "Ġt he".into(), "1 2".into()],
            special_ids: vec![n - 2, n - 1],
            individual_digits: true,
        }
    }

    #[test]
    fn byte_level_bpe_merges_splits_digits_and_keeps_specials() {
        let bpe = tiny();
        let special = SpecialTokens {
            bos: Some(bpe.tokens.len() as u32 - 2),
            eos: Some(bpe.tokens.len() as u32 - 1),
            ..Default::default()
        };
        let tok = from_byte_level_bpe(&bpe, &special).unwrap();
        let ids = tok.encode("<|im_start|>a the 12<|im_end|>").unwrap();
        let pieces: Vec<String> = ids
            .iter()
            .map(|&i| bpe.tokens[i as usize].clone())
            .collect();
        // "12" is never merged: digits are split one by one before BPE sees them
        assert_eq!(
            pieces,
            ["<|im_start|>", "a", "Ġthe", "Ġ", "1", "2", "<|im_end|>"]
        );
        assert_eq!(tok.decode(&ids, true).unwrap(), "a the 12");
        assert_eq!(tok.eos_id(), Some(bpe.tokens.len() as u32 - 1));
        assert!(tok.config.chat_template().unwrap().contains("<|im_start|>"));
        let mut no_digits = bpe.clone();
        no_digits.individual_digits = false;
        let tok = no_digits.build().unwrap();
        let ids = tok.encode_fast("12", false).unwrap().get_ids().to_vec();
        assert_eq!(
            ids,
            vec![bpe.tokens.iter().position(|t| t == "12").unwrap() as u32]
        );
    }

    /// GPT-2's original files (tests/fixtures/gpt2, MIT) converted by candor encode like
    /// transformers' GPT-2 tokenizer built from the same files.
    #[test]
    fn gpt2_files_encode_like_transformers() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/gpt2");
        let tok = from_gpt2_files(&dir.join("encoder.json"), &dir.join("vocab.bpe")).unwrap();
        assert_eq!(tok.encode("Hello world!").unwrap(), vec![15496, 995, 0]);
        assert_eq!(tok.eos_id(), Some(50256));
        assert_eq!(tok.vocab_size(), 50257);
        let reference: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap())
                .unwrap();
        for case in reference["cases"].as_array().unwrap() {
            let text = case["text"].as_str().unwrap();
            let want: Vec<u32> = case["ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as u32)
                .collect();
            let got = tok.encode(text).unwrap();
            assert_eq!(got, want, "{text:?}");
            assert_eq!(tok.decode(&got, false).unwrap(), text);
        }
        // saved and reloaded as tokenizer.json, it encodes the same
        let out = tempfile::tempdir().unwrap();
        tok.save(out.path()).unwrap();
        let again = Tokenizer::from_dir(out.path()).unwrap();
        assert_eq!(again.encode("Hello world!").unwrap(), vec![15496, 995, 0]);
        assert_eq!(again.eos_id(), Some(50256));
    }

    #[test]
    fn bad_gpt2_files_name_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let vocab = dir.path().join("vocab.json");
        let merges = dir.path().join("merges.txt");
        std::fs::write(&vocab, r#"{"a": 0, "b": 1, "ab": 2}"#).unwrap();
        std::fs::write(&merges, "#version: 0.2\na b\na c\n").unwrap();
        let e = from_gpt2_files(&vocab, &merges).err().unwrap().to_string();
        assert!(e.contains("merges.txt:3: merge part `c` is not in"), "{e}");
        std::fs::write(&merges, "#version: 0.2\na b c\n").unwrap();
        let e = from_gpt2_files(&vocab, &merges).err().unwrap().to_string();
        assert!(e.contains("merges.txt:2: expected two tokens"), "{e}");
        std::fs::write(&vocab, r#"{"a": 0, "b": 5}"#).unwrap();
        let e = from_gpt2_files(&vocab, &merges).err().unwrap().to_string();
        assert!(e.contains("vocab.json: token `b` has id 5"), "{e}");
        std::fs::write(&vocab, "[1, 2]").unwrap();
        assert!(from_gpt2_files(&vocab, &merges)
            .err()
            .unwrap()
            .to_string()
            .contains("not a GPT-2 vocabulary"));
    }
}
