//! Prompt files: what `candor sample`, `candor generate` and the RL stages pose to a model.
//!
//! ```text
//! {"prompt": "...", "reference": "..."?, ...any other fields}
//! {"prompt": [{"role": "system", ...}?, ..., {"role": "user", "content": "..."}], ...}   (TRL conversational)
//! ```
//!
//! in any dataset file ([`crate::dataset`]: JSONL, JSON, Parquet, compressed, `hf:`) and any
//! shape that has a prompt ([`crate::formats::prompt_of`]: prompt-only, prompt-completion,
//! preferences, `messages`). Every field besides `prompt` is kept, in
//! [`PromptLine::fields`], for the judges that read it (`reference`, a test program, a
//! label). `fields` is the same type as `candor_judge::Fields`, so a line's fields go to a
//! judge as they are. A conversational prompt is its last user turn (`prompt`, what judges
//! see) and the turns before it (`context`), posed together with the chat template.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::chat::{ChatTemplate, Message};
use crate::dataset::Columns;
use crate::error::Result;
use crate::formats::{read_prompt_records, Prompt};

/// The other fields of a prompt line, by name (`candor_judge::Fields`).
pub type Fields = serde_json::Map<String, serde_json::Value>;

/// A line of a prompt file: the prompt and every other field of the line.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
pub struct PromptLine {
    /// The prompt; for a conversational one, its last user turn.
    pub prompt: String,
    /// The turns before it (a system message, earlier exchanges); empty for a plain prompt.
    #[serde(skip)]
    pub context: Vec<Message>,
    /// The line's other fields (`reference`, ...), for judges.
    #[serde(flatten)]
    pub fields: Fields,
}

impl PromptLine {
    /// The expected answer, for judges that compare with one (the `reference` field when it
    /// is a string).
    pub fn reference(&self) -> Option<&str> {
        self.fields.get("reference").and_then(|v| v.as_str())
    }

    /// The prompt as posed: rendered with the chat template (context, then the user turn),
    /// ending with the assistant header. A plain prompt renders exactly as
    /// [`ChatTemplate::render_prompt`].
    pub fn render(&self, template: &ChatTemplate) -> Result<String> {
        Prompt {
            text: self.prompt.clone(),
            context: self.context.clone(),
        }
        .render(template)
    }

    /// The prompt's text when it is a single user turn, or why a step that carries prompts
    /// as text (`sample`, `generate`) cannot take it.
    pub fn single_turn(&self) -> std::result::Result<&str, String> {
        match self.context.len() {
            0 => Ok(&self.prompt),
            n => Err(format!(
                "the prompt has {n} turn(s) before the last user turn; this step reads single-turn prompts only"
            )),
        }
    }
}

/// Read a prompt file: at least one prompt, none empty. Errors name the file and the line
/// (item, row).
pub fn read_prompts(path: &Path) -> Result<Vec<(usize, PromptLine)>> {
    read_prompts_with(path, &Columns::new())
}

/// [`read_prompts`] with the file's columns renamed (`{prompt: question}`).
pub fn read_prompts_with(path: &Path, columns: &Columns) -> Result<Vec<(usize, PromptLine)>> {
    Ok(read_prompt_records(path, columns)?
        .into_iter()
        .map(|p| {
            (
                p.record.number(),
                PromptLine {
                    prompt: p.prompt.text,
                    context: p.prompt.context,
                    fields: p.fields,
                },
            )
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/formats")
            .join(name)
    }

    #[test]
    fn prompts_of_every_form_read_the_same() {
        for name in [
            "prompts_conversational.jsonl",
            "prompts_standard.parquet",
            "prompts_conversational.parquet",
            "pref_trl_implicit.parquet",
        ] {
            let got = read_prompts(&fixture(name)).unwrap();
            let want = read_prompts(&fixture("prompts_standard.jsonl")).unwrap();
            assert_eq!(got.len(), 6, "{name}");
            for ((_, g), (_, w)) in got.iter().zip(&want) {
                assert_eq!(g.prompt, w.prompt, "{name}");
                assert!(g.context.is_empty());
            }
        }
        assert_eq!(
            read_prompts(&fixture("prompts_conversational.parquet")).unwrap()[0].1,
            read_prompts(&fixture("prompts_standard.jsonl")).unwrap()[0].1
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.jsonl");
        std::fs::write(&path, r#"{"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}], "label": 1}"#).unwrap();
        let p = &read_prompts(&path).unwrap()[0].1;
        assert_eq!(
            (p.prompt.as_str(), p.context.len(), &p.fields["label"]),
            ("Hi", 1, &serde_json::json!(1))
        );
        let t = ChatTemplate::new(crate::chat::DEFAULT_TEMPLATE, "", "");
        assert_eq!(
            p.render(&t).unwrap(),
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
        assert!(p
            .single_turn()
            .unwrap_err()
            .contains("single-turn prompts only"));
    }

    #[test]
    fn every_field_of_a_line_is_kept_and_bad_files_name_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.jsonl");
        std::fs::write(
            &path,
            "{\"prompt\": \"2+2?\", \"reference\": \"4\", \"tests\": [1, 2]}\n{\"prompt\": \"hi\"}\n",
        )
        .unwrap();
        let p = read_prompts(&path).unwrap();
        assert_eq!((p[0].0, p[1].0), (1, 2));
        assert_eq!(p[0].1.reference(), Some("4"));
        assert_eq!(p[0].1.fields["tests"], serde_json::json!([1, 2]));
        assert!(!p[0].1.fields.contains_key("prompt"));
        assert_eq!(p[1].1.reference(), None);
        std::fs::write(&path, "{\"prompt\": \"ok\"}\n{\"prompt\": \" \"}\n").unwrap();
        let e = read_prompts(&path).unwrap_err().to_string();
        assert_eq!(e, format!("{}:2: `prompt` is empty", path.display()));
        std::fs::write(&path, "").unwrap();
        let e = read_prompts(&path).unwrap_err().to_string();
        assert!(
            e.starts_with(&format!("{}: no prompts", path.display())),
            "{e}"
        );
    }
}
