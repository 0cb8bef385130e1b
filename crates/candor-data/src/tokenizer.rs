//! Tokenizers: any Hugging Face `tokenizer.json`, plus `tokenizer_config.json` for the
//! special tokens and the chat template.
//!
//! candor's own tokenizers are byte-level BPE (GPT-2's scheme: every byte is a symbol, so
//! no text is ever unknown) with the chat format's special tokens reserved at ids 0–2.

use std::collections::HashSet;
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::models::TrainerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::AddedToken;

use crate::error::{file_err, Error, Result};

/// End of text: separates documents in pretraining; the default end-of-sequence token.
pub const EOT: &str = "<|endoftext|>";
/// ChatML turn delimiters (the format of the default chat template).
pub const IM_START: &str = "<|im_start|>";
pub const IM_END: &str = "<|im_end|>";
/// Special tokens every candor-trained tokenizer reserves, in id order.
pub const SPECIAL_TOKENS: [&str; 3] = [EOT, IM_START, IM_END];

/// A special token in `tokenizer_config.json`: a plain string or an `AddedToken` object.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(untagged)]
pub enum TokenValue {
    Text(String),
    Added {
        content: String,
        #[serde(flatten)]
        rest: serde_json::Map<String, Value>,
    },
}

impl TokenValue {
    pub fn content(&self) -> &str {
        match self {
            TokenValue::Text(s) => s,
            TokenValue::Added { content, .. } => content,
        }
    }
}

/// `tokenizer_config.json`, the keys candor reads; everything else is kept as is.
#[derive(Serialize, Deserialize, Clone, Debug, Default)]
pub struct TokenizerConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bos_token: Option<TokenValue>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eos_token: Option<TokenValue>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pad_token: Option<TokenValue>,
    /// A Jinja template string, or Hugging Face's list of named templates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chat_template: Option<Value>,
    #[serde(flatten)]
    pub extra: serde_json::Map<String, Value>,
}

impl TokenizerConfig {
    /// The chat template text: the plain string, or the one named `default` in a list.
    pub fn chat_template(&self) -> Option<String> {
        match self.chat_template.as_ref()? {
            Value::String(s) => Some(s.clone()),
            Value::Array(items) => items
                .iter()
                .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                .and_then(|t| t.get("template")?.as_str().map(String::from)),
            _ => None,
        }
    }
}

/// Text of tokens as they are generated, one piece per token where the token completes
/// one: a token that ends inside a multi-byte character (byte-level BPE, byte fallback)
/// waits for the tokens that complete it, so no character is ever split. tokenizers'
/// `DecodeStream` does the work (it decodes a short window of recent tokens, as
/// text-generation-inference does); [`finish`](Self::finish) returns what is still held.
/// The pieces joined equal [`Tokenizer::decode`] of all the tokens.
pub struct TextStream<'a> {
    tok: &'a Tokenizer,
    stream: tokenizers::DecodeStream<
        'a,
        tokenizers::ModelWrapper,
        tokenizers::NormalizerWrapper,
        tokenizers::PreTokenizerWrapper,
        tokenizers::PostProcessorWrapper,
        tokenizers::DecoderWrapper,
    >,
    skip_special_tokens: bool,
    ids: Vec<u32>,
    emitted: usize,
}

impl<'a> TextStream<'a> {
    pub fn new(tok: &'a Tokenizer, skip_special_tokens: bool) -> Self {
        TextStream {
            tok,
            stream: tok.inner.decode_stream(skip_special_tokens),
            skip_special_tokens,
            ids: vec![],
            emitted: 0,
        }
    }

    /// The text `id` completes, if any.
    pub fn step(&mut self, id: u32) -> Result<Option<String>> {
        self.ids.push(id);
        let piece = self.stream.step(id).map_err(tk_err)?;
        if let Some(p) = &piece {
            self.emitted += p.len();
        }
        Ok(piece)
    }

    /// The text not yet returned (an incomplete character at the end, as the decoder
    /// renders it).
    pub fn finish(self) -> Result<String> {
        let all = self.tok.decode(&self.ids, self.skip_special_tokens)?;
        Ok(all.get(self.emitted..).unwrap_or_default().to_string())
    }
}

/// A tokenizer with its config.
#[derive(Clone)]
pub struct Tokenizer {
    pub inner: tokenizers::Tokenizer,
    pub config: TokenizerConfig,
}

fn tk_err(e: impl std::fmt::Display) -> Error {
    Error::Tokenizer(e.to_string())
}

impl Tokenizer {
    /// Load `tokenizer.json` from a checkpoint directory, with `tokenizer_config.json` and
    /// `chat_template.jinja` when present.
    ///
    /// A PEFT adapter directory without its own tokenizer files (PEFT's `save_pretrained`
    /// writes none) takes its base model's: `base_model_name_or_path` as a directory, or
    /// `ORG/NAME` in the local Hugging Face cache.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        if !path.is_file() {
            if let Some(base) = adapter_base_tokenizer_dir(dir) {
                return Self::from_dir(&base);
            }
            return Err(file_err(dir, "tokenizer.json is missing"));
        }
        Self::from_file(&path)
    }

    /// Load a `tokenizer.json` file (and the config files beside it, if any).
    pub fn from_file(path: &Path) -> Result<Self> {
        if !path.is_file() {
            return Err(file_err(path, "no such tokenizer file"));
        }
        let inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| file_err(path, format!("not a valid tokenizer.json: {e}")))?;
        let dir = path.parent().unwrap_or(Path::new("."));
        let cfg_path = dir.join("tokenizer_config.json");
        let mut config: TokenizerConfig = if cfg_path.is_file() {
            let text = std::fs::read_to_string(&cfg_path)
                .map_err(|e| file_err(&cfg_path, format!("cannot read: {e}")))?;
            serde_json::from_str(&text)
                .map_err(|e| file_err(&cfg_path, format!("not valid: {e}")))?
        } else {
            TokenizerConfig::default()
        };
        let jinja = dir.join("chat_template.jinja");
        if config.chat_template.is_none() && jinja.is_file() {
            let t = std::fs::read_to_string(&jinja)
                .map_err(|e| file_err(&jinja, format!("cannot read: {e}")))?;
            config.chat_template = Some(Value::String(t));
        }
        if config.eos_token.is_none() && inner.token_to_id(EOT).is_some() {
            config.eos_token = Some(TokenValue::Text(EOT.into()));
        }
        Ok(Tokenizer { inner, config })
    }

    /// Train a byte-level BPE of `vocab_size` tokens (special tokens included) on `texts`.
    /// Deterministic for the same texts.
    pub fn train<I, S>(texts: I, vocab_size: usize) -> Result<Self>
    where
        I: Iterator<Item = S> + Send,
        S: AsRef<str> + Send,
    {
        let min_vocab = 256 + SPECIAL_TOKENS.len();
        if vocab_size < min_vocab {
            return Err(Error::Msg(format!(
                "vocab_size {vocab_size} is too small: a byte-level BPE needs at least {min_vocab} (256 bytes + special tokens)"
            )));
        }
        let specials: Vec<AddedToken> = SPECIAL_TOKENS
            .iter()
            .map(|s| AddedToken::from(s.to_string(), true))
            .collect();
        let alphabet: HashSet<char> = ByteLevel::alphabet().into_iter().collect();
        let mut trainer: TrainerWrapper = BpeTrainerBuilder::new()
            .vocab_size(vocab_size)
            .min_frequency(2)
            .show_progress(false)
            .special_tokens(specials)
            .initial_alphabet(alphabet)
            .build()
            .into();
        let mut inner = tokenizers::Tokenizer::new(BPE::default());
        let byte_level = ByteLevel::default().add_prefix_space(false);
        inner.with_pre_tokenizer(Some(byte_level));
        inner.with_decoder(Some(byte_level));
        inner.with_post_processor(Some(byte_level));
        inner.train(&mut trainer, texts).map_err(tk_err)?;
        let config = TokenizerConfig {
            bos_token: None,
            eos_token: Some(TokenValue::Text(EOT.into())),
            pad_token: Some(TokenValue::Text(EOT.into())),
            // written out so transformers' apply_chat_template renders what candor renders
            chat_template: Some(Value::String(crate::chat::DEFAULT_TEMPLATE.into())),
            extra: serde_json::Map::from_iter([
                (
                    "tokenizer_class".to_string(),
                    Value::String("PreTrainedTokenizerFast".into()),
                ),
                ("add_bos_token".to_string(), Value::Bool(false)),
                (
                    "clean_up_tokenization_spaces".to_string(),
                    Value::Bool(false),
                ),
            ]),
        };
        Ok(Tokenizer { inner, config })
    }

    /// Write `tokenizer.json` and `tokenizer_config.json` into `dir`, each atomically (a
    /// failed write leaves the old file, or none, and no temporary behind).
    pub fn save(&self, dir: &Path) -> Result<()> {
        let path = dir.join("tokenizer.json");
        let json = self
            .inner
            .to_string(false)
            .map_err(|e| file_err(&path, format!("cannot serialise: {e}")))?;
        // the error names the path already
        candor_core::output::write_atomic(&path, json.as_bytes())?;
        let cfg_path = dir.join("tokenizer_config.json");
        let text = serde_json::to_string_pretty(&self.config).expect("tokenizer config serialises");
        Ok(candor_core::output::write_atomic(
            &cfg_path,
            (text + "\n").as_bytes(),
        )?)
    }

    /// Token ids of `text`; special-token strings in it become their ids; no BOS/EOS added.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self
            .inner
            .encode_fast(text, false)
            .map_err(tk_err)?
            .get_ids()
            .to_vec())
    }

    /// Encode many texts in parallel.
    pub fn encode_batch(&self, texts: &[String]) -> Result<Vec<Vec<u32>>> {
        let inputs: Vec<&str> = texts.iter().map(String::as_str).collect();
        let encs = self
            .inner
            .encode_batch_fast(inputs, false)
            .map_err(tk_err)?;
        Ok(encs.into_iter().map(|e| e.get_ids().to_vec()).collect())
    }

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner.decode(ids, skip_special_tokens).map_err(tk_err)
    }

    /// Vocabulary size including added (special) tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// End-of-sequence id: the config's `eos_token`, else `<|endoftext|>`.
    pub fn eos_id(&self) -> Option<u32> {
        self.config
            .eos_token
            .as_ref()
            .and_then(|t| self.token_id(t.content()))
            .or_else(|| self.token_id(EOT))
    }

    pub fn bos_id(&self) -> Option<u32> {
        self.config
            .bos_token
            .as_ref()
            .and_then(|t| self.token_id(t.content()))
    }

    /// Padding id: `pad_token`, else the end-of-sequence id, else 0. Padding is always
    /// masked, so its value only has to be a valid id.
    pub fn pad_id(&self) -> u32 {
        self.config
            .pad_token
            .as_ref()
            .and_then(|t| self.token_id(t.content()))
            .or_else(|| self.eos_id())
            .unwrap_or(0)
    }

    /// The largest token id the tokenizer can produce, plus one.
    pub fn id_bound(&self) -> usize {
        let added = self
            .inner
            .get_added_tokens_decoder()
            .keys()
            .max()
            .map_or(0, |&m| m as usize + 1);
        self.inner.get_vocab_size(false).max(added)
    }
}

/// The directory holding the tokenizer of a PEFT adapter directory's base model, if `dir`
/// is one and its base has a `tokenizer.json` (a directory, or `ORG/NAME` in the cache).
fn adapter_base_tokenizer_dir(dir: &Path) -> Option<std::path::PathBuf> {
    let text = std::fs::read_to_string(dir.join("adapter_config.json")).ok()?;
    let v: Value = serde_json::from_str(&text).ok()?;
    let base = v.get("base_model_name_or_path")?.as_str()?;
    for candidate in [Path::new(base).to_path_buf(), dir.join(base)] {
        if candidate.join("tokenizer.json").is_file()
            || candidate.join("adapter_config.json").is_file()
        {
            return Some(candidate);
        }
    }
    let cache = match std::env::var_os("HF_HUB_CACHE") {
        Some(d) => hf_hub::Cache::new(d.into()),
        None => hf_hub::Cache::from_env(),
    };
    let repo = cache.model(base.to_string());
    repo.get("tokenizer.json")
        .and_then(|p| p.parent().map(Path::to_path_buf))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reply streamed token by token: multi-byte characters (2, 3 and 4 bytes) that a
    /// byte-level BPE trained on ASCII splits into single-byte tokens come out whole, and
    /// the pieces join to the whole decode, special tokens skipped.
    #[test]
    fn text_stream_never_splits_a_character() {
        let tok = Tokenizer::train(corpus().into_iter(), 300).unwrap();
        let text = "Ahoy wörld ✓ 日本 🐋 done";
        let mut ids = tok.encode(text).unwrap();
        ids.push(tok.token_id(IM_END).unwrap());
        assert!(
            ids.len() > text.chars().count() - 8,
            "bytes are separate tokens"
        );
        let mut stream = TextStream::new(&tok, true);
        let mut pieces = vec![];
        for &id in &ids {
            if let Some(p) = stream.step(id).unwrap() {
                assert!(!p.contains('\u{FFFD}'), "a split character in {p:?}");
                pieces.push(p);
            }
        }
        let rest = stream.finish().unwrap();
        assert_eq!(rest, "");
        assert_eq!(pieces.concat(), text);
        assert!(pieces.contains(&"🐋".to_string()) || pieces.iter().any(|p| p.ends_with('🐋')));
        // cut anywhere (inside a character too): finish hands back the rest of the decode
        for n in 0..ids.len() {
            let mut stream = TextStream::new(&tok, true);
            let mut got = String::new();
            for &id in &ids[..n] {
                got.extend(stream.step(id).unwrap());
            }
            got += &stream.finish().unwrap();
            assert_eq!(got, tok.decode(&ids[..n], true).unwrap(), "cut at {n}");
        }
    }

    fn corpus() -> Vec<String> {
        let base = "Call me Ishmael. Some years ago, never mind how long precisely, having little or no money \
                    in my purse, and nothing particular to interest me on shore, I thought I would sail about a little.";
        (0..50).map(|i| format!("{base} {i}")).collect()
    }

    #[test]
    fn trains_reserves_specials_round_trips_and_is_deterministic() {
        let a = Tokenizer::train(corpus().into_iter(), 300).unwrap();
        assert_eq!(a.token_id(EOT), Some(0));
        assert_eq!(a.token_id(IM_START), Some(1));
        assert_eq!(a.token_id(IM_END), Some(2));
        assert!(a.vocab_size() <= 300 && a.vocab_size() > 259);
        let text = "Call me Ishmael, unknown wörds ✓.";
        let ids = a.encode(text).unwrap();
        assert_eq!(a.decode(&ids, false).unwrap(), text);
        let ids = a.encode("<|im_start|>user\nhi<|im_end|>").unwrap();
        assert_eq!(ids[0], 1);
        assert_eq!(*ids.last().unwrap(), 2);
        let b = Tokenizer::train(corpus().into_iter(), 300).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let dir2 = tempfile::tempdir().unwrap();
        a.save(dir.path()).unwrap();
        b.save(dir2.path()).unwrap();
        assert_eq!(
            std::fs::read(dir.path().join("tokenizer.json")).unwrap(),
            std::fs::read(dir2.path().join("tokenizer.json")).unwrap()
        );
        let c = Tokenizer::from_dir(dir.path()).unwrap();
        assert_eq!(c.encode(text).unwrap(), a.encode(text).unwrap());
        assert_eq!(c.eos_id(), Some(0));
        assert_eq!(c.pad_id(), 0);
    }

    #[test]
    fn too_small_vocab_and_missing_files_are_errors() {
        assert!(Tokenizer::train(corpus().into_iter(), 100)
            .err()
            .unwrap()
            .to_string()
            .contains("too small"));
        let e = Tokenizer::from_dir(Path::new("/nonexistent"))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("/nonexistent: tokenizer.json is missing"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("tokenizer.json"), "{not json").unwrap();
        let e = Tokenizer::from_dir(dir.path()).err().unwrap().to_string();
        assert!(e.contains("not a valid tokenizer.json"), "{e}");
    }

    #[test]
    fn chat_template_from_list_form() {
        let cfg: TokenizerConfig = serde_json::from_str(
            r#"{"chat_template":[{"name":"tool_use","template":"x"},{"name":"default","template":"y"}],
                "eos_token":{"content":"</s>","lstrip":false}}"#,
        )
        .unwrap();
        assert_eq!(cfg.chat_template().as_deref(), Some("y"));
        assert_eq!(cfg.eos_token.unwrap().content(), "</s>");
    }
}
