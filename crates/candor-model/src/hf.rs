//! Where a model comes from: a checkpoint directory, or `hf:ORG/NAME[@REVISION]` — a
//! repository already in the local Hugging Face cache (`$HF_HUB_CACHE`, else
//! `$HF_HOME/hub`, else `~/.cache/huggingface/hub`; layout
//! `models--ORG--NAME/{refs/main, snapshots/<commit>/…}`), resolved with `hf-hub`'s cache
//! API. candor never downloads: it behaves the same with `HF_HUB_OFFLINE=1`, and when a
//! file is missing the error says what to place where.

use std::path::{Path, PathBuf};

use hf_hub::{Cache, Repo, RepoType};

use crate::error::{file_err, Error, Result};

/// The prefix that names a Hugging Face repository instead of a directory.
pub const HF_PREFIX: &str = "hf:";

/// Resolve a `--model` / `--init` / `--policy` / `--reward` value to a checkpoint
/// directory (or a PEFT adapter directory, whose base must resolve): an existing directory as is, or `hf:ORG/NAME[@REVISION]` to its snapshot in
/// the Hugging Face cache. Checks that the directory holds `config.json` and its weights
/// (`model.safetensors`, or the index and every shard it names).
pub fn resolve_model_dir(spec: impl AsRef<Path>) -> Result<PathBuf> {
    let spec = spec.as_ref();
    match spec.to_str().and_then(|s| s.strip_prefix(HF_PREFIX)) {
        Some(repo) => resolve_in_cache(repo, &hub_cache_dir()?),
        None => {
            if !spec.is_dir() {
                return Err(file_err(
                    spec,
                    "no such checkpoint directory (give a directory with config.json and model.safetensors, or hf:ORG/NAME for a model in the Hugging Face cache)",
                ));
            }
            check_files(spec, &|f| format!("{} into {}", f, spec.display()))?;
            Ok(spec.to_path_buf())
        }
    }
}

/// The hub cache directory, as `huggingface_hub` finds it.
pub fn hub_cache_dir() -> Result<PathBuf> {
    if let Some(dir) =
        std::env::var_os("HF_HUB_CACHE").or_else(|| std::env::var_os("HUGGINGFACE_HUB_CACHE"))
    {
        return Ok(PathBuf::from(dir));
    }
    if std::env::var_os("HF_HOME").is_some() || std::env::var_os("HOME").is_some() {
        return Ok(Cache::from_env().path().clone());
    }
    Err(Error::Msg(
        "cannot find the Hugging Face cache: set HF_HUB_CACHE or HF_HOME".into(),
    ))
}

/// Resolve `ORG/NAME[@REVISION]` in the cache at `cache_dir`.
pub fn resolve_in_cache(repo_spec: &str, cache_dir: &Path) -> Result<PathBuf> {
    let (repo_id, revision) = match repo_spec.split_once('@') {
        Some((id, rev)) => (id, rev),
        None => (repo_spec, "main"),
    };
    let valid = |s: &str| {
        !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    };
    match repo_id.split_once('/') {
        Some((org, name)) if valid(org) && valid(name) && !revision.is_empty() => {}
        _ => {
            return Err(Error::Msg(format!(
                "{HF_PREFIX}{repo_spec}: expected {HF_PREFIX}ORG/NAME or {HF_PREFIX}ORG/NAME@REVISION (e.g. hf:HuggingFaceTB/SmolLM2-135M-Instruct)"
            )))
        }
    }
    let repo = Repo::with_revision(repo_id.to_string(), RepoType::Model, revision.to_string());
    let repo_dir = cache_dir.join(repo.folder_name());
    let how = format!(
        "candor never downloads; fetch it where there is network (`hf download {repo_id}` or `huggingface-cli download {repo_id}`) and copy {} here",
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
        let text = std::fs::read_to_string(&ref_file)
            .map_err(|e| file_err(&ref_file, format!("cannot read: {e}")))?;
        text.trim().to_string()
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
    check_files(&snapshot, &|f| {
        format!(
            "{f} into {} (the cache's files of {repo_id})",
            snapshot.display()
        )
    })?;
    Ok(snapshot)
}

/// A checkpoint directory must hold config.json and its weights; `place` says where a
/// missing file goes.
fn check_files(dir: &Path, place: &dyn Fn(&str) -> String) -> Result<()> {
    let missing = |f: &str| file_err(&dir.join(f), format!("missing: place {}", place(f)));
    if crate::lora::is_adapter_dir(dir) {
        // a PEFT adapter directory: its weights, and a base that resolves
        if !dir.join(crate::lora::ADAPTER_WEIGHTS).is_file() {
            crate::lora::read_adapter_tensors(dir, &candle_core::Device::Cpu)?;
        }
        crate::lora::base_dir(dir)?;
        return Ok(());
    }
    if !dir.join("config.json").is_file() {
        return Err(missing("config.json"));
    }
    let index = dir.join("model.safetensors.index.json");
    if dir.join("model.safetensors").is_file() {
        return Ok(());
    }
    if !index.is_file() {
        return Err(missing("model.safetensors"));
    }
    let text = std::fs::read_to_string(&index)
        .map_err(|e| file_err(&index, format!("cannot read: {e}")))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| file_err(&index, format!("not valid JSON: {e}")))?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| file_err(&index, "`weight_map` is missing or not an object"))?;
    let mut shards: Vec<&str> = map.values().filter_map(|s| s.as_str()).collect();
    shards.sort();
    shards.dedup();
    match shards.iter().find(|s| !dir.join(s).is_file()) {
        Some(s) => Err(file_err(
            &index,
            format!("names shard `{s}`, which is missing: place {}", place(s)),
        )),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(path: &Path, text: &str) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }

    #[test]
    fn resolves_refs_and_commits_and_says_what_is_missing() {
        let cache = tempfile::tempdir().unwrap();
        let repo = cache.path().join("models--Org--Tiny");
        let snap = repo.join("snapshots/abc1234");
        write(&repo.join("refs/main"), "abc1234\n");
        write(&snap.join("config.json"), "{}");
        let e = resolve_in_cache("Org/Tiny", cache.path())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(
                "snapshots/abc1234/model.safetensors: missing: place model.safetensors into"
            ),
            "{e}"
        );
        write(
            &snap.join("model.safetensors.index.json"),
            r#"{"weight_map": {"a": "m-1.safetensors", "b": "m-2.safetensors"}}"#,
        );
        write(&snap.join("m-1.safetensors"), "");
        let e = resolve_in_cache("Org/Tiny", cache.path())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(
                "model.safetensors.index.json: names shard `m-2.safetensors`, which is missing"
            ),
            "{e}"
        );
        write(&snap.join("m-2.safetensors"), "");
        assert_eq!(resolve_in_cache("Org/Tiny", cache.path()).unwrap(), snap);
        assert_eq!(
            resolve_in_cache("Org/Tiny@abc1234", cache.path()).unwrap(),
            snap
        );
        let e = resolve_in_cache("Org/Tiny@dev", cache.path())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("refs/dev: missing: the cache has no revision `dev`"),
            "{e}"
        );
        let e = resolve_in_cache("Org/Other", cache.path())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("models--Org--Other: hf:Org/Other is not in the Hugging Face cache")
                && e.contains("never downloads"),
            "{e}"
        );
        assert!(resolve_in_cache("no-slash", cache.path())
            .unwrap_err()
            .to_string()
            .contains("expected hf:ORG/NAME"));
    }
}
