//! The shapes of dataset records candor reads: TRL's documented formats, standard (text)
//! and conversational (message lists), and candor's own.
//!
//! ```text
//! language modelling   {"text": "..."}                  {"messages": [{"role", "content"}, ...]}
//! prompt-only          {"prompt": "..."}                {"prompt": [messages ending with a user turn]}
//! prompt-completion    {"prompt": "...", "completion": "..."}       (conversational: message lists)
//! preference           {"prompt", "chosen", "rejected"}             (strings or message lists)
//!   implicit prompt    {"chosen": [...], "rejected": [...]}         (whole conversations sharing their opening)
//! unpaired preference  {"prompt", "completion", "label": true|false}
//! candor               {"prompt", "responses": [best, ...], "ranks"?}   {"prompt", "response"}
//! ```
//!
//! A conversational prompt is its last user turn (`text`, what judges see as the prompt)
//! and the turns before it (`context`: a system message, earlier exchanges); it is posed
//! with the model's chat template. Columns of other names are renamed first
//! ([`crate::dataset::Columns`]).

use serde_json::{Map, Value};

use std::path::Path;

use crate::chat::{ChatTemplate, Message};
use crate::dataset::{read_records, Columns, Record};
use crate::error::Result;

/// Every shape, for error messages.
pub const SHAPES: &str = "`text`; `messages`; `prompt` (a string or a message list); `prompt` + `completion`; `prompt` + `chosen` + `rejected` (strings or message lists); `chosen` + `rejected` conversations sharing their opening turns; `prompt` + `completion` + `label`; `prompt` + `responses` (+ `ranks`); `prompt` + `response`";

/// A prompt: the last user turn and the conversation before it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Prompt {
    /// The last user turn's text (what a judge sees as the prompt).
    pub text: String,
    /// The turns before it (a system message, earlier exchanges); empty for a plain prompt.
    pub context: Vec<Message>,
}

impl Prompt {
    pub fn plain(text: &str) -> Self {
        Prompt {
            text: text.into(),
            context: vec![],
        }
    }

    /// The whole prompt as a conversation.
    pub fn messages(&self) -> Vec<Message> {
        let mut m = self.context.clone();
        m.push(Message::new("user", &self.text));
        m
    }

    /// The prompt as posed to the model: rendered with the chat template, ending with the
    /// assistant header. A plain prompt renders exactly as [`ChatTemplate::render_prompt`].
    pub fn render(&self, template: &ChatTemplate) -> Result<String> {
        template.render(&self.messages(), true)
    }
}

/// A message list (`[{"role": ..., "content": ...}, ...]`), or why `key` is not one.
pub fn messages(v: &Value, key: &str) -> std::result::Result<Vec<Message>, String> {
    let not = || {
        format!("`{key}` is not a message list ([{{\"role\": ..., \"content\": \"...\"}}, ...])")
    };
    let list = v.as_array().ok_or_else(not)?;
    list.iter()
        .enumerate()
        .map(|(i, m)| {
            let role = m.get("role").and_then(Value::as_str);
            let content = m.get("content").and_then(Value::as_str);
            match (role, content) {
                (Some(r), Some(c)) if matches!(r, "system" | "user" | "assistant") => {
                    Ok(Message::new(r, c))
                }
                (Some(r), Some(_)) => Err(format!(
                    "`{key}` message {}: role `{r}` is not system, user or assistant",
                    i + 1
                )),
                _ => Err(format!(
                    "`{key}` message {}: expected {{\"role\": ..., \"content\": \"...\"}} with text content",
                    i + 1
                )),
            }
        })
        .collect()
}

/// A prompt from a message list: it must end with a user turn.
fn prompt_of_messages(mut m: Vec<Message>, key: &str) -> std::result::Result<Prompt, String> {
    match m.last() {
        Some(last) if last.role == "user" => {
            let last = m.pop().expect("not empty");
            Ok(Prompt {
                text: last.content,
                context: m,
            })
        }
        Some(last) => Err(format!(
            "`{key}` ends with a {} turn; a prompt ends with the user's turn",
            last.role
        )),
        None => Err(format!("`{key}` is an empty message list")),
    }
}

/// A `prompt` field: a string or a message list ending with a user turn.
pub fn prompt_field(v: &Value) -> std::result::Result<Prompt, String> {
    let p = match v {
        Value::String(s) => Prompt::plain(s),
        Value::Array(_) => prompt_of_messages(messages(v, "prompt")?, "prompt")?,
        _ => return Err("`prompt` is neither a string nor a message list".into()),
    };
    if p.text.trim().is_empty() {
        return Err("`prompt` is empty".into());
    }
    Ok(p)
}

/// The longest shared opening of two conversations.
fn shared_opening(a: &[Message], b: &[Message]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// TRL's implicit prompt of two strings (`extract_prompt`): their longest common prefix,
/// backed off to before a space it ends on.
fn shared_text(a: &str, b: &str) -> usize {
    let mut end = a
        .char_indices()
        .zip(b.chars())
        .find(|((_, x), y)| x != y)
        .map(|((i, _), _)| i)
        .unwrap_or(a.len().min(b.len()));
    if a[..end].ends_with(' ') {
        end -= 1;
    }
    end
}

/// The prompt of any record that has one: `prompt`; else a `messages` conversation's turns
/// before its last assistant turn; else the implicit prompt of `chosen`/`rejected`
/// conversations. Returns it and the record's other fields (all but `prompt`).
pub fn prompt_of(fields: &Map<String, Value>) -> std::result::Result<Prompt, String> {
    if let Some(p) = fields.get("prompt") {
        return prompt_field(p);
    }
    if let Some(m) = fields.get("messages") {
        let mut m = messages(m, "messages")?;
        if let Some(i) = m.iter().rposition(|t| t.role == "assistant") {
            m.truncate(i);
        }
        return prompt_of_messages(m, "messages");
    }
    if let (Some(c), Some(r)) = (fields.get("chosen"), fields.get("rejected")) {
        return Ok(implicit_preference(c, r)?.0);
    }
    Err(format!(
        "no prompt here; expected one of the shapes {SHAPES}"
    ))
}

/// `chosen`/`rejected` without a `prompt`: the shared opening is the prompt, the rest of
/// each the response.
pub fn implicit_preference(
    chosen: &Value,
    rejected: &Value,
) -> std::result::Result<(Prompt, String, String), String> {
    match (chosen, rejected) {
        (Value::String(c), Value::String(r)) => {
            let n = shared_text(c, r);
            let prompt = &c[..n];
            if prompt.trim().is_empty() {
                return Err("`chosen` and `rejected` share no opening text to take as the prompt; give a `prompt`".into());
            }
            Ok((
                Prompt::plain(prompt),
                c[n..].to_string(),
                r[n..].to_string(),
            ))
        }
        (Value::Array(_), Value::Array(_)) => {
            let (c, r) = (messages(chosen, "chosen")?, messages(rejected, "rejected")?);
            let n = shared_opening(&c, &r);
            let prompt =
                prompt_of_messages(c[..n].to_vec(), "the opening `chosen` and `rejected` share")?;
            Ok((
                prompt,
                one_reply(&c[n..], "chosen")?,
                one_reply(&r[n..], "rejected")?,
            ))
        }
        _ => Err("`chosen` and `rejected` must both be strings or both message lists".into()),
    }
}

/// A response given as a message list: exactly one assistant turn.
fn one_reply(m: &[Message], key: &str) -> std::result::Result<String, String> {
    match m {
        [one] if one.role == "assistant" => Ok(one.content.clone()),
        _ => {
            Err(format!(
            "`{key}` must come down to one assistant turn after the prompt (got {} turn(s): {})",
            m.len(),
            m.iter().map(|t| t.role.as_str()).collect::<Vec<_>>().join(", ")
        ))
        }
    }
}

/// A response field: a string, or a message list of one assistant turn.
pub fn response_field(v: &Value, key: &str) -> std::result::Result<String, String> {
    match v {
        Value::String(s) => Ok(s.clone()),
        Value::Array(_) => one_reply(&messages(v, key)?, key),
        _ => Err(format!("`{key}` is neither a string nor a message list")),
    }
}

/// The record's fields besides `prompt`: what judges get beside the prompt and response.
pub fn other_fields(fields: &Map<String, Value>) -> Map<String, Value> {
    fields
        .iter()
        .filter(|(k, _)| k.as_str() != "prompt")
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// A prompt read from any dataset record, with the record's other fields (for judges) and
/// where it came from.
#[derive(Clone, Debug)]
pub struct PromptRecord {
    pub record: Record,
    pub prompt: Prompt,
    /// Every field of the record besides `prompt`.
    pub fields: Map<String, Value>,
}

/// Read the prompts of a dataset ([`read_records`]): every record must yield one
/// ([`prompt_of`]); an empty dataset is an error.
pub fn read_prompt_records(spec: &Path, columns: &Columns) -> Result<Vec<PromptRecord>> {
    let records = read_records(spec, columns)?;
    if records.is_empty() {
        return Err(crate::error::file_err(
            spec,
            format!("no prompts (expected records of a shape with a prompt: {SHAPES})"),
        ));
    }
    records
        .into_iter()
        .map(|record| {
            let prompt = prompt_of(&record.fields).map_err(|m| record.err(m))?;
            let fields = other_fields(&record.fields);
            Ok(PromptRecord {
                record,
                prompt,
                fields,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(s: &str) -> Map<String, Value> {
        serde_json::from_str(s).unwrap()
    }

    #[test]
    fn prompts_of_every_shape() {
        let plain = Prompt::plain("What color is the sky?");
        for line in [
            r#"{"prompt": "What color is the sky?"}"#,
            r#"{"prompt": [{"role": "user", "content": "What color is the sky?"}]}"#,
            r#"{"prompt": "What color is the sky?", "completion": "Blue."}"#,
            r#"{"messages": [{"role": "user", "content": "What color is the sky?"}, {"role": "assistant", "content": "Blue."}]}"#,
            r#"{"chosen": [{"role": "user", "content": "What color is the sky?"}, {"role": "assistant", "content": "Blue."}],
                "rejected": [{"role": "user", "content": "What color is the sky?"}, {"role": "assistant", "content": "Green."}]}"#,
        ] {
            assert_eq!(prompt_of(&obj(line)).unwrap(), plain, "{line}");
        }
        let sys = prompt_of(&obj(
            r#"{"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]}"#,
        ))
        .unwrap();
        assert_eq!(sys.text, "Hi");
        assert_eq!(sys.context, vec![Message::new("system", "Be brief.")]);
        let e = prompt_of(&obj(
            r#"{"prompt": [{"role": "assistant", "content": "Hi"}]}"#,
        ))
        .unwrap_err();
        assert!(e.contains("ends with a assistant turn"), "{e}");
        let e = prompt_of(&obj(r#"{"question": "x"}"#)).unwrap_err();
        assert!(e.contains("expected one of the shapes `text`"), "{e}");
    }

    #[test]
    fn implicit_prompts_follow_trl() {
        // TRL's extract_prompt example (standard form)
        let (p, c, r) =
            implicit_preference(&"The sky is blue.".into(), &"The sky is green.".into()).unwrap();
        assert_eq!(
            (p.text.as_str(), c.as_str(), r.as_str()),
            ("The sky is", " blue.", " green.")
        );
        let e = implicit_preference(&"a".into(), &"b".into()).unwrap_err();
        assert!(e.contains("share no opening"), "{e}");
        let conv = |reply: &str| -> Value {
            serde_json::json!([{"role": "user", "content": "q"}, {"role": "assistant", "content": reply}, {"role": "user", "content": "more"}])
        };
        let e = implicit_preference(&conv("a"), &conv("b")).unwrap_err();
        assert!(e.contains("one assistant turn"), "{e}");
    }

    #[test]
    fn responses_are_strings_or_one_assistant_turn() {
        assert_eq!(response_field(&"x".into(), "chosen").unwrap(), "x");
        let one = serde_json::json!([{"role": "assistant", "content": "x"}]);
        assert_eq!(response_field(&one, "chosen").unwrap(), "x");
        let two = serde_json::json!([{"role": "user", "content": "x"}]);
        assert!(response_field(&two, "chosen").is_err());
        let bad = serde_json::json!([{"role": "tool", "content": "x"}]);
        assert!(response_field(&bad, "chosen")
            .unwrap_err()
            .contains("role `tool`"));
    }
}
