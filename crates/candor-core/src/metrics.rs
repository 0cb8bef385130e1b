//! `metrics.jsonl`: one JSON object per logged step, metric names as in DESIGN.md.
//!
//! Records are kept in memory and written with each checkpoint, so a checkpoint's log always
//! matches its step: a resumed run continues the log from exactly where its checkpoint was.

use std::io::Write;
use std::path::Path;

use serde_json::{Map, Value};

use crate::checkpoint::METRICS_FILE;
use crate::error::{io_err, Error, Result};

#[derive(Default, Clone, Debug)]
pub struct MetricsLog {
    pub records: Vec<Map<String, Value>>,
}

/// Build a metrics record: `record!(step; "loss" => 1.0, "lr" => lr)`.
#[macro_export]
macro_rules! record {
    ($step:expr; $($k:expr => $v:expr),* $(,)?) => {{
        let mut m = serde_json::Map::new();
        m.insert("step".to_string(), serde_json::json!($step));
        $( m.insert($k.to_string(), serde_json::json!($v)); )*
        m
    }};
}

impl MetricsLog {
    pub fn push(&mut self, record: Map<String, Value>) {
        self.records.push(record);
    }

    /// Read `<dir>/metrics.jsonl`, keeping only records up to `max_step` (a resumed run
    /// recomputes anything after its checkpoint).
    pub fn read(dir: &Path, max_step: Option<u64>) -> Result<Self> {
        Self::read_file(&dir.join(METRICS_FILE), max_step)
    }

    /// Read any JSONL log of records with a `step` (e.g. PPO's `samples.jsonl`).
    pub fn read_file(path: &Path, max_step: Option<u64>) -> Result<Self> {
        let path = path.to_path_buf();
        if !path.exists() {
            return Ok(Self::default());
        }
        let text = std::fs::read_to_string(&path).map_err(io_err(&path))?;
        let mut records = vec![];
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let v: Map<String, Value> = serde_json::from_str(line).map_err(|e| {
                Error::Msg(format!(
                    "{}:{}: not a JSON object: {e}",
                    path.display(),
                    i + 1
                ))
            })?;
            let step = v.get("step").and_then(Value::as_u64).unwrap_or(0);
            if max_step.is_none_or(|m| step <= m) {
                records.push(v);
            }
        }
        Ok(MetricsLog { records })
    }

    pub fn write(&self, dir: &Path) -> Result<()> {
        self.write_file(&dir.join(METRICS_FILE))
    }

    /// Write the log to `path` atomically (the old file or the whole new one, never a part).
    pub fn write_file(&self, path: &Path) -> Result<()> {
        let mut f = crate::output::AtomicFile::create(path)?;
        for r in &self.records {
            serde_json::to_writer(&mut f, r).map_err(|e| Error::Msg(e.to_string()))?;
            f.write_all(b"\n").map_err(io_err(path))?;
        }
        f.commit()
    }

    /// The last value logged under `key`.
    pub fn last(&self, key: &str) -> Option<f64> {
        self.records
            .iter()
            .rev()
            .find_map(|r| r.get(key).and_then(Value::as_f64))
    }

    /// The first value logged under `key`.
    pub fn first(&self, key: &str) -> Option<f64> {
        self.records
            .iter()
            .find_map(|r| r.get(key).and_then(Value::as_f64))
    }
}
