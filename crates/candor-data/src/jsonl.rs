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

/// Make an append-only JSONL file whole again after a crash: a last line without its newline
/// that does not parse as `T` was cut off mid-write and is removed (the file is truncated
/// and synced; returns `true`), one that parses only lacks its newline and gets it. Returns
/// the file's text after the repair (empty when the file does not exist) and whether a line
/// was removed.
pub fn repair_tail<T: DeserializeOwned>(path: &Path) -> Result<(String, bool)> {
    use std::io::Write;
    if !path.exists() {
        return Ok((String::new(), false));
    }
    let mut text =
        std::fs::read_to_string(path).map_err(|e| file_err(path, format!("cannot read: {e}")))?;
    if text.is_empty() || text.ends_with('\n') {
        return Ok((text, false));
    }
    let io = |e: std::io::Error| file_err(path, format!("cannot repair: {e}"));
    let cut = text.rfind('\n').map_or(0, |i| i + 1);
    if serde_json::from_str::<T>(&text[cut..]).is_err() {
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .map_err(io)?;
        file.set_len(cut as u64).map_err(io)?;
        file.sync_all().map_err(io)?;
        text.truncate(cut);
        Ok((text, true))
    } else {
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(path)
            .map_err(io)?;
        file.write_all(b"\n").map_err(io)?;
        file.sync_all().map_err(io)?;
        text.push('\n');
        Ok((text, false))
    }
}

pub(crate) fn strip_pos(e: &serde_json::Error) -> String {
    let s = e.to_string();
    match s.find(" at line ") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repair_tail_cuts_a_torn_line_and_completes_a_whole_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.jsonl");
        assert_eq!(
            repair_tail::<serde_json::Value>(&path).unwrap(),
            (String::new(), false)
        );
        std::fs::write(&path, "{\"a\": 1}\n{\"a\": 2}").unwrap();
        let (text, cut) = repair_tail::<serde_json::Value>(&path).unwrap();
        assert_eq!((text.as_str(), cut), ("{\"a\": 1}\n{\"a\": 2}\n", false));
        std::fs::write(&path, "{\"a\": 1}\n{\"a\": ").unwrap();
        let (text, cut) = repair_tail::<serde_json::Value>(&path).unwrap();
        assert_eq!((text.as_str(), cut), ("{\"a\": 1}\n", true));
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "{\"a\": 1}\n");
    }
}
