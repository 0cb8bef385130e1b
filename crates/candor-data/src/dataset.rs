//! Dataset files as records (one JSON object each), whatever they are stored as:
//!
//! - JSON Lines (`.jsonl`, and `.json` written by `datasets`' `to_json`), a JSON array of
//!   objects (`.json` starting with `[`), either compressed as `.gz` or `.zst`;
//! - Parquet (`.parquet`, what the Hugging Face Hub and `datasets` store), read row by row;
//! - `hf:ORG/NAME[@REVISION][:SPLIT]`: a dataset in the local Hugging Face cache
//!   (`datasets--ORG--NAME/snapshots/<commit>/…`, the layout `huggingface_hub` writes),
//!   every file of the split (default `train`) in name order. Nothing is downloaded.
//!
//! Column mapping renames a file's columns to the names candor reads
//! (`data.columns: {prompt: question, chosen: good}`) before anything looks at them.
//! Every record remembers where it came from, so a bad one is reported as `file:line`,
//! `file: item N` (JSON array) or `file: row N` (Parquet).

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use hf_hub::{Repo, RepoType};
use serde_json::{Map, Value};

use crate::error::{file_err, line_err, Error, Result};

/// The prefix that names a dataset in the Hugging Face cache instead of a file.
pub const HF_PREFIX: &str = "hf:";

/// Extensions of the files a dataset may be made of (directories and `hf:` snapshots are
/// searched for these).
pub const DATA_EXTENSIONS: &[&str] = &[
    ".jsonl",
    ".json",
    ".parquet",
    ".jsonl.gz",
    ".jsonl.zst",
    ".json.gz",
    ".json.zst",
];

/// Whether a data path names a dataset in the Hugging Face cache (`hf:…`) rather than a file.
pub fn is_hf_spec(spec: &Path) -> bool {
    spec.to_str().is_some_and(|s| s.starts_with(HF_PREFIX))
}

/// candor's name for a column → the dataset's name for it.
pub type Columns = BTreeMap<String, String>;

/// Where in its file a record is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum At {
    /// A line of a JSON Lines file (1-based).
    Line(usize),
    /// An element of a JSON array (1-based).
    Item(usize),
    /// A row of a Parquet file (1-based).
    Row(usize),
}

/// One record of a dataset and where it came from.
#[derive(Clone, Debug, PartialEq)]
pub struct Record {
    pub path: PathBuf,
    pub at: At,
    pub fields: Map<String, Value>,
}

impl Record {
    /// An error about this record: `file:line: msg`, `file: item N: msg`, `file: row N: msg`.
    pub fn err(&self, msg: impl Into<String>) -> Error {
        match self.at {
            At::Line(n) => line_err(&self.path, n, msg),
            At::Item(n) => file_err(&self.path, format!("item {n}: {}", msg.into())),
            At::Row(n) => file_err(&self.path, format!("row {n}: {}", msg.into())),
        }
    }

    /// The line number of a JSONL record, else the item or row number.
    pub fn number(&self) -> usize {
        match self.at {
            At::Line(n) | At::Item(n) | At::Row(n) => n,
        }
    }
}

fn has_extension(path: &Path, exts: &[&str]) -> bool {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    exts.iter().any(|e| name.ends_with(e))
}

/// Read every record of a dataset: a file (see the module doc), or `hf:ORG/NAME…`; then
/// rename columns by `columns`.
pub fn read_records(spec: &Path, columns: &Columns) -> Result<Vec<Record>> {
    let files = match spec.to_str().and_then(|s| s.strip_prefix(HF_PREFIX)) {
        Some(repo) => hf_dataset_files(repo, &hub_cache_dir()?)?,
        None => vec![spec.to_path_buf()],
    };
    let mut out = vec![];
    for f in &files {
        out.extend(read_file(f)?);
    }
    if !columns.is_empty() {
        for r in &mut out {
            rename_columns(&mut r.fields, columns);
        }
    }
    Ok(out)
}

/// Rename a record's columns: for each `candor ← theirs`, the value of `theirs` (when the
/// record has it) becomes `candor`'s, replacing any column already called so.
pub fn rename_columns(fields: &mut Map<String, Value>, columns: &Columns) {
    for (ours, theirs) in columns {
        if let Some(v) = fields.remove(theirs) {
            fields.insert(ours.clone(), v);
        }
    }
}

/// Check a column mapping against the names candor reads (`known`): a key that is not one
/// of them is a typo.
pub fn check_columns(columns: &Columns, known: &[&str]) -> std::result::Result<(), String> {
    for ours in columns.keys() {
        if !known.contains(&ours.as_str()) {
            return Err(format!(
                "columns: `{ours}` is not a column candor reads here; known: {}",
                known.join(", ")
            ));
        }
    }
    Ok(())
}

/// Read one file's records.
pub fn read_file(path: &Path) -> Result<Vec<Record>> {
    if has_extension(path, &[".parquet"]) {
        return read_parquet(path);
    }
    let text = read_text(path)?;
    let records = |at: fn(usize) -> At, values: Vec<(usize, Value)>| -> Result<Vec<Record>> {
        values
            .into_iter()
            .map(|(n, v)| {
                let rec = Record {
                    path: path.to_path_buf(),
                    at: at(n),
                    fields: Map::new(),
                };
                match v {
                    Value::Object(fields) => Ok(Record { fields, ..rec }),
                    other => Err(rec.err(format!("not a JSON object (got {})", kind_of(&other)))),
                }
            })
            .collect()
    };
    if text.trim_start().starts_with('[') {
        let items: Vec<Value> = serde_json::from_str(&text)
            .map_err(|e| file_err(path, format!("not a JSON array of objects: {e}")))?;
        return records(
            At::Item,
            items
                .into_iter()
                .enumerate()
                .map(|(i, v)| (i + 1, v))
                .collect(),
        );
    }
    let mut values = vec![];
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: Value = serde_json::from_str(line)
            .map_err(|e| line_err(path, i + 1, crate::jsonl::strip_pos(&e)))?;
        values.push((i + 1, v));
    }
    records(At::Line, values)
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A text file's content, decompressed by its extension (`.gz`, `.zst`).
pub fn read_text(path: &Path) -> Result<String> {
    let cannot = |e: std::io::Error| file_err(path, format!("cannot read: {e}"));
    let file = std::fs::File::open(path).map_err(cannot)?;
    let mut reader: Box<dyn Read> = if has_extension(path, &[".gz"]) {
        Box::new(flate2::read::MultiGzDecoder::new(file))
    } else if has_extension(path, &[".zst"]) {
        Box::new(zstd::stream::read::Decoder::new(file).map_err(cannot)?)
    } else {
        Box::new(file)
    };
    let mut text = String::new();
    reader.read_to_string(&mut text).map_err(cannot)?;
    Ok(text)
}

/// A Parquet file's rows as JSON objects (lists → arrays, structs → objects).
fn read_parquet(path: &Path) -> Result<Vec<Record>> {
    use parquet::file::reader::{FileReader, SerializedFileReader};
    let bad = |e: parquet::errors::ParquetError| {
        file_err(path, format!("not a readable Parquet file: {e}"))
    };
    let file =
        std::fs::File::open(path).map_err(|e| file_err(path, format!("cannot read: {e}")))?;
    let reader = SerializedFileReader::new(file).map_err(bad)?;
    let mut out = vec![];
    for (i, row) in reader.get_row_iter(None).map_err(bad)?.enumerate() {
        let rec = Record {
            path: path.to_path_buf(),
            at: At::Row(i + 1),
            fields: Map::new(),
        };
        let row = row.map_err(|e| rec.err(format!("cannot read: {e}")))?;
        match row.to_json_value() {
            Value::Object(fields) => out.push(Record { fields, ..rec }),
            other => return Err(rec.err(format!("not a record (got {})", kind_of(&other)))),
        }
    }
    Ok(out)
}

/// The hub cache directory, as `huggingface_hub` finds it (`$HF_HUB_CACHE`, else
/// `$HF_HOME/hub`, else `~/.cache/huggingface/hub`).
pub fn hub_cache_dir() -> Result<PathBuf> {
    if let Some(dir) =
        std::env::var_os("HF_HUB_CACHE").or_else(|| std::env::var_os("HUGGINGFACE_HUB_CACHE"))
    {
        return Ok(PathBuf::from(dir));
    }
    if std::env::var_os("HF_HOME").is_some() || std::env::var_os("HOME").is_some() {
        return Ok(hf_hub::Cache::from_env().path().clone());
    }
    Err(Error::Msg(
        "cannot find the Hugging Face cache: set HF_HUB_CACHE or HF_HOME".into(),
    ))
}

/// Whether `path` (relative to a snapshot) belongs to `split`: a folder of that name
/// (`train/0000.parquet`) or a file named for it (`data/train-00000-of-00001.parquet`,
/// `train.jsonl`).
fn in_split(path: &Path, split: &str) -> bool {
    let mut parts: Vec<&str> = path.iter().filter_map(|p| p.to_str()).collect();
    let Some(file) = parts.pop() else {
        return false;
    };
    parts.contains(&split)
        || file
            .strip_prefix(split)
            .is_some_and(|rest| rest.starts_with(['-', '.', '_']))
}

fn data_files(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let p = entry?.path();
        if p.is_dir() {
            if p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with('.'))
            {
                continue;
            }
            data_files(&p, out)?;
        } else if has_extension(&p, DATA_EXTENSIONS) {
            out.push(p);
        }
    }
    Ok(())
}

/// The files of `ORG/NAME[@REVISION][:SPLIT]` in the cache at `cache_dir`.
pub fn hf_dataset_files(spec: &str, cache_dir: &Path) -> Result<Vec<PathBuf>> {
    let usage = || {
        Error::Msg(format!(
            "{HF_PREFIX}{spec}: expected {HF_PREFIX}ORG/NAME[@REVISION][:SPLIT] (e.g. hf:trl-lib/ultrafeedback_binarized:test)"
        ))
    };
    let (repo_rev, split) = match spec.split_once(':') {
        Some((r, s)) if !s.is_empty() => (r, s),
        Some(_) => return Err(usage()),
        None => (spec, "train"),
    };
    let (repo_id, revision) = match repo_rev.split_once('@') {
        Some((id, rev)) if !rev.is_empty() => (id, rev),
        Some(_) => return Err(usage()),
        None => (repo_rev, "main"),
    };
    let valid = |s: &str| {
        !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    };
    match repo_id.split_once('/') {
        Some((org, name)) if valid(org) && valid(name) => {}
        _ => return Err(usage()),
    }
    let repo = Repo::with_revision(repo_id.into(), RepoType::Dataset, revision.into());
    let repo_dir = cache_dir.join(repo.folder_name());
    let how = format!(
        "candor never downloads; fetch it where there is network (`hf download --repo-type dataset {repo_id}`, or `datasets.load_dataset(\"{repo_id}\")` with HF_HUB_CACHE pointing at a folder you copy) and put the cache folder at {}",
        repo_dir.display()
    );
    if !repo_dir.is_dir() {
        return Err(file_err(
            &repo_dir,
            format!("{HF_PREFIX}{repo_id} is not in the Hugging Face cache: {how}"),
        ));
    }
    // a revision is a ref (refs/<name> holds a commit hash) or a commit hash itself
    let ref_file = repo_dir.join("refs").join(revision);
    let commit = if ref_file.is_file() {
        std::fs::read_to_string(&ref_file)
            .map_err(|e| file_err(&ref_file, format!("cannot read: {e}")))?
            .trim()
            .to_string()
    } else if revision.len() >= 7 && revision.chars().all(|c| c.is_ascii_hexdigit()) {
        revision.to_string()
    } else {
        return Err(file_err(
            &ref_file,
            format!("missing: the cache has no revision `{revision}` of {repo_id} (write the snapshot's commit hash into this file, or give {HF_PREFIX}{repo_id}@COMMIT)"),
        ));
    };
    let snapshot = repo_dir.join("snapshots").join(&commit);
    if !snapshot.is_dir() {
        return Err(file_err(
            &snapshot,
            format!("missing: revision `{revision}` points at snapshot {commit}, which is not in the cache; {how}"),
        ));
    }
    let mut all = vec![];
    data_files(&snapshot, &mut all)
        .map_err(|e| file_err(&snapshot, format!("cannot list: {e}")))?;
    all.sort();
    let mut splits: Vec<String> = vec![];
    let mut files = vec![];
    for f in all {
        let rel = f.strip_prefix(&snapshot).unwrap_or(&f).to_path_buf();
        if in_split(&rel, split) {
            files.push(f);
        } else {
            splits.push(rel.display().to_string());
        }
    }
    if files.is_empty() {
        return Err(file_err(
            &snapshot,
            format!(
                "{HF_PREFIX}{repo_id} has no files of split `{split}` ({}); name the split with {HF_PREFIX}{repo_id}:SPLIT",
                if splits.is_empty() {
                    format!("no {} files at all", DATA_EXTENSIONS.join(" "))
                } else {
                    format!("it has {}", splits.join(", "))
                }
            ),
        ));
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jsonl_json_arrays_and_compressed_files_read_the_same() {
        let dir = tempfile::tempdir().unwrap();
        let rows = [r#"{"prompt": "a", "n": 1}"#, r#"{"prompt": "b", "n": 2}"#];
        let jsonl = dir.path().join("d.jsonl");
        std::fs::write(&jsonl, rows.join("\n\n") + "\n").unwrap();
        let array = dir.path().join("d.json");
        std::fs::write(&array, format!("[{}]", rows.join(",\n"))).unwrap();
        let gz = dir.path().join("d.jsonl.gz");
        let mut enc = flate2::write::GzEncoder::new(
            std::fs::File::create(&gz).unwrap(),
            flate2::Compression::default(),
        );
        std::io::Write::write_all(&mut enc, rows.join("\n").as_bytes()).unwrap();
        enc.finish().unwrap();
        let zst = dir.path().join("d.jsonl.zst");
        std::fs::write(
            &zst,
            zstd::encode_all(rows.join("\n").as_bytes(), 3).unwrap(),
        )
        .unwrap();
        let fields = |p: &Path| -> Vec<Map<String, Value>> {
            read_records(p, &Columns::new())
                .unwrap()
                .into_iter()
                .map(|r| r.fields)
                .collect()
        };
        let want = fields(&jsonl);
        assert_eq!(want.len(), 2);
        assert_eq!(want[1]["prompt"], "b");
        for p in [&array, &gz, &zst] {
            assert_eq!(fields(p), want, "{}", p.display());
        }
        let recs = read_records(&jsonl, &Columns::new()).unwrap();
        assert_eq!(recs[1].at, At::Line(3));
        assert_eq!(
            read_records(&array, &Columns::new()).unwrap()[1].at,
            At::Item(2)
        );
    }

    #[test]
    fn columns_are_renamed_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.jsonl");
        std::fs::write(&p, r#"{"question": "q", "good": "g", "prompt": "old"}"#).unwrap();
        let cols: Columns = [("prompt", "question"), ("chosen", "good")]
            .into_iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect();
        let r = &read_records(&p, &cols).unwrap()[0];
        assert_eq!(r.fields["prompt"], "q");
        assert_eq!(r.fields["chosen"], "g");
        assert!(!r.fields.contains_key("question"));
        let e = check_columns(&cols, &["prompt"]).unwrap_err();
        assert!(e.contains("`chosen` is not a column"), "{e}");
    }

    #[test]
    fn bad_records_name_file_and_place() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.jsonl");
        std::fs::write(&p, "{\"a\": 1}\n[1]\n").unwrap();
        let e = read_records(&p, &Columns::new()).unwrap_err().to_string();
        assert!(
            e.ends_with("d.jsonl:2: not a JSON object (got an array)"),
            "{e}"
        );
        let p = dir.path().join("d.json");
        std::fs::write(&p, "[{\"a\": 1}, 3]").unwrap();
        let e = read_records(&p, &Columns::new()).unwrap_err().to_string();
        assert!(
            e.ends_with("d.json: item 2: not a JSON object (got a number)"),
            "{e}"
        );
        let p = dir.path().join("d.parquet");
        std::fs::write(&p, "not parquet").unwrap();
        let e = read_records(&p, &Columns::new()).unwrap_err().to_string();
        assert!(e.contains("d.parquet: not a readable Parquet file"), "{e}");
    }

    /// The fake cache scripts/make_dataset_fixtures.py wrote with `datasets`: conversational
    /// preferences, 4 in `train`, 2 in `test`.
    #[test]
    fn the_fixture_hf_cache_reads_by_split() {
        let cache = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/hf-cache");
        let train = hf_dataset_files("candor-test/prefs", &cache).unwrap();
        let test = hf_dataset_files("candor-test/prefs@main:test", &cache).unwrap();
        let rows = |files: &[PathBuf]| -> usize {
            files.iter().map(|f| read_file(f).unwrap().len()).sum()
        };
        assert_eq!((rows(&train), rows(&test)), (4, 2));
        let r = &read_file(&test[0]).unwrap()[1];
        assert_eq!(r.at, At::Row(2));
        assert_eq!(r.fields["chosen"][0]["role"], "assistant");
    }

    #[test]
    fn hf_specs_resolve_splits_and_say_what_is_missing() {
        let cache = tempfile::tempdir().unwrap();
        let e = hf_dataset_files("org/none", cache.path())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("datasets--org--none: hf:org/none is not in the Hugging Face cache")
                && e.contains("hf download --repo-type dataset org/none"),
            "{e}"
        );
        let repo = cache.path().join("datasets--org--data");
        let snap = repo.join("snapshots/abc1234");
        std::fs::create_dir_all(snap.join("data")).unwrap();
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs/main"), "abc1234\n").unwrap();
        for f in [
            "data/train-00000-of-00001.parquet",
            "data/test-00000-of-00001.parquet",
            "README.md",
        ] {
            std::fs::write(snap.join(f), "").unwrap();
        }
        let train = hf_dataset_files("org/data", cache.path()).unwrap();
        assert_eq!(train, vec![snap.join("data/train-00000-of-00001.parquet")]);
        let test = hf_dataset_files("org/data@abc1234:test", cache.path()).unwrap();
        assert_eq!(test, vec![snap.join("data/test-00000-of-00001.parquet")]);
        let e = hf_dataset_files("org/data:dev", cache.path())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("no files of split `dev`") && e.contains("data/test-00000-of-00001.parquet"),
            "{e}"
        );
        let e = hf_dataset_files("org/data@v2", cache.path())
            .unwrap_err()
            .to_string();
        assert!(e.contains("no revision `v2`"), "{e}");
        assert!(hf_dataset_files("nobody", cache.path()).is_err());
    }
}
