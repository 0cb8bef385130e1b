//! The checkpoint directory: the contract between stages.
//!
//! ```text
//! <dir>/config.json  model.safetensors  tokenizer.json  tokenizer_config.json
//!       candor.json  metrics.jsonl  trainer/{optimizer.safetensors, trainer_state.json}
//! ```
//!
//! Writes go through [`CheckpointWriter`]: everything is written into a temporary sibling,
//! fsynced, and renamed into place, so a killed run never leaves a directory that loads but
//! is half written.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{io_err, Error, Result};
use crate::output::sibling;

pub const META_FILE: &str = "candor.json";
pub const METRICS_FILE: &str = "metrics.jsonl";
pub const TRAINER_DIR: &str = "trainer";

/// Which output head a checkpoint's model carries.
#[derive(Serialize, Deserialize, Clone, Copy, PartialEq, Eq, Debug)]
#[serde(rename_all = "lowercase")]
pub enum Head {
    /// Logits over the vocabulary (`LlamaForCausalLM`).
    Lm,
    /// One scalar per position (`LlamaForSequenceClassification`, `num_labels: 1`).
    Score,
}

impl std::fmt::Display for Head {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Head::Lm => "lm",
            Head::Score => "score",
        })
    }
}

/// A checkpoint this one was made from, and the hash of its contents at the time.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct ParentRef {
    /// The role the parent played: `init`, `policy`, `reward`, ...
    pub role: String,
    pub path: String,
    pub content_hash: String,
}

/// `candor.json`: what made a checkpoint.
#[derive(Serialize, Deserialize, Clone, Debug)]
#[serde(deny_unknown_fields)]
pub struct CandorMeta {
    pub candor_version: String,
    /// The stage kind that wrote it: pretrain, sft, reward, ppo, import.
    pub stage: String,
    pub head: Head,
    #[serde(default)]
    pub parents: Vec<ParentRef>,
    /// The effective stage config, defaults included.
    pub config: serde_json::Value,
    pub step: u64,
    pub total_steps: u64,
    /// True once the stage finished; intermediate checkpoints are resumable but not complete.
    pub complete: bool,
    /// Final (or latest) metrics, in the names of DESIGN.md.
    #[serde(default)]
    pub metrics: serde_json::Map<String, serde_json::Value>,
    /// Hash of the model-defining files (see [`content_hash`]).
    pub content_hash: String,
    /// Wall time spent in the stage so far, seconds.
    #[serde(default)]
    pub elapsed_sec: f64,
    /// Tokens processed so far.
    #[serde(default)]
    pub tokens: u64,
}

impl CandorMeta {
    pub fn new(stage: &str, head: Head, config: serde_json::Value) -> Self {
        CandorMeta {
            candor_version: crate::VERSION.to_string(),
            stage: stage.to_string(),
            head,
            parents: vec![],
            config,
            step: 0,
            total_steps: 0,
            complete: false,
            metrics: Default::default(),
            content_hash: String::new(),
            elapsed_sec: 0.0,
            tokens: 0,
        }
    }

    /// Read `<dir>/candor.json`; `Ok(None)` when the directory has none (e.g. a Hugging Face dir).
    pub fn read(dir: &Path) -> Result<Option<Self>> {
        let path = dir.join(META_FILE);
        if !path.exists() {
            return Ok(None);
        }
        let text = fs::read_to_string(&path).map_err(io_err(&path))?;
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| Error::Checkpoint {
                path,
                msg: format!("not a valid candor.json: {e}"),
            })
    }

    /// Hash the model files in `dir` into `content_hash`, then write `candor.json` there.
    pub fn write(&mut self, dir: &Path) -> Result<()> {
        self.content_hash = content_hash(dir)?;
        let path = dir.join(META_FILE);
        let text = serde_json::to_string_pretty(self).expect("meta serialises");
        fs::write(&path, text + "\n").map_err(io_err(&path))
    }
}

/// Reference to `dir` as a parent: its recorded hash when it has a candor.json whose hash
/// still matches, else a freshly computed one.
pub fn parent_ref(role: &str, dir: &Path) -> Result<ParentRef> {
    let hash = content_hash(dir)?;
    let path = fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    Ok(ParentRef {
        role: role.to_string(),
        path: path.display().to_string(),
        content_hash: hash,
    })
}

/// The files whose bytes define a model: `*.json` and `*.safetensors` at the top level
/// except the bookkeeping ones (`candor.json`), and the same in every directory inside
/// (PPO's `critic/`, an adapter's directory, recursively) except `trainer/`; as (name
/// relative to `dir`, path), sorted by name. Training logs and resume state are not part of
/// what a model *is*, so they do not change its hash; a checkpoint without directories
/// hashes exactly as it did when only the top level counted.
fn model_files(dir: &Path) -> Result<Vec<(String, PathBuf)>> {
    let mut files = vec![];
    collect_model_files(dir, "", &mut files)?;
    files.sort();
    Ok(files)
}

fn collect_model_files(dir: &Path, prefix: &str, files: &mut Vec<(String, PathBuf)>) -> Result<()> {
    for entry in fs::read_dir(dir).map_err(io_err(dir))? {
        let entry = entry.map_err(io_err(dir))?;
        let name = entry.file_name().to_string_lossy().to_string();
        let path = entry.path();
        // follows symlinks: a Hugging Face cache snapshot links its files to blobs/
        if path.is_file() {
            if name != META_FILE && (name.ends_with(".json") || name.ends_with(".safetensors")) {
                files.push((format!("{prefix}{name}"), path));
            }
        } else if path.is_dir()
            && !(prefix.is_empty() && name == TRAINER_DIR)
            && !name.starts_with('.')
        {
            collect_model_files(&path, &format!("{prefix}{name}/"), files)?;
        }
    }
    Ok(())
}

/// sha256 over (name, length, bytes) of each model-defining file; `sha256:<hex>`.
pub fn content_hash(dir: &Path) -> Result<String> {
    let files = model_files(dir)?;
    if files.is_empty() {
        return Err(Error::Checkpoint {
            path: dir.to_path_buf(),
            msg: "no model files (config.json, *.safetensors) to hash".into(),
        });
    }
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    for (name, path) in files {
        let mut file = fs::File::open(&path).map_err(io_err(&path))?;
        let len = file.metadata().map_err(io_err(&path))?.len();
        hasher.update(name.as_bytes());
        hasher.update([0u8]);
        hasher.update(len.to_le_bytes());
        loop {
            let n = file.read(&mut buf).map_err(io_err(&path))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
        }
    }
    let digest = hasher.finalize();
    Ok(format!(
        "sha256:{}",
        digest
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    ))
}

/// Writes a checkpoint directory atomically: files go into a temporary sibling
/// (`.<name>.tmp-<pid>`), which [`commit`](Self::commit) fsyncs and renames into place.
/// Dropped without commit, the temporary directory is removed.
pub struct CheckpointWriter {
    final_dir: PathBuf,
    tmp_dir: PathBuf,
    committed: bool,
}

/// An I/O error while writing the checkpoint at `dir`: named by the user's path, not the
/// temporary sibling it happened in.
fn ckpt_err(dir: &Path) -> impl Fn(std::io::Error) -> Error + '_ {
    move |e| Error::Checkpoint {
        path: dir.to_path_buf(),
        msg: format!("cannot write the checkpoint: {e}"),
    }
}

impl CheckpointWriter {
    pub fn begin(final_dir: &Path) -> Result<Self> {
        recover_interrupted(final_dir)?;
        let tmp_dir = sibling(final_dir, "tmp")?;
        if tmp_dir.exists() {
            fs::remove_dir_all(&tmp_dir).map_err(ckpt_err(final_dir))?;
        }
        fs::create_dir_all(&tmp_dir).map_err(ckpt_err(final_dir))?;
        Ok(CheckpointWriter {
            final_dir: final_dir.to_path_buf(),
            tmp_dir,
            committed: false,
        })
    }

    /// Where to write the checkpoint's files.
    pub fn path(&self) -> &Path {
        &self.tmp_dir
    }

    /// fsync every file, then swap the temporary directory into place.
    pub fn commit(mut self) -> Result<()> {
        let fail = ckpt_err(&self.final_dir);
        fsync_tree(&self.tmp_dir).map_err(|e| match e {
            Error::Io { source, .. } => fail(source),
            e => e,
        })?;
        if self.final_dir.exists() {
            let old = sibling(&self.final_dir, "old")?;
            if old.exists() {
                fs::remove_dir_all(&old).map_err(&fail)?;
            }
            fs::rename(&self.final_dir, &old).map_err(&fail)?;
            fs::rename(&self.tmp_dir, &self.final_dir).map_err(&fail)?;
            fs::remove_dir_all(&old).map_err(&fail)?;
        } else {
            fs::rename(&self.tmp_dir, &self.final_dir).map_err(&fail)?;
        }
        crate::output::sync_parent(&self.final_dir);
        self.committed = true;
        Ok(())
    }
}

impl Drop for CheckpointWriter {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_dir_all(&self.tmp_dir);
        }
    }
}

fn fsync_tree(dir: &Path) -> Result<()> {
    for entry in fs::read_dir(dir).map_err(io_err(dir))? {
        let entry = entry.map_err(io_err(dir))?;
        let path = entry.path();
        if entry.file_type().map_err(io_err(&path))?.is_dir() {
            fsync_tree(&path)?;
        } else {
            fs::File::open(&path)
                .and_then(|f| f.sync_all())
                .map_err(io_err(&path))?;
        }
    }
    fs::File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(io_err(dir))
}

/// A kill between the two renames of a commit leaves the previous checkpoint at
/// `.<name>.old-<pid>` and nothing at `<name>`: put it back. Stale temporaries of dead
/// writers are removed.
pub fn recover_interrupted(final_dir: &Path) -> Result<()> {
    let Some(name) = final_dir
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
    else {
        return Ok(());
    };
    let parent = match final_dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let Ok(entries) = fs::read_dir(&parent) else {
        return Ok(());
    };
    let me = std::process::id();
    for entry in entries.flatten() {
        let fname = entry.file_name().to_string_lossy().to_string();
        let Some(rest) = fname.strip_prefix(&format!(".{name}.")) else {
            continue;
        };
        let (tag, pid) = rest.split_once('-').unwrap_or((rest, ""));
        if pid.parse::<u32>().ok() == Some(me) || !pid_is_dead(pid) {
            continue;
        }
        let path = entry.path();
        if tag == "old" && !final_dir.exists() {
            fs::rename(&path, final_dir).map_err(io_err(final_dir))?;
        } else if tag == "old" || tag == "tmp" {
            let _ = fs::remove_dir_all(&path);
        }
    }
    Ok(())
}

fn pid_is_dead(pid: &str) -> bool {
    match pid.parse::<u32>() {
        Ok(p) => !Path::new(&format!("/proc/{p}")).exists() || !Path::new("/proc/self").exists(),
        Err(_) => false,
    }
}

/// Refuse to start a stage from an incomplete checkpoint (`complete: false` in its
/// candor.json: a run interrupted, or still going) unless `allow`; `key` names where the
/// user gave it (`init`, `--policy`). A directory without candor.json (a Hugging Face
/// model) is taken as complete.
pub fn require_complete(dir: &Path, key: &str, allow: bool) -> Result<()> {
    if allow {
        return Ok(());
    }
    match CandorMeta::read(dir)? {
        Some(meta) if !meta.complete => Err(Error::Checkpoint {
            path: dir.to_path_buf(),
            msg: format!(
                "({key}) is an incomplete checkpoint (step {} of {}: its run was interrupted or is still going); finish it with --resume, or pass --allow-incomplete to start from it anyway",
                meta.step, meta.total_steps
            ),
        }),
        _ => Ok(()),
    }
}

/// Fail with a message naming `dir` unless it holds a loadable model (config.json and weights,
/// or a PEFT adapter directory).
pub fn require_model_dir(dir: &Path) -> Result<()> {
    if !dir.is_dir() {
        return Err(Error::Checkpoint {
            path: dir.to_path_buf(),
            msg: "no such checkpoint directory".into(),
        });
    }
    // a PEFT adapter directory (adapter_config.json) stands for its base with the adapter
    if !dir.join("config.json").is_file() && !dir.join("adapter_config.json").is_file() {
        return Err(Error::Checkpoint {
            path: dir.to_path_buf(),
            msg: "not a checkpoint: config.json is missing".into(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writer_is_atomic_and_replaces() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("ckpt");
        let w = CheckpointWriter::begin(&dir).unwrap();
        fs::write(w.path().join("config.json"), "{}").unwrap();
        assert!(!dir.exists(), "nothing visible before commit");
        w.commit().unwrap();
        assert!(dir.join("config.json").exists());

        let w = CheckpointWriter::begin(&dir).unwrap();
        fs::write(w.path().join("config.json"), "{\"a\":1}").unwrap();
        drop(w); // abandoned: old checkpoint untouched, temp removed
        assert_eq!(fs::read_to_string(dir.join("config.json")).unwrap(), "{}");
        let leftovers: Vec<_> = fs::read_dir(tmp.path()).unwrap().collect();
        assert_eq!(leftovers.len(), 1);

        let w = CheckpointWriter::begin(&dir).unwrap();
        fs::write(w.path().join("config.json"), "{\"a\":1}").unwrap();
        w.commit().unwrap();
        assert_eq!(
            fs::read_to_string(dir.join("config.json")).unwrap(),
            "{\"a\":1}"
        );
        assert_eq!(fs::read_dir(tmp.path()).unwrap().count(), 1);
    }

    #[test]
    fn interrupted_swap_is_recovered() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("ckpt");
        // a dead writer (pid 0 never names a live process directory we own) left only .old
        let old = tmp.path().join(".ckpt.old-999999999");
        fs::create_dir_all(&old).unwrap();
        fs::write(old.join("config.json"), "{}").unwrap();
        recover_interrupted(&dir).unwrap();
        assert!(dir.join("config.json").exists());
        assert!(!old.exists());
    }

    #[test]
    fn content_hash_covers_model_files_only() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        fs::write(d.join("config.json"), "{}").unwrap();
        fs::write(d.join("model.safetensors"), "abc").unwrap();
        let h1 = content_hash(d).unwrap();
        fs::write(d.join("metrics.jsonl"), "{}\n").unwrap();
        fs::write(d.join("candor.json"), "{}").unwrap();
        assert_eq!(h1, content_hash(d).unwrap());
        fs::write(d.join("model.safetensors"), "abd").unwrap();
        assert_ne!(h1, content_hash(d).unwrap());
        assert!(h1.starts_with("sha256:") && h1.len() == 7 + 64);
    }

    #[test]
    fn content_hash_covers_model_dirs_inside_but_not_trainer_state() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        fs::write(d.join("config.json"), "{}").unwrap();
        fs::write(d.join("model.safetensors"), "abc").unwrap();
        let top_only = content_hash(d).unwrap();
        // resume state and hidden temporaries are not the model
        fs::create_dir_all(d.join("trainer")).unwrap();
        fs::write(d.join("trainer/optimizer.safetensors"), "m").unwrap();
        fs::create_dir_all(d.join(".x.tmp-1")).unwrap();
        fs::write(d.join(".x.tmp-1/model.safetensors"), "m").unwrap();
        assert_eq!(content_hash(d).unwrap(), top_only);
        // a critic is
        fs::create_dir_all(d.join("critic")).unwrap();
        fs::write(d.join("critic/config.json"), "{}").unwrap();
        fs::write(d.join("critic/model.safetensors"), "xyz").unwrap();
        let with_critic = content_hash(d).unwrap();
        assert_ne!(with_critic, top_only);
        fs::write(d.join("critic/model.safetensors"), "xyw").unwrap();
        let edited = content_hash(d).unwrap();
        assert_ne!(edited, with_critic);
        // the same bytes under another directory name are another model
        fs::rename(d.join("critic"), d.join("adapter")).unwrap();
        assert_ne!(content_hash(d).unwrap(), edited);
    }

    #[test]
    fn meta_round_trips() {
        let tmp = tempfile::tempdir().unwrap();
        fs::write(tmp.path().join("config.json"), "{}").unwrap();
        let mut m = CandorMeta::new("pretrain", Head::Lm, serde_json::json!({"a": 1}));
        m.step = 5;
        m.write(tmp.path()).unwrap();
        let r = CandorMeta::read(tmp.path()).unwrap().unwrap();
        assert_eq!(r.step, 5);
        assert_eq!(r.head, Head::Lm);
        assert_eq!(r.content_hash, content_hash(tmp.path()).unwrap());
    }
}
