//! JSONL reading where every bad line is reported as `file:line: what is wrong`.

use std::path::Path;

use serde::de::DeserializeOwned;

use crate::error::{file_err, line_err, Result};

/// Parse each non-blank line of a JSONL file as `T`; returns (line number, value).
pub fn read_jsonl<T: DeserializeOwned>(path: &Path) -> Result<Vec<(usize, T)>> {
    let text =
        std::fs::read_to_string(path).map_err(|e| file_err(path, format!("cannot read: {e}")))?;
    let mut out = vec![];
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: T = serde_json::from_str(line)
            .map_err(|e| line_err(path, i + 1, strip_pos(&e).to_string()))?;
        out.push((i + 1, v));
    }
    Ok(out)
}

pub(crate) fn strip_pos(e: &serde_json::Error) -> String {
    let s = e.to_string();
    match s.find(" at line ") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}
