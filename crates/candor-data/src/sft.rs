//! Instruction-tuning (SFT) data: JSONL lines of
//!
//! ```text
//! {"prompt": "...", "response": "..."}
//! {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}   (any number of turns)
//! {"prompt": "..." | [messages], "completion": "..." | [messages]}               (TRL prompt-completion)
//! ```
//!
//! in any file [`crate::dataset`] reads (JSONL, JSON, Parquet, compressed, `hf:`).
//!
//! rendered with a chat template and tokenised with a mark per token saying whether it is
//! trained: the text of each assistant turn and its end-of-turn token, nothing else (the
//! prompt, the system message, the role headers and what a template adds after the
//! end-of-turn token are context only). Each piece of the render is tokenised on its own,
//! the way the model meets it when it answers: the prompt as posed (ending with the
//! assistant header), then the tokens it generates.
//!
//! Bad lines are reported as `file:line: what is wrong`: JSON that does not parse, missing
//! fields, an empty response, no assistant turn, a conversation longer than the context.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::chat::{stop_tokens, ChatTemplate, Message, DEFAULT_TEMPLATE};
use crate::dataset::{read_records, Columns};
use crate::error::{file_err, line_err, Error, Result};
use crate::formats::{self, prompt_field};
use crate::tokenizer::{TokenValue, Tokenizer};
use serde_json::Value;

/// A line of an SFT file as written.
#[derive(Clone, Debug, Deserialize)]
pub struct SftLine {
    #[serde(default)]
    pub prompt: Option<String>,
    #[serde(default)]
    pub response: Option<String>,
    #[serde(default)]
    pub messages: Option<Vec<Message>>,
}

impl SftLine {
    /// The line as a conversation, or why it is not one.
    pub fn conversation(self) -> std::result::Result<Vec<Message>, String> {
        let messages = match (self.prompt, self.response, self.messages) {
            (Some(_), _, Some(_)) | (_, Some(_), Some(_)) => {
                return Err("give either `prompt` and `response` or `messages`, not both".into())
            }
            (Some(p), Some(r), None) => {
                if p.trim().is_empty() {
                    return Err("`prompt` is empty".into());
                }
                if r.trim().is_empty() {
                    return Err("`response` is empty: there is nothing to train on".into());
                }
                vec![Message::new("user", &p), Message::new("assistant", &r)]
            }
            (Some(_), None, None) => return Err("`prompt` needs a `response` beside it".into()),
            (None, Some(_), None) => return Err("`response` needs a `prompt` beside it".into()),
            (None, None, Some(m)) => m,
            (None, None, None) => {
                return Err("expected `prompt` and `response`, or `messages`".into())
            }
        };
        if messages.is_empty() {
            return Err("`messages` is empty".into());
        }
        for (i, m) in messages.iter().enumerate() {
            if !matches!(m.role.as_str(), "system" | "user" | "assistant") {
                return Err(format!(
                    "message {}: role `{}` is not system, user or assistant",
                    i + 1,
                    m.role
                ));
            }
            if m.role == "assistant" && m.content.trim().is_empty() {
                return Err(format!(
                    "message {}: the assistant's response is empty: there is nothing to train on",
                    i + 1
                ));
            }
        }
        if !messages.iter().any(|m| m.role == "assistant") {
            return Err("no assistant turn: there is nothing to train on".into());
        }
        let last = &messages[messages.len() - 1].role;
        if last != "assistant" {
            return Err(format!(
                "the conversation ends with a {last} turn; it must end with the assistant's reply"
            ));
        }
        Ok(messages)
    }
}

/// Read an SFT file: (line number, conversation) per non-blank line.
pub fn read_conversations(path: &Path) -> Result<Vec<(usize, Vec<Message>)>> {
    read_conversations_with(path, &Columns::new())
}

/// A record as an SFT line: candor's `prompt` + `response` or `messages` as they are;
/// TRL's prompt-completion (`prompt` + `completion`, strings or message lists) as the
/// prompt's conversation followed by the completion's turns.
fn sft_line(fields: &serde_json::Map<String, Value>) -> std::result::Result<SftLine, String> {
    let Some(completion) = fields.get("completion") else {
        return serde_json::from_value(Value::Object(fields.clone()))
            .map_err(|e| crate::jsonl::strip_pos(&e));
    };
    if fields.contains_key("response") || fields.contains_key("messages") {
        return Err(
            "give `completion` with a `prompt`, not beside `response` or `messages`".into(),
        );
    }
    let prompt = prompt_field(
        fields
            .get("prompt")
            .ok_or("`completion` needs a `prompt` beside it")?,
    )?;
    let mut messages = prompt.messages();
    match completion {
        Value::String(c) => messages.push(Message::new("assistant", c)),
        Value::Array(_) => messages.extend(formats::messages(completion, "completion")?),
        _ => return Err("`completion` is neither a string nor a message list".into()),
    }
    Ok(SftLine {
        prompt: None,
        response: None,
        messages: Some(messages),
    })
}

/// [`read_conversations`] of any dataset file ([`crate::dataset`]), columns renamed.
pub fn read_conversations_with(
    path: &Path,
    columns: &Columns,
) -> Result<Vec<(usize, Vec<Message>)>> {
    read_records(path, columns)?
        .into_iter()
        .map(|r| {
            sft_line(&r.fields)
                .and_then(SftLine::conversation)
                .map(|c| (r.number(), c))
                .map_err(|m| r.err(m))
        })
        .collect()
}

/// A conversation's tokens and which of them are trained (`trained[i]`: token i is
/// assistant text or its end-of-turn token; `trained[0]` is always false).
#[derive(Clone, Debug, PartialEq)]
pub struct SftExample {
    pub tokens: Vec<u32>,
    pub trained: Vec<bool>,
}

/// Render and tokenise conversations; each piece of the render is encoded on its own.
pub fn encode_conversations(
    tok: &Tokenizer,
    template: &ChatTemplate,
    convs: &[&[Message]],
) -> Result<Vec<SftExample>> {
    let pieces = convs
        .iter()
        .map(|c| template.segments(c))
        .collect::<Result<Vec<_>>>()?;
    encode_pieces(tok, &pieces)
}

/// Tokenise rendered conversations (pieces marked `true` for assistant turns).
fn encode_pieces(tok: &Tokenizer, pieces: &[Vec<(String, bool)>]) -> Result<Vec<SftExample>> {
    let texts: Vec<String> = pieces.iter().flatten().map(|(s, _)| s.clone()).collect();
    let mut encoded = tok.encode_batch(&texts)?.into_iter();
    let stop = stop_tokens(tok);
    Ok(pieces
        .iter()
        .map(|conv| {
            let mut ex = SftExample {
                tokens: vec![],
                trained: vec![],
            };
            for (_, assistant) in conv {
                let ids = encoded.next().expect("one encoding per piece");
                // an assistant turn is trained up to and including its end-of-turn token
                let end = match assistant {
                    true => ids
                        .iter()
                        .position(|t| stop.contains(t))
                        .map_or(ids.len(), |i| i + 1),
                    false => 0,
                };
                ex.trained.extend((0..ids.len()).map(|i| i < end));
                ex.tokens.extend(ids);
            }
            if let Some(first) = ex.trained.first_mut() {
                *first = false; // the first token is never predicted
            }
            ex
        })
        .collect())
}

/// SFT examples as read: each with its file and line, in file order.
#[derive(Clone, Debug, Default)]
pub struct SftSet {
    pub examples: Vec<(SftExample, PathBuf, usize)>,
    /// Conversations longer than the limit that were left out (with `skip_long`).
    pub skipped: usize,
}

/// Read, check and tokenise SFT files. A conversation longer than `max_len` tokens is an
/// error naming its line, or with `skip_long` is left out and counted.
pub fn load_sft(
    files: &[PathBuf],
    tok: &Tokenizer,
    template: &ChatTemplate,
    max_len: usize,
    skip_long: bool,
) -> Result<SftSet> {
    load_sft_with(files, &Columns::new(), tok, template, max_len, skip_long)
}

/// [`load_sft`] with the files' columns renamed ([`crate::dataset::Columns`]).
pub fn load_sft_with(
    files: &[PathBuf],
    columns: &Columns,
    tok: &Tokenizer,
    template: &ChatTemplate,
    max_len: usize,
    skip_long: bool,
) -> Result<SftSet> {
    let mut out = SftSet::default();
    for path in files {
        if !crate::dataset::is_hf_spec(path) && !path.is_file() {
            return Err(file_err(path, "no such file"));
        }
        let convs = read_conversations_with(path, columns)?;
        if convs.is_empty() {
            return Err(file_err(path, "holds no conversations"));
        }
        let pieces = convs
            .iter()
            .map(|(n, c)| {
                template
                    .segments(c)
                    .map_err(|e| line_err(path, *n, e.to_string()))
            })
            .collect::<Result<Vec<_>>>()?;
        for ((n, _), ex) in convs.iter().zip(encode_pieces(tok, &pieces)?) {
            if ex.tokens.len() > max_len && skip_long {
                out.skipped += 1;
                continue;
            }
            if ex.tokens.len() > max_len {
                return Err(line_err(
                    path,
                    *n,
                    format!(
                        "conversation is {} tokens, longer than the context ({max_len} tokens)",
                        ex.tokens.len()
                    ),
                ));
            }
            out.examples.push((ex, path.clone(), *n));
        }
    }
    Ok(out)
}

/// The name that stands for plain ChatML ([`DEFAULT_TEMPLATE`]) where a template is given:
/// the `<|im_start|>role … <|im_end|>` turns without a default system message (SmolLM2's and
/// Qwen's own templates add one to every conversation that has none).
pub const CHATML: &str = "chatml";

/// The tokenizer a chat model is trained and saved with, and its template: `template`
/// (given; [`CHATML`] names plain ChatML), else the tokenizer's own, else [`DEFAULT_TEMPLATE`], written into its
/// `chat_template`; and, when the template ends an assistant turn with a known end-of-turn
/// token other than the EOS token (ChatML's `<|im_end|>`, Llama 3's `<|eot_id|>`) and does
/// not itself print `eos_token`, that token as `eos_token`, so generation from the saved
/// checkpoint stops where a turn ends.
pub fn chat_tokenizer(
    tok: &Tokenizer,
    template: Option<&str>,
) -> Result<(Tokenizer, ChatTemplate)> {
    let mut tok = tok.clone();
    let source = match template {
        Some(CHATML) => DEFAULT_TEMPLATE.to_string(),
        Some(t) => t.to_string(),
        None => tok
            .config
            .chat_template()
            .unwrap_or_else(|| DEFAULT_TEMPLATE.to_string()),
    };
    tok.config.chat_template = Some(serde_json::Value::String(source));
    let template = ChatTemplate::for_tokenizer(&tok);
    let probe = [
        Message::new("user", "Hi"),
        Message::new("assistant", "Hello"),
    ];
    let turn = template
        .segments(&probe)?
        .into_iter()
        .find(|(_, assistant)| *assistant)
        .ok_or_else(|| Error::Msg("chat template renders no assistant turn".into()))?;
    let stop = stop_tokens(&tok);
    let end_of_turn = tok.encode(&turn.0)?.into_iter().find(|t| stop.contains(t));
    if let Some(id) = end_of_turn {
        if Some(id) != tok.eos_id() && !template.source.contains("eos_token") {
            let text = tok
                .inner
                .id_to_token(id)
                .expect("a stop token is in the vocabulary");
            tok.config.eos_token = Some(TokenValue::Text(text));
        }
    }
    Ok((tok, template))
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_instruction_form_reads_as_the_same_conversations() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/formats");
        let want = read_conversations(&dir.join("sft_candor.jsonl")).unwrap();
        assert_eq!(want.len(), 6);
        for form in [
            "sft_candor",
            "sft_trl_prompt_completion",
            "sft_trl_conversational",
            "sft_trl_messages",
        ] {
            for ext in ["jsonl", "parquet"] {
                let got = read_conversations(&dir.join(format!("{form}.{ext}"))).unwrap();
                let got: Vec<_> = got.into_iter().map(|(_, c)| c).collect();
                let want: Vec<_> = want.iter().map(|(_, c)| c.clone()).collect();
                assert_eq!(got, want, "{form}.{ext}");
            }
        }
    }

    use super::*;
    use crate::tokenizer::{EOT, IM_END};

    fn tokenizer() -> Tokenizer {
        let text = "What is 2 + 2? It is 4. Now add 3 to that. The answer is 7. Be brief. sort these numbers";
        Tokenizer::train((0..20).map(|_| text), 300).unwrap()
    }

    fn write(lines: &[&str]) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sft.jsonl");
        std::fs::write(&path, lines.join("\n") + "\n").unwrap();
        (dir, path)
    }

    /// Which tokens of a multi-turn ChatML conversation are trained: both assistant turns
    /// with their `<|im_end|>`, nothing of the system, user or header text, and not the
    /// newline the template writes after each `<|im_end|>`.
    #[test]
    fn multi_turn_trains_only_assistant_text_and_end_of_turn() {
        let tok = tokenizer();
        let template = ChatTemplate::new(DEFAULT_TEMPLATE, "", EOT);
        let conv = vec![
            Message::new("system", "Be brief."),
            Message::new("user", "What is 2 + 2?"),
            Message::new("assistant", "It is 4."),
            Message::new("user", "Now add 3 to that."),
            Message::new("assistant", "The answer is 7."),
        ];
        let ex = encode_conversations(&tok, &template, &[&conv])
            .unwrap()
            .remove(0);
        assert_eq!(ex.tokens.len(), ex.trained.len());
        // the tokens are the render's, and decode back to it
        assert_eq!(
            tok.decode(&ex.tokens, false).unwrap(),
            template.render(&conv, false).unwrap()
        );
        // the trained tokens, run by run
        let mut runs: Vec<String> = vec![];
        let mut cur: Vec<u32> = vec![];
        for (t, &on) in ex.tokens.iter().zip(&ex.trained) {
            if on {
                cur.push(*t);
            } else if !cur.is_empty() {
                runs.push(tok.decode(&std::mem::take(&mut cur), false).unwrap());
            }
        }
        if !cur.is_empty() {
            runs.push(tok.decode(&cur, false).unwrap());
        }
        assert_eq!(
            runs,
            vec!["It is 4.<|im_end|>", "The answer is 7.<|im_end|>"]
        );
        // the untrained text: everything else, including both generation headers
        let untrained: String = ex
            .tokens
            .iter()
            .zip(&ex.trained)
            .filter(|(_, on)| !**on)
            .map(|(t, _)| tok.decode(&[*t], false).unwrap())
            .collect();
        assert_eq!(
            untrained,
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n\
             \n<|im_start|>user\nNow add 3 to that.<|im_end|>\n<|im_start|>assistant\n\n"
        );
        // a prompt as posed at inference is a prefix of the training tokens: the model
        // is trained on exactly the token boundaries it generates from
        let posed = tok
            .encode(&template.render(&conv[..2], true).unwrap())
            .unwrap();
        assert_eq!(&ex.tokens[..posed.len()], posed.as_slice());
        assert!(!ex.trained[..posed.len()].iter().any(|&t| t));
        assert!(ex.trained[posed.len()]);
    }

    #[test]
    fn reads_both_formats() {
        let (_d, path) = write(&[
            r#"{"prompt": "What is 2 + 2?", "response": "4"}"#,
            "",
            r#"{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}], "id": 7}"#,
        ]);
        let c = read_conversations(&path).unwrap();
        assert_eq!(
            c[0],
            (
                1,
                vec![
                    Message::new("user", "What is 2 + 2?"),
                    Message::new("assistant", "4")
                ]
            )
        );
        assert_eq!(c[1].0, 3);
        let tok = tokenizer();
        let t = ChatTemplate::new(DEFAULT_TEMPLATE, "", EOT);
        let set = load_sft(std::slice::from_ref(&path), &tok, &t, 64, false).unwrap();
        assert_eq!((set.examples.len(), set.skipped), (2, 0));
        assert_eq!(
            (set.examples[1].1.as_path(), set.examples[1].2),
            (path.as_path(), 3)
        );
    }

    #[test]
    fn bad_lines_name_file_line_and_problem() {
        let ok = r#"{"prompt": "What is 2 + 2?", "response": "4"}"#;
        let cases = [
            (
                r#"{"prompt": "What is 2 + 2?", "response": "4""#,
                "EOF while parsing",
            ),
            (
                r#"{"prompt": "What is 2 + 2?"}"#,
                "`prompt` needs a `response`",
            ),
            (
                r#"{"prompt": "What is 2 + 2?", "response": "  "}"#,
                "`response` is empty",
            ),
            (
                r#"{"text": "hello"}"#,
                "expected `prompt` and `response`, or `messages`",
            ),
            (
                r#"{"messages": [{"role": "user", "content": "Hi"}]}"#,
                "no assistant turn",
            ),
            (
                r#"{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": ""}]}"#,
                "message 2: the assistant's response is empty",
            ),
            (
                r#"{"messages": [{"role": "user", "content": "Hi"}, {"role": "bot", "content": "x"}]}"#,
                "role `bot` is not",
            ),
            (
                r#"{"messages": [{"role": "user"}]}"#,
                "missing field `content`",
            ),
            (r#"{"messages": []}"#, "`messages` is empty"),
            (
                r#"{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}, {"role": "user", "content": "?"}]}"#,
                "ends with a user turn",
            ),
            (
                r#"{"prompt": "a", "response": "b", "messages": []}"#,
                "not both",
            ),
        ];
        for (line, want) in cases {
            let (_d, path) = write(&[ok, line]);
            let e = read_conversations(&path).unwrap_err().to_string();
            assert!(
                e.starts_with(&format!("{}:2: ", path.display())) && e.contains(want),
                "{line}: {e}"
            );
        }
        // longer than the context
        let numbers = (10..40)
            .map(|i| i.to_string())
            .collect::<Vec<_>>()
            .join(" ");
        let long =
            format!(r#"{{"prompt": "sort these numbers {numbers}", "response": "{numbers}"}}"#);
        let (_d, path) = write(&[ok, &long]);
        let t = ChatTemplate::new(DEFAULT_TEMPLATE, "", EOT);
        let e = load_sft(std::slice::from_ref(&path), &tokenizer(), &t, 40, false)
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with(&format!("{}:2: conversation is ", path.display()))
                && e.contains("longer than the context (40 tokens)"),
            "{e}"
        );
        let set = load_sft(std::slice::from_ref(&path), &tokenizer(), &t, 40, true).unwrap();
        assert_eq!(
            (set.examples.len(), set.skipped, set.examples[0].2),
            (1, 1, 1)
        );
    }

    /// `chatml` replaces a template that adds a default system message (SmolLM2's, from its
    /// tokenizer_config.json) with plain ChatML: a bare user turn gets no system turn.
    #[test]
    fn chatml_names_plain_chatml_without_a_default_system_message() {
        let smollm2 = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";
        let mut tok = tokenizer();
        tok.config.chat_template = Some(serde_json::Value::String(smollm2.into()));
        let hi = [Message::new("user", "Hi")];
        let (_, own) = chat_tokenizer(&tok, None).unwrap();
        assert!(own
            .render(&hi, true)
            .unwrap()
            .starts_with("<|im_start|>system\nYou are"));
        let (chat, plain) = chat_tokenizer(&tok, Some(CHATML)).unwrap();
        assert_eq!(
            plain.render(&hi, true).unwrap(),
            "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
        assert_eq!(
            chat.config.chat_template().as_deref(),
            Some(DEFAULT_TEMPLATE)
        );
    }

    #[test]
    fn chat_tokenizer_writes_the_template_and_ends_turns_with_im_end() {
        // a tokenizer without a template (candor-trained ones carry the default since the
        // interop work; a plain HF tokenizer.json does not)
        let mut tok = tokenizer();
        tok.config.chat_template = None;
        let (chat, template) = chat_tokenizer(&tok, None).unwrap();
        assert_eq!(template.source, DEFAULT_TEMPLATE);
        assert_eq!(
            chat.config.chat_template().as_deref(),
            Some(DEFAULT_TEMPLATE)
        );
        assert_eq!(chat.eos_id(), chat.token_id(IM_END));
        assert_eq!(chat.pad_id(), tok.pad_id(), "padding is unchanged");
        // saved and reloaded, the checkpoint's tokenizer poses prompts the same way
        let dir = tempfile::tempdir().unwrap();
        chat.save(dir.path()).unwrap();
        let back = Tokenizer::from_dir(dir.path()).unwrap();
        assert_eq!(
            ChatTemplate::for_tokenizer(&back)
                .render_prompt("Hi")
                .unwrap(),
            template.render_prompt("Hi").unwrap()
        );
        assert_eq!(back.eos_id(), chat.token_id(IM_END));
        // a template that prints eos_token itself keeps the EOS token
        let own = "{% for m in messages %}{{ m['content'] }}{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}";
        let (kept, _) = chat_tokenizer(&tok, Some(own)).unwrap();
        assert_eq!(kept.eos_id(), tok.eos_id());
    }
}
