//! Stage configs: a YAML file (or an inline YAML value from a recipe), `--set a.b=value`
//! overrides, then a typed struct with defaults in code and unknown keys rejected by path.
//!
//! Two phases, as in ripgrep/uv: the file as parsed ([`serde_yaml::Value`]), then the typed,
//! validated config. The effective config ([`effective`]) is what a stage writes into its
//! checkpoint, so a recipe can tell whether a stage must rerun.

use std::path::Path;

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_yaml::Value;

use crate::error::{Error, Result};

/// Read and parse a YAML file; an empty file is an empty mapping.
pub fn read_yaml(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::Config {
        path: path.display().to_string(),
        msg: format!("cannot read config file: {e}"),
    })?;
    parse_yaml(&text, &path.display().to_string())
}

/// Parse YAML text; `origin` names it in errors (a file path, or `recipe.yaml: stage sft`).
pub fn parse_yaml(text: &str, origin: &str) -> Result<Value> {
    let value: Value = serde_yaml::from_str(text).map_err(|e| {
        let at = e
            .location()
            .map(|l| format!(":{}:{}", l.line(), l.column()))
            .unwrap_or_default();
        Error::Config {
            path: format!("{origin}{at}"),
            msg: format!("malformed YAML: {}", strip_location(&e.to_string())),
        }
    })?;
    Ok(match value {
        Value::Null => Value::Mapping(Default::default()),
        v => v,
    })
}

fn strip_location(msg: &str) -> String {
    match msg.find(" at line ") {
        Some(i) => msg[..i].to_string(),
        None => msg.to_string(),
    }
}

/// Apply `key.path=value` overrides. The value is parsed as YAML, so `1e-3`, `true`,
/// `[a, b]` get their natural types; anything that does not parse stays a string.
pub fn apply_overrides(value: &mut Value, overrides: &[String], origin: &str) -> Result<()> {
    for ov in overrides {
        let (key, raw) = ov.split_once('=').ok_or_else(|| Error::Config {
            path: origin.to_string(),
            msg: format!("--set `{ov}`: expected key.path=value"),
        })?;
        let key = key.trim();
        if key.is_empty() || key.split('.').any(str::is_empty) {
            return Err(Error::Config {
                path: origin.to_string(),
                msg: format!("--set `{ov}`: empty key segment"),
            });
        }
        let new: Value =
            serde_yaml::from_str(raw).unwrap_or_else(|_| Value::String(raw.to_string()));
        set_path(value, key, new).map_err(|msg| Error::Config {
            path: origin.to_string(),
            msg: format!("--set `{ov}`: {msg}"),
        })?;
    }
    Ok(())
}

/// Set `a.b.c` in a YAML value to `new`, creating mappings on the way; the error says why not.
pub fn set_path(root: &mut Value, key: &str, new: Value) -> std::result::Result<(), String> {
    let mut cur = root;
    let parts: Vec<&str> = key.split('.').collect();
    for (i, part) in parts.iter().enumerate() {
        let last = i + 1 == parts.len();
        if matches!(cur, Value::Null) {
            *cur = Value::Mapping(Default::default());
        }
        cur = match cur {
            Value::Mapping(map) => {
                let k = Value::String(part.to_string());
                if last {
                    map.insert(k, new);
                    return Ok(());
                }
                map.entry(k).or_insert(Value::Null)
            }
            Value::Sequence(seq) => {
                let idx: usize = part
                    .parse()
                    .map_err(|_| format!("`{part}` indexes a list and must be a number"))?;
                let len = seq.len();
                let slot = seq
                    .get_mut(idx)
                    .ok_or_else(|| format!("index {idx} is past the list's end ({len} items)"))?;
                if last {
                    *slot = new;
                    return Ok(());
                }
                slot
            }
            _ => return Err(format!("`{}` is not a mapping", parts[..i].join("."))),
        };
    }
    Ok(())
}

/// Deserialise a typed config from a YAML value. Errors name the origin and the key path:
/// `configs/tiny/pretrain.yaml: train.lrr: unknown field `lrr`, expected one of ...`.
pub fn from_value<T: DeserializeOwned>(value: Value, origin: &str) -> Result<T> {
    serde_path_to_error::deserialize::<_, T>(value).map_err(|e| {
        let path = e.path().to_string();
        let msg = strip_location(&e.inner().to_string());
        let path = if path == "." {
            origin.to_string()
        } else {
            format!("{origin}: {path}")
        };
        Error::Config { path, msg }
    })
}

/// Load a typed config: file → overrides → struct.
pub fn load<T: DeserializeOwned>(path: &Path, overrides: &[String]) -> Result<T> {
    let origin = path.display().to_string();
    let mut value = read_yaml(path)?;
    apply_overrides(&mut value, overrides, &origin)?;
    from_value(value, &origin)
}

/// The effective config as JSON: every field, defaults included.
pub fn effective<T: Serialize>(config: &T) -> serde_json::Value {
    serde_json::to_value(config).expect("config structs serialise to JSON")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize, Serialize, PartialEq)]
    #[serde(default, deny_unknown_fields)]
    struct Train {
        lr: f64,
        steps: usize,
    }
    impl Default for Train {
        fn default() -> Self {
            Train {
                lr: 1e-3,
                steps: 10,
            }
        }
    }
    #[derive(Debug, Deserialize, Serialize, PartialEq, Default)]
    #[serde(default, deny_unknown_fields)]
    struct Stage {
        train: Train,
        name: String,
    }

    fn load_str(text: &str, sets: &[&str]) -> Result<Stage> {
        let mut v = parse_yaml(text, "cfg.yaml")?;
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        apply_overrides(&mut v, &sets, "cfg.yaml")?;
        from_value(v, "cfg.yaml")
    }

    #[test]
    fn defaults_fill_missing_keys() {
        let s = load_str("name: x\n", &[]).unwrap();
        assert_eq!(s.train, Train::default());
        assert_eq!(load_str("", &[]).unwrap(), Stage::default());
    }

    #[test]
    fn overrides_set_nested_keys_with_yaml_types() {
        let s = load_str(
            "train: {lr: 0.1}\n",
            &["train.steps=7", "train.lr=2e-3", "name=abc"],
        )
        .unwrap();
        assert_eq!(s.train.steps, 7);
        assert_eq!(s.train.lr, 2e-3);
        assert_eq!(s.name, "abc");
    }

    #[test]
    fn unknown_key_is_named_with_its_path() {
        let e = load_str("train: {lrr: 0.1}\n", &[])
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("cfg.yaml: train"), "{e}");
        assert!(e.contains("unknown field `lrr`"), "{e}");
        let e = load_str("", &["train.nope=1"]).unwrap_err().to_string();
        assert!(e.contains("unknown field `nope`"), "{e}");
    }

    #[test]
    fn wrong_type_is_named_with_its_path() {
        let e = load_str("train: {steps: many}\n", &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("train.steps"), "{e}");
    }

    #[test]
    fn malformed_yaml_names_line() {
        let e = load_str("train: {lr: 0.1\nname: [\n", &[])
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("cfg.yaml:"), "{e}");
        assert!(e.contains("malformed YAML"), "{e}");
    }

    #[test]
    fn bad_override_syntax_is_rejected() {
        let e = load_str("", &["train.lr"]).unwrap_err().to_string();
        assert!(e.contains("expected key.path=value"), "{e}");
        let e = load_str("name: x\n", &["name.sub=1"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a mapping"), "{e}");
    }

    #[test]
    fn missing_file_is_named() {
        let e = load::<Stage>(Path::new("/nonexistent/cfg.yaml"), &[])
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("/nonexistent/cfg.yaml: cannot read"), "{e}");
    }
}
