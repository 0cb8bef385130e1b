//! Where a rank is: the launcher's environment (torchrun's or Slurm's variables).

use super::err;
use crate::error::Result;

/// A rank's place in a multi-process run, from the launcher's environment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LaunchEnv {
    pub rank: usize,
    pub world_size: usize,
    /// Rank among the processes on this host: the GPU it uses.
    pub local_rank: usize,
    /// Rank 0's host and a free port on it: where the others connect.
    pub master_addr: String,
    pub master_port: u16,
}

/// Default MASTER_PORT, as torchrun's.
pub const DEFAULT_MASTER_PORT: u16 = 29500;

impl LaunchEnv {
    /// Read torchrun-style variables (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`,
    /// `MASTER_PORT`), else Slurm's inside an `srun` step (`SLURM_PROCID`,
    /// `SLURM_STEP_NUM_TASKS` or `SLURM_NTASKS`, `SLURM_LOCALID`; `MASTER_ADDR` must still be
    /// set, e.g. to the first host of the allocation). `None` when neither names a world
    /// of more than one process (a world of one with `MASTER_ADDR` set is a run of one
    /// rank, its transport set up: a smoke test of NCCL). A Slurm batch script itself (no
    /// step) is not a rank.
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<Option<Self>> {
        let num =
            |key: &str| -> Result<Option<usize>> {
                match get(key) {
                    None => Ok(None),
                    Some(v) if v.trim().is_empty() => Ok(None),
                    Some(v) => v.trim().parse::<usize>().map(Some).map_err(|_| {
                        err(format!("environment: {key}=`{v}` is not a whole number"))
                    }),
                }
            };
        let (rank, world, local, source) = if let Some(world) = num("WORLD_SIZE")? {
            let rank = num("RANK")?
                .ok_or_else(|| err("environment: WORLD_SIZE is set but RANK is not"))?;
            (rank, world, num("LOCAL_RANK")?.unwrap_or(rank), "RANK")
        } else if get("SLURM_STEP_ID")
            .or_else(|| get("SLURM_STEPID"))
            .is_some()
            && num("SLURM_PROCID")?.is_some()
        {
            let world = match num("SLURM_STEP_NUM_TASKS")? {
                Some(w) => w,
                None => num("SLURM_NTASKS")?.unwrap_or(1),
            };
            let rank = num("SLURM_PROCID")?.unwrap_or(0);
            (
                rank,
                world,
                num("SLURM_LOCALID")?.unwrap_or(0),
                "SLURM_PROCID",
            )
        } else {
            return Ok(None);
        };
        if world == 0 {
            return Err(err("environment: the world size is 0"));
        }
        if rank >= world {
            return Err(err(format!(
                "environment: {source}={rank} is not below the world size {world}"
            )));
        }
        let master_addr = get("MASTER_ADDR").filter(|s| !s.trim().is_empty());
        if world == 1 && master_addr.is_none() {
            return Ok(None); // alone; a world of one with MASTER_ADDR still sets up its transport
        }
        let master_addr = master_addr.ok_or_else(|| {
            err(format!("environment: a world of {world} processes needs MASTER_ADDR (rank 0's host) and MASTER_PORT"))
        })?;
        let master_port = match get("MASTER_PORT") {
            None => DEFAULT_MASTER_PORT,
            Some(p) => p.trim().parse::<u16>().map_err(|_| {
                err(format!(
                    "environment: MASTER_PORT=`{p}` is not a port number"
                ))
            })?,
        };
        Ok(Some(LaunchEnv {
            rank,
            world_size: world,
            local_rank: local,
            master_addr,
            master_port,
        }))
    }

    pub fn from_env() -> Result<Option<Self>> {
        Self::from_vars(|k| std::env::var(k).ok())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn launch_env_reads_torchrun_and_slurm_variables() {
        let env = |pairs: &[(&str, &str)]| {
            let m: HashMap<String, String> = pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            LaunchEnv::from_vars(move |k| m.get(k).cloned())
        };
        assert_eq!(env(&[]).unwrap(), None);
        assert_eq!(env(&[("RANK", "0"), ("WORLD_SIZE", "1")]).unwrap(), None);
        assert_eq!(
            env(&[("RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "h")])
                .unwrap()
                .unwrap()
                .world_size,
            1
        );
        let e = env(&[
            ("RANK", "1"),
            ("WORLD_SIZE", "4"),
            ("LOCAL_RANK", "1"),
            ("MASTER_ADDR", "node1"),
            ("MASTER_PORT", "1234"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(
            e,
            LaunchEnv {
                rank: 1,
                world_size: 4,
                local_rank: 1,
                master_addr: "node1".into(),
                master_port: 1234
            }
        );
        let e = env(&[
            ("SLURM_STEP_ID", "0"),
            ("SLURM_PROCID", "5"),
            ("SLURM_NTASKS", "8"),
            ("SLURM_LOCALID", "1"),
            ("MASTER_ADDR", "n0"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(
            (e.rank, e.world_size, e.local_rank, e.master_port),
            (5, 8, 1, DEFAULT_MASTER_PORT)
        );
        // a batch script (no step) is not a rank, even with SLURM_NTASKS > 1
        assert_eq!(
            env(&[("SLURM_PROCID", "0"), ("SLURM_NTASKS", "8")]).unwrap(),
            None
        );
        let bad = env(&[("RANK", "2"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "x")])
            .unwrap_err()
            .to_string();
        assert!(
            bad.contains("RANK=2 is not below the world size 2"),
            "{bad}"
        );
        let bad = env(&[("RANK", "0"), ("WORLD_SIZE", "two")])
            .unwrap_err()
            .to_string();
        assert!(
            bad.contains("WORLD_SIZE=`two` is not a whole number"),
            "{bad}"
        );
        let bad = env(&[("RANK", "0"), ("WORLD_SIZE", "2")])
            .unwrap_err()
            .to_string();
        assert!(bad.contains("needs MASTER_ADDR"), "{bad}");
    }
}
