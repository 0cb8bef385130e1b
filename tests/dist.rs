//! Data parallel through the real binary on the CPU: `--nproc 2` (ranks as processes over
//! TCP), the torchrun environment, and failures that stop every rank.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::process::Stdio;

use common::*;

fn weights(dir: &Path) -> HashMap<String, candle_core::Tensor> {
    candle_core::safetensors::load(dir.join("model.safetensors"), &candle_core::Device::Cpu).unwrap()
}

fn worst_difference(a: &Path, b: &Path) -> f32 {
    let (a, b) = (weights(a), weights(b));
    assert_eq!(a.len(), b.len());
    a.iter()
        .map(|(k, x)| (x - &b[k]).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap())
        .fold(0.0, f32::max)
}

fn losses(dir: &Path) -> Vec<f64> {
    metrics(dir).iter().filter_map(|r| r.get("loss").and_then(|v| v.as_f64())).collect()
}

/// `--nproc 2`: two processes, each on half of every batch, train the same model as one
/// process on whole batches; one output, one summary line, rank 1 silent.
#[test]
fn nproc_2_trains_the_same_model_as_one_process() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = small_corpus(tmp.path());
    let cfg = small_pretrain_config(tmp.path(), &corpus, 10);
    let (one, two) = (tmp.path().join("one"), tmp.path().join("two"));
    ok(candor().args(["pretrain", "--device", "cpu", "--config"]).arg(&cfg).arg("--out").arg(&one));
    let out = candor()
        .args(["pretrain", "--device", "cpu", "--nproc", "2", "--config"])
        .arg(&cfg)
        .arg("--out")
        .arg(&two)
        .output()
        .unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{stderr}");
    assert_eq!(stdout.lines().filter(|l| l.starts_with("pretrain:")).count(), 1, "{stdout}");
    assert!(stderr.contains("2 ranks (tcp)"), "{stderr}");
    assert!(!stderr.contains("[rank 1]"), "rank 1 printed: {stderr}");
    let diff = worst_difference(&one, &two);
    let (l1, l2) = (losses(&one), losses(&two));
    let loss_diff = l1.iter().zip(&l2).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
    println!("--nproc 2 vs 1 process: worst weight difference {diff:.2e}, worst logged loss difference {loss_diff:.2e}");
    assert_eq!(l1.len(), l2.len());
    assert!(diff < 1e-5 && loss_diff < 1e-5, "weights differ by {diff}, losses by {loss_diff}");
}

/// Ranks started by another launcher (here: by hand, with torchrun's variables) join the
/// same way; a rank that cannot start its part stops the others with one error.
#[test]
fn torchrun_environment_and_failing_ranks() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = small_corpus(tmp.path());
    let cfg = small_pretrain_config(tmp.path(), &corpus, 4);
    let out = tmp.path().join("env");
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port().to_string();
    let ranks: Vec<_> = (0..2)
        .map(|r| {
            candor()
                .args(["pretrain", "--device", "cpu", "--config"])
                .arg(&cfg)
                .arg("--out")
                .arg(&out)
                .envs([("RANK", r.to_string()), ("WORLD_SIZE", "2".into()), ("LOCAL_RANK", r.to_string())])
                .envs([("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", port.as_str())])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let outs: Vec<_> = ranks.into_iter().map(|c| c.wait_with_output().unwrap()).collect();
    for o in &outs {
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    assert_eq!(read_json(&out.join("candor.json"))["step"], 4);
    assert!(String::from_utf8_lossy(&outs[1].stdout).is_empty());

    // a global batch smaller than the world: every rank refuses; one error line
    let e = fails(
        candor()
            .args(["pretrain", "--device", "cpu", "--nproc", "2", "--set", "train.batch_size=1", "--config"])
            .arg(&cfg)
            .arg("--out")
            .arg(tmp.path().join("bad")),
    );
    assert!(e.contains("train.batch_size: 1 is smaller than the 2 ranks"), "{e}");
    // a launcher environment that does not add up
    let e = fails(
        candor()
            .args(["pretrain", "--device", "cpu", "--config"])
            .arg(&cfg)
            .arg("--out")
            .arg(tmp.path().join("bad"))
            .envs([("RANK", "0"), ("WORLD_SIZE", "2")]),
    );
    assert!(e.contains("needs MASTER_ADDR"), "{e}");
    assert!(!tmp.path().join("bad").exists());
}
