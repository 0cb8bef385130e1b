//! Prompt files (JSONL): what `candor sample`, `candor generate` and the RL stages pose to a
//! model.
//!
//! ```text
//! {"prompt": "...", "reference": "..."?, ...any other fields}
//! ```
//!
//! Every field besides `prompt` is kept, in [`PromptLine::fields`], for the judges that
//! read it (`reference`, a test program, a label). `fields` is the same type as
//! `candor_judge::Fields`, so a line's fields go to a judge as they are.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{file_err, line_err, Result};
use crate::jsonl::read_jsonl;

/// The other fields of a prompt line, by name (`candor_judge::Fields`).
pub type Fields = serde_json::Map<String, serde_json::Value>;

/// A line of a prompt file: the prompt and every other field of the line.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
pub struct PromptLine {
    pub prompt: String,
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
}

/// Read a prompt file: at least one line, every prompt non-empty. Errors name the file and
/// the line.
pub fn read_prompts(path: &Path) -> Result<Vec<(usize, PromptLine)>> {
    let lines: Vec<(usize, PromptLine)> = read_jsonl(path)?;
    if lines.is_empty() {
        return Err(file_err(
            path,
            "no prompts (expected JSONL lines {\"prompt\": ...})",
        ));
    }
    for (line, p) in &lines {
        if p.prompt.trim().is_empty() {
            return Err(line_err(path, *line, "`prompt` is empty"));
        }
    }
    Ok(lines)
}

#[cfg(test)]
mod tests {
    use super::*;

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
