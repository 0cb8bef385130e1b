//! Datasets in the formats users have, through the real binary: the same preferences in
//! candor's form, TRL's standard, conversational and implicit-prompt forms and TRL's
//! unpaired form, as JSONL and as Parquet (tests/fixtures/formats/, written by
//! scripts/make_dataset_fixtures.py with `datasets`), and from a fake offline Hugging Face
//! cache, train the same reward model and give the same `eval` numbers.

mod common;

use std::path::{Path, PathBuf};

use common::*;

fn fixture(name: &str) -> PathBuf {
    repo_root().join("tests/fixtures/formats").join(name)
}

/// A 3-step reward model on `data` from the small checkpoint; returns its metrics (less the
/// clock) and its directory.
fn reward_run(base: &Path, data: &str, out: &Path, extra: &[&str]) -> Vec<serde_json::Value> {
    let mut cmd = candor();
    cmd.args([
        "reward",
        "--config",
        "configs/tiny/reward.yaml",
        "--device",
        "cpu",
        "--init",
    ])
    .arg(base)
    .arg("--out")
    .arg(out);
    let files = format!("data.files=[{data}]");
    for s in [
        files.as_str(),
        "data.heldout=null",
        "train.steps=3",
        "train.batch_size=3",
        "train.log_every=1",
        "train.eval_every=0",
        "train.warmup_steps=0",
    ]
    .iter()
    .chain(extra)
    {
        cmd.args(["--set", s]);
    }
    ok(&mut cmd);
    metrics(out)
        .into_iter()
        .map(|mut m| {
            m.as_object_mut()
                .unwrap()
                .retain(|k, _| !k.starts_with("time") && !k.contains("per_s") && k != "elapsed");
            m
        })
        .collect()
}

fn eval(model: &Path, data: &str) -> serde_json::Value {
    let out = ok(candor()
        .args(["eval", "--json", "--device", "cpu", "--model"])
        .arg(model)
        .args(["--data", data]));
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{data}: {e}: {out}"))
}

#[test]
fn every_preference_form_trains_and_evaluates_the_same() {
    let tmp = tempfile::tempdir().unwrap();
    let base = small_checkpoint(tmp.path());
    let candor_jsonl = fixture("pref_candor.jsonl").display().to_string();
    let rm = tmp.path().join("rm-candor");
    let want = reward_run(&base, &candor_jsonl, &rm, &[]);
    assert!(want.iter().any(|m| m.get("loss").is_some()), "{want:?}");
    // the same training pairs: the same losses, step by step
    for form in [
        "pref_trl_standard.parquet",
        "pref_trl_conversational.jsonl",
        "pref_trl_conversational.parquet",
    ] {
        let got = reward_run(
            &base,
            &fixture(form).display().to_string(),
            &tmp.path().join(form),
            &[],
        );
        assert_eq!(got, want, "{form}");
    }
    // the same eval numbers, from every form and file type
    let want_eval = eval(&rm, &candor_jsonl);
    assert_eq!(want_eval["pairs"], 6, "{want_eval}");
    for form in [
        "pref_candor.parquet",
        "pref_trl_standard.jsonl",
        "pref_trl_standard.parquet",
        "pref_trl_standard_array.json",
        "pref_trl_conversational.jsonl",
        "pref_trl_conversational.parquet",
        "pref_trl_implicit.jsonl",
        "pref_trl_implicit.parquet",
        "pref_trl_unpaired.jsonl",
        "pref_trl_unpaired.parquet",
    ] {
        assert_eq!(
            eval(&rm, &fixture(form).display().to_string()),
            want_eval,
            "{form}"
        );
    }
    // other column names, mapped
    let renamed = fixture("pref_renamed.parquet").display().to_string();
    let got = reward_run(
        &base,
        &renamed,
        &tmp.path().join("rm-renamed"),
        &["data.columns={prompt: question, chosen: good, rejected: bad}"],
    );
    assert_eq!(got, want, "pref_renamed.parquet with data.columns");
    // a dataset in the Hugging Face cache: its train split is the first 4 preferences
    let cache = repo_root().join("tests/fixtures/hf-cache");
    let hf = ok(candor()
        .env("HF_HUB_CACHE", &cache)
        .args(["eval", "--json", "--device", "cpu", "--model"])
        .arg(&rm)
        .args(["--data", "hf:candor-test/prefs"]));
    let hf: serde_json::Value = serde_json::from_str(hf.trim()).unwrap();
    assert_eq!(hf["pairs"], 4, "{hf}");
    let e = fails(
        candor()
            .env("HF_HUB_CACHE", &cache)
            .args(["eval", "--device", "cpu", "--model"])
            .arg(&rm)
            .args(["--data", "hf:candor-test/missing"]),
    );
    assert!(
        e.contains("datasets--candor-test--missing") && e.contains("not in the Hugging Face cache"),
        "{e}"
    );
}

#[test]
fn a_line_of_unknown_shape_names_the_line_and_the_shapes() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("odd.jsonl");
    std::fs::write(
        &data,
        "{\"prompt\": \"p\", \"chosen\": \"a\", \"rejected\": \"b\"}\n{\"question\": \"q\"}\n",
    )
    .unwrap();
    let base = small_checkpoint(tmp.path());
    let e = fails(
        candor()
            .args([
                "reward",
                "--config",
                "configs/tiny/reward.yaml",
                "--device",
                "cpu",
                "--init",
            ])
            .arg(&base)
            .args(["--set", &format!("data.files=[{}]", data.display())])
            .args(["--set", "data.heldout=null", "--out"])
            .arg(tmp.path().join("rm")),
    );
    assert!(
        e.contains(&format!("{}:2: not a preference", data.display()))
            && e.contains("`prompt` + `completion` + `label`"),
        "{e}"
    );
}
