//! `candor run`: the tiny recipe end to end through the real binary, skipping what is up to
//! date, rerunning what a config change touches, resuming an interrupted run, and refusing
//! bad recipes before anything trains.

mod common;

use std::path::{Path, PathBuf};

use candor_core::checkpoint::content_hash;
use common::*;

/// A stage name, its checkpoint's head, and its parents (role, stage).
type ModelStage = (
    &'static str,
    &'static str,
    &'static [(&'static str, &'static str)],
);

/// The stages of configs/recipes/tiny.yaml that make model checkpoints, with their parents.
const MODEL_STAGES: [ModelStage; 4] = [
    ("pretrain", "lm", &[]),
    ("sft", "lm", &[("init", "pretrain")]),
    ("reward", "score", &[("init", "sft")]),
    ("ppo", "lm", &[("policy", "sft"), ("reward", "reward")]),
];

fn run_recipe(out: &Path, extra: &[&str]) -> String {
    let mut c = candor();
    c.args(["run", "configs/recipes/tiny.yaml", "--set"])
        .arg(format!("out={}", out.display()));
    for s in extra {
        c.args(["--set", s]);
    }
    ok(&mut c)
}

/// `run  NAME ...` / `skip NAME ...` lines of `candor run`'s output, as (action, stage).
fn plan(stdout: &str) -> Vec<(String, String)> {
    stdout
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            match (w.next(), w.next()) {
                (Some(a @ ("run" | "skip")), Some(stage)) => {
                    Some((a.to_string(), stage.to_string()))
                }
                _ => None,
            }
        })
        .collect()
}

fn ran(stdout: &str) -> Vec<String> {
    plan(stdout)
        .into_iter()
        .filter(|(a, _)| a == "run")
        .map(|(_, s)| s)
        .collect()
}

fn series(dir: &Path, key: &str) -> Vec<f64> {
    metrics(dir)
        .iter()
        .filter_map(|r| r.get(key).and_then(|v| v.as_f64()))
        .collect()
}

fn file_bytes(p: PathBuf) -> Vec<u8> {
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

#[test]
fn tiny_recipe_end_to_end_then_skips_then_reruns_only_downstream_of_a_change() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let clock = std::time::Instant::now();
    let first = run_recipe(&out, &[]);
    let first_sec = clock.elapsed().as_secs_f64();
    let stages = [
        "pretrain",
        "sft",
        "samples",
        "rankings",
        "heldout-samples",
        "heldout-rankings",
        "reward",
        "ppo",
    ];
    assert_eq!(ran(&first), stages, "{first}");

    // every model stage: the checkpoint contract, complete, parents' hashes are the parents'
    for (stage, head, parents) in MODEL_STAGES {
        let dir = out.join(stage);
        for f in [
            "config.json",
            "model.safetensors",
            "tokenizer.json",
            "candor.json",
            "metrics.jsonl",
        ] {
            assert!(dir.join(f).is_file(), "{stage}: {f} missing");
        }
        let meta = read_json(&dir.join("candor.json"));
        assert_eq!(
            (
                meta["stage"].as_str(),
                meta["head"].as_str(),
                meta["complete"].as_bool()
            ),
            (Some(stage), Some(head), Some(true)),
            "{stage}"
        );
        assert_eq!(
            meta["content_hash"].as_str().unwrap(),
            content_hash(&dir).unwrap(),
            "{stage}: stored hash is not its content's"
        );
        let got: Vec<(String, String)> = meta["parents"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| {
                (
                    p["role"].as_str().unwrap().into(),
                    p["content_hash"].as_str().unwrap().into(),
                )
            })
            .collect();
        let want: Vec<(String, String)> = parents
            .iter()
            .map(|(role, p)| (role.to_string(), content_hash(&out.join(p)).unwrap()))
            .collect();
        assert_eq!(got, want, "{stage}: parents");
    }
    assert!(out.join("ppo/critic/model.safetensors").is_file());
    for (stage, file) in [
        ("samples", "samples.jsonl"),
        ("rankings", "ranked.jsonl"),
        ("heldout-samples", "samples.jsonl"),
        ("heldout-rankings", "ranked.jsonl"),
    ] {
        assert!(
            std::fs::metadata(out.join(stage).join(file)).unwrap().len() > 0,
            "{stage}/{file} empty"
        );
    }

    // the direction of the key metrics
    let pre = series(&out.join("pretrain"), "eval_loss");
    let sft = series(&out.join("sft"), "eval_loss");
    let acc = series(&out.join("reward"), "eval_accuracy");
    let ppo = read_json(&out.join("ppo/candor.json"))["metrics"].clone();
    let (j0, j1) = (
        ppo["judge_score_initial"].as_f64().unwrap(),
        ppo["judge_score"].as_f64().unwrap(),
    );
    println!(
        "tiny recipe: {first_sec:.0} s; pretrain eval_loss {:.3} -> {:.3}; sft eval_loss {:.3} -> {:.3}; \
         reward eval_accuracy {:.3}; ppo judge_score {j0:.4} -> {j1:.4} (kl {:.3})",
        pre[0], pre.last().unwrap(), sft[0], sft.last().unwrap(), acc.last().unwrap(), ppo["kl"].as_f64().unwrap()
    );
    assert!(
        pre.last() < pre.first(),
        "pretrain loss did not fall: {pre:?}"
    );
    assert!(sft.last() < sft.first(), "sft loss did not fall: {sft:?}");
    assert!(
        *acc.last().unwrap() > 0.5,
        "reward accuracy not above chance: {acc:?}"
    );
    assert!(
        j1 > j0,
        "PPO did not raise the held-out judge score: {j0} -> {j1}"
    );

    // the tiny recipe is a healthy run: no run-health signal trips
    let tripped: Vec<String> = metrics(&out.join("ppo"))
        .iter()
        .flat_map(|r| r.as_object().unwrap().keys().cloned().collect::<Vec<_>>())
        .filter(|k| k.starts_with("health_"))
        .collect();
    assert!(tripped.is_empty(), "{tripped:?}");

    // the same command again: nothing to do
    let second = run_recipe(&out, &[]);
    assert!(ran(&second).is_empty(), "{second}");
    assert_eq!(plan(&second).len(), stages.len());

    // an edited critic (a model directory inside the PPO checkpoint) is an edited output:
    // PPO, and only PPO, would rerun
    let critic = out.join("ppo/critic/model.safetensors");
    let original = file_bytes(critic.clone());
    let mut edited = original.clone();
    *edited.last_mut().unwrap() ^= 1;
    std::fs::write(&critic, &edited).unwrap();
    let dry = ok(candor().args([
        "run",
        "configs/recipes/tiny.yaml",
        "--dry-run",
        "--set",
        &format!("out={}", out.display()),
    ]));
    assert_eq!(ran(&dry), ["ppo"], "{dry}");
    assert!(dry.contains("output changed since it was made"), "{dry}");
    std::fs::write(&critic, &original).unwrap();

    // one SFT config value changed: SFT and everything after it reruns, pretraining does not
    let pre_weights = file_bytes(out.join("pretrain/model.safetensors"));
    let old_reward = content_hash(&out.join("reward")).unwrap();
    let dry = ok(candor().args([
        "run",
        "configs/recipes/tiny.yaml",
        "--dry-run",
        "--set",
        &format!("out={}", out.display()),
        "--set",
        "sft.train.lr=1e-3",
    ]));
    assert!(dry.contains("config changed at `train.lr`"), "{dry}");
    let third = run_recipe(&out, &["sft.train.lr=1e-3"]);
    assert_eq!(ran(&third), &stages[1..], "{third}");
    assert_eq!(
        file_bytes(out.join("pretrain/model.safetensors")),
        pre_weights,
        "pretraining was touched"
    );
    assert_eq!(
        read_json(&out.join("sft/candor.json"))["config"]["train"]["lr"],
        1e-3
    );
    assert_ne!(
        content_hash(&out.join("reward")).unwrap(),
        old_reward,
        "reward model not retrained"
    );
    let ppo_parent = read_json(&out.join("ppo/candor.json"))["parents"][0]["content_hash"].clone();
    assert_eq!(
        ppo_parent.as_str().unwrap(),
        content_hash(&out.join("sft")).unwrap(),
        "ppo did not start from the new sft"
    );
}

/// A small two-stage recipe whose pretraining is killed midway: the next `candor run` resumes
/// it from its checkpoint and finishes, with the same weights as an uninterrupted run.
#[test]
fn an_interrupted_recipe_resumes_where_it_stopped() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let corpus = small_corpus(d);
    let cfg = small_pretrain_config(d, &corpus, 60);
    let recipe = d.join("recipe.yaml");
    let write = |out: &Path| {
        std::fs::write(
            &recipe,
            format!(
                "out: {}\nseed: 3\ndevice: cpu\nstages:\n  - {{name: base, kind: pretrain, config: {}, set: [train.save_every=10]}}\n  \
                 - {{name: more, kind: pretrain, config: {}, init: base, set: [train.steps=4]}}\n",
                out.display(),
                cfg.display(),
                cfg.display()
            ),
        )
        .unwrap();
    };
    let straight = d.join("straight");
    write(&straight);
    ok(candor().arg("run").arg(&recipe));

    let out = d.join("killed");
    write(&out);
    let mut child = candor()
        .arg("run")
        .arg(&recipe)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let step = kill_after_checkpoint(&mut child, &out.join("base"), 10);
    assert!(step < 60, "the run finished before it could be killed");
    let resumed = ok(candor().arg("run").arg(&recipe));
    assert_eq!(plan(&resumed)[0], ("run".to_string(), "base".to_string()));
    assert!(resumed.contains("output incomplete (resumes)"), "{resumed}");
    for stage in ["base", "more"] {
        assert_eq!(
            file_bytes(out.join(stage).join("model.safetensors")),
            file_bytes(straight.join(stage).join("model.safetensors")),
            "{stage} differs after resuming"
        );
    }
}

/// InstructGPT's iterated loop as a `repeat` group, starting from an existing checkpoint (a
/// `model` stage): each round samples from the policy the round before produced.
#[test]
fn a_repeat_group_chains_its_rounds() {
    let sft = tiny_sft();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let recipe = tmp.path().join("rlhf.yaml");
    std::fs::write(
        &recipe,
        format!(
            "out: {}\nseed: 1\ndevice: cpu\nstages:\n  - {{name: sft, kind: model, path: {}}}\n  - name: rlhf\n    repeat: 2\n    \
             carry: {{policy: sft}}\n    next: {{policy: ppo}}\n    stages:\n      \
             - {{name: samples, kind: sample, model: policy, prompts: data/prompts/sentiment-train.jsonl, k: 4, max_prompts: 40, temperature: 0.4, top_k: 20}}\n      \
             - {{name: rankings, kind: rank, input: samples, judge: sentiment}}\n      \
             - {{name: reward, kind: reward, config: configs/tiny/reward.yaml, init: sft, data: rankings, set: [train.steps=10, train.eval_every=0, data.heldout=null, data.heldout_fraction=0.1]}}\n      \
             - {{name: ppo, kind: ppo, config: configs/tiny/ppo.yaml, policy: policy, reward: reward, set: [train.steps=2, train.eval_every=0]}}\n",
            out.display(),
            sft.display()
        ),
    )
    .unwrap();
    let first = ok(candor().arg("run").arg(&recipe));
    let want = [
        "sft",
        "rlhf-1/samples",
        "rlhf-1/rankings",
        "rlhf-1/reward",
        "rlhf-1/ppo",
        "rlhf-2/samples",
        "rlhf-2/rankings",
        "rlhf-2/reward",
        "rlhf-2/ppo",
    ];
    assert_eq!(
        plan(&first)
            .iter()
            .map(|(_, s)| s.as_str())
            .collect::<Vec<_>>(),
        want,
        "{first}"
    );
    let parents = |stage: &str| -> Vec<(String, String)> {
        read_json(&out.join(stage).join("candor.json"))["parents"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| {
                (
                    p["role"].as_str().unwrap().to_string(),
                    p["content_hash"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    };
    let hash = |dir: &Path| content_hash(dir).unwrap();
    assert_eq!(
        parents("rlhf-1/ppo"),
        [
            ("policy".into(), hash(&sft)),
            ("reward".into(), hash(&out.join("rlhf-1/reward")))
        ]
    );
    assert_eq!(
        parents("rlhf-2/ppo"),
        [
            ("policy".into(), hash(&out.join("rlhf-1/ppo"))),
            ("reward".into(), hash(&out.join("rlhf-2/reward")))
        ]
    );
    assert_eq!(parents("rlhf-2/reward"), [("init".to_string(), hash(&sft))]);
    let again = ok(candor().arg("run").arg(&recipe));
    assert!(ran(&again).is_empty(), "{again}");
}

#[test]
fn bad_recipes_fail_before_training_naming_the_stage() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let out = d.join("run");
    let cases: &[(&str, &str, &str)] = &[
        ("unknown-kind", "  - {name: pre, kind: pretrian, config: configs/tiny/pretrain.yaml}\n", "stage `pre`: unknown kind `pretrian`"),
        (
            "missing-ref",
            "  - {name: pre, kind: pretrain, config: configs/tiny/pretrain.yaml}\n  - {name: sft, kind: sft, config: configs/tiny/sft.yaml, init: pretrained}\n",
            "stage `sft`: `init: pretrained`: no stage named `pretrained`",
        ),
        (
            "later-ref",
            "  - {name: sft, kind: sft, config: configs/tiny/sft.yaml, init: pre}\n  - {name: pre, kind: pretrain, config: configs/tiny/pretrain.yaml}\n",
            "stage `sft`: `init: pre` refers to a stage that comes later",
        ),
        (
            "cycle",
            "  - {name: a, kind: sft, config: configs/tiny/sft.yaml, init: b}\n  - {name: b, kind: sft, config: configs/tiny/sft.yaml, init: a}\n",
            "stage `a`: `init: b` and stage `b` refer to each other (a cycle)",
        ),
        ("self", "  - {name: a, kind: sft, config: configs/tiny/sft.yaml, init: a}\n", "stage `a`: `init: a` refers to the stage itself (a cycle)"),
        (
            "missing-config",
            "  - {name: pre, kind: pretrain, config: configs/tiny/pretrain.yaml}\n  - {name: sft, kind: sft, config: configs/tiny/nope.yaml, init: pre}\n",
            "stage `sft`: config file configs/tiny/nope.yaml does not exist",
        ),
        ("missing-model", "  - {name: base, kind: model, path: /nonexistent/ckpt}\n", "stage `base`: /nonexistent/ckpt"),
        (
            "missing-data",
            "  - {name: pre, kind: pretrain, config: configs/tiny/pretrain.yaml}\n  - {name: sft, kind: sft, config: configs/tiny/sft.yaml, init: pre, set: [data.heldout=/nonexistent/h.jsonl]}\n",
            "stage `sft`: data.heldout: /nonexistent/h.jsonl does not exist",
        ),
        (
            "missing-prompts",
            "  - {name: pre, kind: pretrain, config: configs/tiny/pretrain.yaml}\n  - {name: s, kind: sample, model: pre, prompts: /nonexistent/p.jsonl}\n",
            "stage `s`: prompts: /nonexistent/p.jsonl does not exist",
        ),
        (
            "bad-config-key",
            "  - {name: pre, kind: pretrain, config: configs/tiny/pretrain.yaml, set: [train.stepz=3]}\n",
            "stage `pre`",
        ),
    ];
    for (name, stages, want) in cases {
        let path = d.join(format!("{name}.yaml"));
        std::fs::write(
            &path,
            format!("out: {}\ndevice: cpu\nstages:\n{stages}", out.display()),
        )
        .unwrap();
        let e = fails(candor().arg("run").arg(&path));
        assert!(e.contains(want), "{name}: {e}");
        assert!(
            e.contains(&format!("{name}.yaml")),
            "{name}: the error does not name the recipe: {e}"
        );
        assert!(
            !out.exists(),
            "{name}: something was written before the recipe was refused"
        );
    }
}

/// Every recipe in configs/recipes/ plans (`--dry-run`): its stages' configs, every `set`
/// key (a misspelt one is refused by name), roles and input files are valid, and nothing
/// is written. The GGUF of an `import` stage (fetched, not committed) is stood in for by
/// an existing file: a dry run checks that it exists, not what it holds.
#[test]
fn every_shipped_recipe_plans() {
    let tmp = tempfile::tempdir().unwrap();
    let mut recipes: Vec<PathBuf> = std::fs::read_dir(repo_root().join("configs/recipes"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    recipes.sort();
    assert!(recipes.len() >= 7, "{recipes:?}");
    for recipe in &recipes {
        let text = std::fs::read_to_string(recipe).unwrap();
        let out = tmp.path().join(recipe.file_stem().unwrap());
        let mut c = candor();
        c.args(["run"])
            .arg(recipe)
            .arg("--dry-run")
            .arg("--set")
            .arg(format!("out={}", out.display()));
        if text.contains("kind: import") {
            c.args(["--set", "base.gguf=Cargo.toml"]);
        }
        let stdout = ok(&mut c);
        let stages = plan(&stdout);
        assert!(
            !stages.is_empty() && stages.iter().all(|(a, _)| a == "run"),
            "{}: {stdout}",
            recipe.display()
        );
        assert!(
            !out.exists(),
            "{}: a dry run wrote {}",
            recipe.display(),
            out.display()
        );
    }
}
