//! Data-parallel processes: `--nproc N` starts N copies of this very command as ranks 0…N-1
//! (torchrun's environment: RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT); a
//! process started that way, or by torchrun or `srun`, joins the run with [`join`].
//!
//! Rank 0's output is this command's; the other ranks' stderr lines are forwarded with a
//! `[rank N]` prefix and their stdout is dropped. When a rank fails, the others stop (they
//! lose their connection to it, or are killed after a grace period) and the command fails.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use candle_core::Device;
use candor_train::dist::{connect, Dist, LaunchEnv};

/// Whether this process is already one rank of a multi-process run.
pub fn inside_a_run() -> Result<bool> {
    Ok(LaunchEnv::from_env()?.is_some())
}

/// This process's device and place in the run: alone (no launcher environment), or rank
/// `RANK` of `WORLD_SIZE` on `cuda:LOCAL_RANK` when `spec` is `cuda` (or `auto` with a
/// GPU). The transport is NCCL on GPUs in a build with the `nccl` feature, else TCP through
/// rank 0; `CANDOR_DIST_BACKEND=nccl|tcp` chooses.
pub fn join(spec: &str) -> Result<(Device, Dist)> {
    let Some(env) = LaunchEnv::from_env()? else {
        return Ok((crate::device(spec)?, Dist::single()));
    };
    let spec = match spec {
        "cuda" => format!("cuda:{}", env.local_rank),
        "auto" if candle_core::utils::cuda_is_available() => format!("cuda:{}", env.local_rank),
        s => s.to_string(),
    };
    let device = crate::device(&spec)?;
    let backend = std::env::var("CANDOR_DIST_BACKEND").unwrap_or_else(|_| "auto".into());
    let dist = connect(&env, &device, &backend)
        .with_context(|| format!("rank {} of {}", env.rank, env.world_size))?;
    Ok((device, dist))
}

/// Start `n` ranks of the current command on this machine and wait for them. Returns when
/// all succeeded; when rank 0 failed (it printed its error), exits with its status.
pub fn run_ranks(n: usize) -> Result<()> {
    let exe = std::env::current_exe().context("cannot find the candor executable")?;
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .context("no free local port for the ranks' rendezvous")?
        .port();
    // CPU ranks share the cores instead of each starting a thread per core
    let threads = std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| {
        (std::thread::available_parallelism().map_or(1, |c| c.get()) / n)
            .max(1)
            .to_string()
    });
    let mut children: Vec<Child> = vec![];
    let mut forwarders = vec![];
    for rank in 0..n {
        let mut cmd = Command::new(&exe);
        cmd.args(&args)
            .env("RANK", rank.to_string())
            .env("LOCAL_RANK", rank.to_string())
            .env("WORLD_SIZE", n.to_string())
            .env("LOCAL_WORLD_SIZE", n.to_string())
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", port.to_string())
            .env("RAYON_NUM_THREADS", &threads)
            .stdin(Stdio::null());
        if rank > 0 {
            cmd.stdout(Stdio::null()).stderr(Stdio::piped());
        }
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                stop(&mut children);
                bail!("cannot start rank {rank}: {e}");
            }
        };
        if let Some(err) = child.stderr.take() {
            forwarders.push(std::thread::spawn(move || {
                for line in BufReader::new(err)
                    .lines()
                    .map_while(std::result::Result::ok)
                {
                    eprintln!("[rank {rank}] {line}");
                }
            }));
        }
        children.push(child);
    }
    // wait; after the first failure give the others a grace period, then stop them
    let mut status: Vec<Option<std::process::ExitStatus>> = vec![None; n];
    let mut failed_at: Option<Instant> = None;
    while status.iter().any(Option::is_none) {
        for (i, c) in children.iter_mut().enumerate() {
            if status[i].is_none() {
                if let Some(s) = c.try_wait().context("waiting for a rank")? {
                    if !s.success() && failed_at.is_none() {
                        failed_at = Some(Instant::now());
                    }
                    status[i] = Some(s);
                }
            }
        }
        if failed_at.is_some_and(|t| t.elapsed() > Duration::from_secs(10)) {
            for (i, c) in children.iter_mut().enumerate() {
                if status[i].is_none() {
                    let _ = c.kill();
                    status[i] = Some(c.wait().context("waiting for a stopped rank")?);
                }
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    for f in forwarders {
        let _ = f.join();
    }
    let status: Vec<std::process::ExitStatus> = status.into_iter().map(Option::unwrap).collect();
    if !status[0].success() {
        std::process::exit(status[0].code().filter(|&c| c != 0).unwrap_or(1));
    }
    if let Some((rank, s)) = status.iter().enumerate().find(|(_, s)| !s.success()) {
        bail!("rank {rank} of {n} failed ({s}); its messages are above, prefixed [rank {rank}]");
    }
    Ok(())
}

fn stop(children: &mut [Child]) {
    for c in children {
        let _ = c.kill();
        let _ = c.wait();
    }
}
