//! Stage configs: every section of every stage's config rejects a key it does not know
//! (`deny_unknown_fields`), naming the key and where it is, and an empty config is valid
//! (every key has a default in code).

mod common;

use common::*;

/// A stage command and its config's sections (`""`: the top level).
type Sections = (&'static str, &'static [&'static str]);

const STAGES: [Sections; 4] = [
    ("pretrain", &["", "data.", "model.", "train."]),
    ("sft", &["", "data.", "train."]),
    ("reward", &["", "data.", "train."]),
    (
        "ppo",
        &[
            "", "data.", "rollout.", "score.", "kl.", "ppo.", "critic.", "eval.", "train.",
        ],
    ),
];

#[test]
fn every_config_section_rejects_an_unknown_key() {
    let tmp = tempfile::tempdir().unwrap();
    let empty = tmp.path().join("empty.yaml");
    std::fs::write(&empty, "").unwrap();
    let show = |stage: &str, sets: &[String]| {
        let mut c = candor();
        c.args([stage, "--show-config", "--config"]).arg(&empty);
        for s in sets {
            c.args(["--set", s]);
        }
        c
    };
    for (stage, sections) in STAGES {
        let defaults = ok(&mut show(stage, &[]));
        assert!(defaults.contains("train:"), "{stage}: {defaults}");
        for section in sections {
            let e = fails(&mut show(stage, &[format!("{section}bogus_key=1")]));
            assert!(
                e.contains("unknown field `bogus_key`"),
                "{stage} {section}: {e}"
            );
            let within = section.trim_end_matches('.');
            assert!(
                within.is_empty() || e.contains(&format!("empty.yaml: {within}")),
                "{stage} {section}: the error names the section: {e}"
            );
        }
    }
}
