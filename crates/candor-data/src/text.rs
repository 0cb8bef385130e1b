//! Pretraining text: files of plain text (one document each) or JSONL with a `text` field
//! (one document per line; also JSON, Parquet, `.jsonl.gz`/`.zst` and `hf:` datasets), tokenised with an end-of-text token after each document,
//! split into a training and a held-out stream, and packed into `ctx + 1`-token sequences
//! (inputs are the first `ctx`, targets the last `ctx`).

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::{file_err, line_err, Error, Result};
use crate::tokenizer::Tokenizer;

/// Expand directories into their `.txt`, `.md` and `.jsonl` files (sorted).
pub fn expand_paths(paths: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut out = vec![];
    for p in paths {
        if p.is_dir() {
            let mut files: Vec<PathBuf> = std::fs::read_dir(p)
                .map_err(|e| file_err(p, format!("cannot list: {e}")))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|f| {
                    f.is_file()
                        && matches!(
                            f.extension().and_then(|e| e.to_str()),
                            Some("txt" | "md" | "jsonl")
                        )
                })
                .collect();
            files.sort();
            if files.is_empty() {
                return Err(file_err(p, "directory has no .txt, .md or .jsonl files"));
            }
            out.extend(files);
        } else if p.is_file() || crate::dataset::is_hf_spec(p) {
            out.push(p.clone());
        } else {
            return Err(file_err(p, "no such file or directory"));
        }
    }
    Ok(out)
}

#[derive(Deserialize)]
struct TextLine {
    text: Option<serde_json::Value>,
}

/// Read the documents of one file: plain text, JSONL with `text`, or any other dataset file
/// ([`crate::dataset`]: JSON, Parquet, compressed, `hf:`) whose records have `text`.
pub fn read_documents(path: &Path) -> Result<Vec<String>> {
    let name = path.to_string_lossy();
    if crate::dataset::is_hf_spec(path)
        || (crate::dataset::DATA_EXTENSIONS
            .iter()
            .any(|e| name.ends_with(e))
            && !name.ends_with(".jsonl"))
    {
        let mut docs = vec![];
        for r in crate::dataset::read_records(path, &Default::default())? {
            match r.fields.get("text") {
                Some(serde_json::Value::String(s)) => {
                    if !s.trim().is_empty() {
                        docs.push(s.clone())
                    }
                }
                Some(_) => return Err(r.err("`text` must be a string")),
                None => return Err(r.err("missing field `text`")),
            }
        }
        return Ok(docs);
    }
    let is_jsonl = path.extension().and_then(|e| e.to_str()) == Some("jsonl");
    let raw = std::fs::read(path).map_err(|e| file_err(path, format!("cannot read: {e}")))?;
    let text = String::from_utf8(raw).map_err(|e| {
        file_err(
            path,
            format!("not UTF-8 text (byte {})", e.utf8_error().valid_up_to()),
        )
    })?;
    if !is_jsonl {
        return Ok(if text.trim().is_empty() {
            vec![]
        } else {
            vec![text]
        });
    }
    let mut docs = vec![];
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: TextLine = serde_json::from_str(line)
            .map_err(|e| line_err(path, i + 1, format!("not a JSON object: {e}")))?;
        match v.text {
            Some(serde_json::Value::String(s)) => {
                if !s.trim().is_empty() {
                    docs.push(s)
                }
            }
            Some(_) => return Err(line_err(path, i + 1, "`text` must be a string")),
            None => return Err(line_err(path, i + 1, "missing field `text`")),
        }
    }
    Ok(docs)
}

/// Read all documents of all files, in order.
pub fn read_corpus(paths: &[PathBuf]) -> Result<Vec<String>> {
    let files = expand_paths(paths)?;
    let mut docs = vec![];
    for f in &files {
        docs.extend(read_documents(f)?);
    }
    if docs.is_empty() {
        let names: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
        return Err(Error::Msg(format!(
            "corpus is empty: {} hold no text",
            names.join(", ")
        )));
    }
    Ok(docs)
}

/// Tokenise documents into one stream, `eos` after each.
pub fn tokenize_documents(tok: &Tokenizer, docs: &[String], eos: u32) -> Result<Vec<u32>> {
    let encoded = tok.encode_batch(docs)?;
    let mut stream = Vec::with_capacity(encoded.iter().map(|e| e.len() + 1).sum());
    for e in encoded {
        stream.extend(e);
        stream.push(eos);
    }
    Ok(stream)
}

/// Cut a token stream into sequences of `ctx + 1` tokens, consecutive ones overlapping by
/// one token so every token is a target exactly once. A shorter tail is dropped.
pub fn pack(tokens: &[u32], ctx: usize) -> Vec<Vec<u32>> {
    if tokens.len() < ctx + 1 {
        return vec![];
    }
    (0..=(tokens.len() - ctx - 1) / ctx)
        .map(|i| tokens[i * ctx..i * ctx + ctx + 1].to_vec())
        .collect()
}

/// Like [`pack`], but keeps the shorter tail (of at least two tokens), so that every token
/// but the first is a target exactly once: for evaluating a whole text.
pub fn pack_all(tokens: &[u32], ctx: usize) -> Vec<Vec<u32>> {
    (0..tokens.len().saturating_sub(1))
        .step_by(ctx.max(1))
        .map(|i| tokens[i..(i + ctx + 1).min(tokens.len())].to_vec())
        .collect()
}

/// The packed corpus: training and held-out sequences.
pub struct PackedCorpus {
    pub train: Vec<Vec<u32>>,
    pub heldout: Vec<Vec<u32>>,
    pub total_tokens: usize,
}

/// Split the stream at `1 - heldout_fraction` (the held-out part is the tail, text the
/// model never sees in training) and pack both parts.
pub fn pack_corpus(tokens: &[u32], ctx: usize, heldout_fraction: f64) -> Result<PackedCorpus> {
    let need = if heldout_fraction > 0.0 {
        2 * (ctx + 1)
    } else {
        ctx + 1
    };
    if tokens.len() < need {
        return Err(Error::Msg(format!(
            "corpus has {} tokens, too few for ctx {ctx} (need at least {need}: one training and one held-out sequence)",
            tokens.len()
        )));
    }
    let mut split = ((tokens.len() as f64) * (1.0 - heldout_fraction)).round() as usize;
    if heldout_fraction > 0.0 {
        split = split.min(tokens.len() - (ctx + 1)).max(ctx + 1);
    }
    let train = pack(&tokens[..split], ctx);
    let heldout = if heldout_fraction > 0.0 {
        pack(&tokens[split..], ctx)
    } else {
        vec![]
    };
    Ok(PackedCorpus {
        train,
        heldout,
        total_tokens: tokens.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pack_all_keeps_the_tail() {
        let t: Vec<u32> = (0..11).collect();
        assert_eq!(
            pack_all(&t, 3),
            vec![
                vec![0, 1, 2, 3],
                vec![3, 4, 5, 6],
                vec![6, 7, 8, 9],
                vec![9, 10]
            ]
        );
        assert_eq!(pack_all(&t[..10], 3), pack(&t[..10], 3));
        assert!(pack_all(&t[..1], 3).is_empty());
    }

    #[test]
    fn pack_overlaps_by_one_and_drops_short_tail() {
        let t: Vec<u32> = (0..10).collect();
        assert_eq!(
            pack(&t, 3),
            vec![vec![0, 1, 2, 3], vec![3, 4, 5, 6], vec![6, 7, 8, 9]]
        );
        assert_eq!(pack(&t[..9], 3).len(), 2);
        assert!(pack(&t[..3], 3).is_empty());
    }

    #[test]
    fn heldout_is_the_tail_and_small_corpora_are_rejected() {
        let t: Vec<u32> = (0..100).collect();
        let p = pack_corpus(&t, 4, 0.2).unwrap();
        assert_eq!(p.heldout[0][0], 80);
        assert!(p.train.iter().all(|s| s[4] <= 80));
        let e = pack_corpus(&t[..7], 4, 0.1).err().unwrap().to_string();
        assert!(e.contains("corpus has 7 tokens, too few for ctx 4"), "{e}");
    }

    #[test]
    fn jsonl_errors_name_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.jsonl");
        std::fs::write(&p, "{\"text\": \"a\"}\n\n{\"txt\": \"b\"}\n").unwrap();
        let e = read_documents(&p).unwrap_err().to_string();
        assert!(e.ends_with("c.jsonl:3: missing field `text`"), "{e}");
        std::fs::write(&p, "{\"text\": \"a\"}\nnot json\n").unwrap();
        assert!(read_documents(&p)
            .unwrap_err()
            .to_string()
            .contains("c.jsonl:2: not a JSON object"));
        std::fs::write(&p, "").unwrap();
        let e = read_corpus(std::slice::from_ref(&p))
            .unwrap_err()
            .to_string();
        assert!(e.contains("corpus is empty"), "{e}");
        let e = read_corpus(&[dir.path().join("nope.txt")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("nope.txt: no such file"), "{e}");
    }
}
