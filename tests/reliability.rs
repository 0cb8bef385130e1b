//! Bad input and faults through the real binary (issue 16's battery): each case ends with
//! one clear line naming the user's option or path, a non-zero exit, no panic, and nothing
//! left behind — or, where candor decides (incomplete parents, replacing outputs, file
//! modes), the documented behaviour.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

const PROMPTS: &str = "data/prompts/sentiment-heldout.jsonl";

/// `candor sample` from `model` into `out`, with extra arguments.
fn sample(model: &Path, out: &Path, extra: &[&str]) -> Command {
    let mut c = candor();
    c.args(["sample", "--device", "cpu", "--model"])
        .arg(model)
        .args(["--prompts", PROMPTS, "--out"])
        .arg(out)
        .args(extra);
    c
}

/// Names in `dir` (sorted), to show nothing was left behind.
fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    v.sort();
    v
}

/// Case 1: K so large the arithmetic overflows, or the run cannot fit in memory, is
/// refused before any allocation, with the figure; a run that fits says what it needs.
#[test]
fn sample_refuses_a_k_that_overflows_or_cannot_fit() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tiny_sft();
    let out = tmp.path().join("c.jsonl");
    let short = ["--max-new-tokens", "16"];
    let e = fails(&mut sample(
        &base,
        &out,
        &["--k", "18446744073709551615", short[0], short[1]],
    ));
    assert!(
        e.contains("--k 18446744073709551615:") && e.contains("more than this machine can count"),
        "{e}"
    );
    for k in ["4294967296", "100000000"] {
        let e = fails(&mut sample(&base, &out, &["--k", k, short[0], short[1]]));
        assert!(
            e.contains(&format!("--k {k}: 60 prompts x {k} responses")) && e.contains("available"),
            "{e}"
        );
    }
    assert!(names(tmp.path()).is_empty(), "{:?}", names(tmp.path()));
    // a run that fits names its estimate
    let run = sample(&base, &out, &["--k", "2", "--max-new-tokens", "4"])
        .output()
        .unwrap();
    assert!(run.status.success());
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(
        stderr.contains("60 prompts x 2 responses") && stderr.contains("of memory)"),
        "{stderr}"
    );
}

/// Case 2 and 3: out-of-range sampling settings are refused by `generate`, `sample` and
/// PPO's rollout config alike, naming the option or key; nothing is written.
#[test]
fn out_of_range_sampling_settings_are_refused_everywhere() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("c.jsonl");
    let gen =
        |arg: &str| fails(candor().args(["generate", "--model", "nowhere", "--prompt", "Hi", arg]));
    for (arg, want) in [
        (
            "--temperature=-1",
            "--temperature -1: expected a finite number >= 0",
        ),
        ("--temperature=NaN", "--temperature NaN: expected"),
        ("--temperature=inf", "--temperature inf: expected"),
        (
            "--top-p=1.5",
            "--top-p 1.5: expected a probability in (0, 1]",
        ),
        ("--top-p=0", "--top-p 0: expected"),
        ("--top-p=-0.5", "--top-p -0.5: expected"),
        (
            "--max-new-tokens=0",
            "--max-new-tokens 0: expected at least 1",
        ),
    ] {
        let e = gen(arg);
        assert!(e.contains(want), "{arg}: {e}");
    }
    for (args, want) in [
        (["--temperature", "NaN"], "--temperature NaN: expected"),
        (["--top-p", "2"], "--top-p 2: expected"),
        (
            ["--max-new-tokens", "0"],
            "--max-new-tokens 0: expected at least 1",
        ),
    ] {
        let e = fails(&mut sample(Path::new("nowhere"), &out, &args));
        assert!(e.contains(want), "{args:?}: {e}");
    }
    for (set, want) in [
        (
            "rollout.temperature=-1",
            "rollout.temperature: -1: expected",
        ),
        (
            "rollout.top_p=2",
            "rollout.top_p: 2: expected a probability",
        ),
    ] {
        let e = fails(
            candor()
                .args(["ppo", "--config", "configs/tiny/ppo.yaml", "--set", set])
                .args(["--policy", "nowhere", "--device", "cpu", "--out"])
                .arg(tmp.path().join("ppo")),
        );
        assert!(
            e.contains(&format!("configs/tiny/ppo.yaml: {want}")),
            "{set}: {e}"
        );
    }
    assert!(names(tmp.path()).is_empty(), "{:?}", names(tmp.path()));
}

/// Case 4: a write that fails midway (here the file-size limit, as a full disk would) names
/// the user's --out and leaves no temporary behind; the old file is untouched.
#[test]
fn a_failed_output_write_names_the_path_and_leaves_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tiny_sft();
    let dir = tmp.path().join("outs");
    std::fs::create_dir(&dir).unwrap();
    let out = dir.join("c.jsonl");
    std::fs::write(&out, "old\n").unwrap();
    // SIGXFSZ ignored (inherited through exec), so the write fails with EFBIG instead
    let script = format!(
        "trap '' XFSZ; ulimit -f 2; exec \"$0\" sample --device cpu --model {} --prompts {PROMPTS} --k 4 --max-new-tokens 16 --overwrite --out {}",
        base.display(),
        out.display()
    );
    let e = fails(
        Command::new("sh")
            .arg("-c")
            .arg(script)
            .arg(env!("CARGO_BIN_EXE_candor"))
            .current_dir(repo_root()),
    );
    assert!(
        e.starts_with(&format!("error: --out: {}: cannot write", out.display())),
        "{e}"
    );
    assert!(!e.contains(".tmp-"), "{e}");
    assert_eq!(names(&dir), ["c.jsonl"]);
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "old\n");
}

/// Case 5: a second writer of the same --out is refused at once, naming the first's pid;
/// the first finishes normally and releases the lock.
#[test]
fn a_second_writer_of_an_output_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = small_corpus(tmp.path());
    let cfg = small_pretrain_config(tmp.path(), &corpus, 40);
    let out = tmp.path().join("run");
    let run = || {
        let mut c = candor();
        c.args(["pretrain", "--device", "cpu", "--config"])
            .arg(&cfg)
            .arg("--out")
            .arg(&out);
        c
    };
    let mut first = run()
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let lock = tmp.path().join(".run.lock");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while std::fs::read_to_string(&lock).map_or(true, |s| s.is_empty()) {
        assert!(std::time::Instant::now() < deadline, "no lock appeared");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let e = fails(&mut run());
    assert!(
        e.contains(&format!(
            "{}: is being written by process {}",
            out.display(),
            first.id()
        )),
        "{e}"
    );
    let e = fails(run().arg("--overwrite"));
    assert!(e.contains("is being written by process"), "{e}");
    assert!(first.wait().unwrap().success());
    assert!(!lock.exists(), "the lock file is removed when the run ends");
    assert_eq!(read_json(&out.join("candor.json"))["step"], 40);
}

/// Case 7: an --out that cannot be written fails before any training, naming --out.
#[test]
fn an_unwritable_out_fails_before_training_naming_it() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = small_corpus(tmp.path());
    let cfg = small_pretrain_config(tmp.path(), &corpus, 2000);
    let afile = tmp.path().join("afile");
    std::fs::write(&afile, "x").unwrap();
    for out in [afile.join("sub"), PathBuf::from("/proc/candor-test/out")] {
        let t = std::time::Instant::now();
        let e = fails(
            candor()
                .args(["pretrain", "--device", "cpu", "--config"])
                .arg(&cfg)
                .arg("--out")
                .arg(&out),
        );
        assert!(
            e.starts_with(&format!(
                "error: {}: cannot write an output here",
                out.display()
            )),
            "{e}"
        );
        assert!(!e.contains(".tmp-") && !e.contains(".probe-"), "{e}");
        // 2000 steps would take minutes: it failed before training
        assert!(t.elapsed().as_secs() < 30);
    }
    assert_eq!(std::fs::read_to_string(&afile).unwrap(), "x");
}

/// Case 8, decided: a stage refuses an incomplete parent unless --allow-incomplete; sample
/// refuses to replace its output unless --overwrite; the weights are 0666 less the umask,
/// like every other file; `--k -1` is a one-line error naming --k.
#[test]
fn documented_behaviour_for_parents_outputs_modes_and_negative_numbers() {
    let tmp = tempfile::tempdir().unwrap();
    let base = small_checkpoint(tmp.path());

    // incomplete parent
    let partial = tmp.path().join("partial");
    std::fs::create_dir(&partial).unwrap();
    for f in std::fs::read_dir(&base).unwrap() {
        let f = f.unwrap();
        if f.file_type().unwrap().is_file() {
            std::fs::copy(f.path(), partial.join(f.file_name())).unwrap();
        }
    }
    let mut meta = read_json(&partial.join("candor.json"));
    meta["complete"] = false.into();
    std::fs::write(partial.join("candor.json"), meta.to_string()).unwrap();
    let sft = |extra: &[&str]| {
        let mut c = candor();
        c.args([
            "sft",
            "--config",
            "configs/tiny/sft.yaml",
            "--device",
            "cpu",
        ])
        .arg("--init")
        .arg(&partial)
        .arg("--out")
        .arg(tmp.path().join("sft"))
        .args(extra);
        c
    };
    let e = fails(&mut sft(&[]));
    assert!(
        e.contains(&format!(
            "{}: (init) is an incomplete checkpoint (step 2 of 2",
            partial.display()
        )) && e.contains("--allow-incomplete"),
        "{e}"
    );
    // allowed, it gets past that check (to the next one, a config error here)
    let e = fails(&mut sft(&[
        "--allow-incomplete",
        "--set",
        "train.batch_size=0",
    ]));
    assert!(!e.contains("incomplete"), "{e}");

    // replacing an output
    let out = tmp.path().join("c.jsonl");
    std::fs::write(&out, "300 lines of someone's work\n").unwrap();
    let e = fails(&mut sample(&base, &out, &["--k", "2"]));
    assert!(
        e.contains(&format!(
            "--out {}: already exists; pass --overwrite",
            out.display()
        )),
        "{e}"
    );
    assert_eq!(
        std::fs::read_to_string(&out).unwrap(),
        "300 lines of someone's work\n"
    );

    // modes: model.safetensors like config.json
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = |f: &str| {
            std::fs::metadata(base.join(f))
                .unwrap()
                .permissions()
                .mode()
                & 0o777
        };
        assert_eq!(mode("model.safetensors"), mode("config.json"));
    }

    // a negative number names its option, on one line, exit status 2
    let run = sample(&base, &out, &["--k", "-1"]).output().unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert_eq!(run.status.code(), Some(2), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with("error: invalid value '-1' for '--k <K>'"),
        "{stderr}"
    );
}

/// Every file candor writes goes through the atomic writer: `tokenizer train --out` and the
/// report's SVG charts too. A write that fails midway (the file-size limit, as a full disk)
/// names the file, leaves the old one untouched and no temporary behind.
#[test]
fn tokenizer_and_report_files_are_written_atomically() {
    let tmp = tempfile::tempdir().unwrap();
    let limited = |args: &str| {
        let script = format!("trap '' XFSZ; ulimit -f 1; exec \"$0\" {args}");
        fails(
            Command::new("sh")
                .arg("-c")
                .arg(script)
                .arg(env!("CARGO_BIN_EXE_candor"))
                .current_dir(repo_root()),
        )
    };
    let tok_dir = tmp.path().join("tok");
    std::fs::create_dir(&tok_dir).unwrap();
    let tok = tok_dir.join("tokenizer.json");
    std::fs::write(&tok, "old\n").unwrap();
    let e = limited(&format!(
        "tokenizer train --corpus {} --vocab-size 400 --out {}",
        small_corpus(tmp.path()).display(),
        tok.display()
    ));
    assert!(
        e.starts_with(&format!("error: {}: cannot write", tok.display())),
        "{e}"
    );
    assert_eq!(names(&tok_dir), ["tokenizer.json"]);
    assert_eq!(std::fs::read_to_string(&tok).unwrap(), "old\n");

    let run = tmp.path().join("run");
    let sft = run.join("sft");
    std::fs::create_dir_all(&sft).unwrap();
    for f in std::fs::read_dir(tiny_sft()).unwrap() {
        let f = f.unwrap().path();
        if f.is_file() {
            std::fs::copy(&f, sft.join(f.file_name().unwrap())).unwrap();
        }
    }
    let e = limited(&format!("report {}", run.display()));
    assert!(e.contains(".svg: cannot write"), "{e}");
    assert!(!e.contains(".tmp-"), "{e}");
    let mut left = vec![];
    let mut visit = vec![run.clone()];
    while let Some(d) = visit.pop() {
        for f in std::fs::read_dir(&d).unwrap() {
            let f = f.unwrap().path();
            if f.is_dir() {
                visit.push(f);
            } else if f.to_string_lossy().contains(".tmp-") {
                left.push(f);
            }
        }
    }
    assert!(left.is_empty(), "{left:?}");
}
