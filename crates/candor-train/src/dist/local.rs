//! The in-process transport: every rank a thread, each collective gathered in one
//! mutex-guarded table of per-rank slots.

use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use super::err;
use super::host::{combine, host_comm, Exchange, Op, WAIT};
use crate::error::{Error, Result};

/// Ranks as threads of one process (tests, and simulating a world on one machine).
pub struct LocalGroup {
    rank: usize,
    shared: Arc<LocalShared>,
}

struct LocalShared {
    n: usize,
    state: Mutex<LocalState>,
    cv: Condvar,
}

#[derive(Default)]
struct LocalState {
    slots: Vec<Option<Vec<f64>>>,
    arrived: usize,
    result: Option<std::result::Result<Arc<Vec<f64>>, String>>,
    taken: usize,
    /// Members dropped (a thread that ended, perhaps with an error).
    left: usize,
}

impl LocalGroup {
    /// `n` connected members, one per thread: member `r` is rank `r`.
    pub fn new(n: usize) -> Vec<LocalGroup> {
        let shared = Arc::new(LocalShared {
            n,
            state: Mutex::new(LocalState {
                slots: vec![None; n],
                ..Default::default()
            }),
            cv: Condvar::new(),
        });
        (0..n)
            .map(|rank| LocalGroup {
                rank,
                shared: shared.clone(),
            })
            .collect()
    }
}

impl Drop for LocalGroup {
    fn drop(&mut self) {
        let mut s = self.shared.state.lock().unwrap_or_else(|p| p.into_inner());
        s.left += 1;
        self.shared.cv.notify_all();
    }
}

impl Exchange for LocalGroup {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.shared.n
    }
    fn exchange(&self, data: Vec<f64>, op: Op) -> Result<Vec<f64>> {
        let sh = &*self.shared;
        let deadline = Instant::now() + WAIT;
        let mut s = sh.state.lock().unwrap_or_else(|p| p.into_inner());
        // the previous collective must have been collected by everyone
        while s.result.is_some() {
            s = sh
                .cv
                .wait_timeout(s, Duration::from_millis(100))
                .unwrap_or_else(|p| p.into_inner())
                .0;
            if Instant::now() > deadline {
                return Err(err(format!(
                    "rank {}: timed out waiting for the other ranks",
                    self.rank
                )));
            }
        }
        s.slots[self.rank] = Some(data);
        s.arrived += 1;
        if s.arrived == sh.n {
            let parts: Vec<Vec<f64>> = s
                .slots
                .iter_mut()
                .map(|x| x.take().unwrap_or_default())
                .collect();
            s.result = Some(combine(&parts, op).map(Arc::new));
            sh.cv.notify_all();
        } else {
            while s.result.is_none() {
                if s.left > 0 {
                    return Err(err(format!(
                        "rank {}: another rank stopped before this collective (see its error)",
                        self.rank
                    )));
                }
                if Instant::now() > deadline {
                    return Err(err(format!(
                        "rank {}: timed out waiting for the other ranks",
                        self.rank
                    )));
                }
                s = sh
                    .cv
                    .wait_timeout(s, Duration::from_millis(100))
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
        }
        let out = s.result.clone().expect("result is set");
        s.taken += 1;
        if s.taken == sh.n {
            s.result = None;
            s.taken = 0;
            s.arrived = 0;
            sh.cv.notify_all();
        }
        Ok(out.map_err(Error::Msg)?.to_vec())
    }
}

host_comm!(LocalGroup, "threads");

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dist::tests::on_threads;
    use candle_core::{Device, Tensor};

    #[test]
    fn thread_group_all_reduces_broadcasts_and_survives_many_rounds() {
        let out = on_threads(LocalGroup::new(3), |d| {
            let r = d.rank() as f32;
            let mut last = vec![];
            for i in 0..50 {
                let t = Tensor::new(&[r, 10.0 * r + i as f32], &Device::Cpu).unwrap();
                let s = d
                    .comm()
                    .all_reduce_sum(&[t.clone(), t.sum_all().unwrap()])
                    .unwrap();
                last = s[0].to_vec1::<f32>().unwrap();
                assert_eq!(last, vec![3.0, 30.0 + 3.0 * i as f32]);
                assert_eq!(s[1].to_scalar::<f32>().unwrap(), 33.0 + 3.0 * i as f32);
                let b = d.comm().broadcast(&[t], 1).unwrap();
                assert_eq!(b[0].to_vec1::<f32>().unwrap(), vec![1.0, 10.0 + i as f32]);
                d.barrier().unwrap();
            }
            assert_eq!(d.all_reduce_f64(&[0.5, r as f64]).unwrap(), vec![1.5, 3.0]);
            d.check_same("step", 7).unwrap();
            last
        });
        assert_eq!(out.len(), 3);
    }

    #[test]
    fn a_rank_that_stops_early_fails_the_others_instead_of_hanging() {
        let out = on_threads(LocalGroup::new(2), |d| {
            if d.rank() == 1 {
                return Ok(vec![]); // drops its member without joining the collective
            }
            d.all_reduce_f64(&[1.0])
        });
        let e = out[0].as_ref().unwrap_err().to_string();
        assert!(e.contains("another rank stopped"), "{e}");
        let e = on_threads(LocalGroup::new(2), |d| {
            d.check_same("step", d.rank() as u64 * 3)
        })
        .into_iter()
        .nth(1)
        .unwrap();
        assert!(e
            .unwrap_err()
            .to_string()
            .contains("rank 1 has step 3 but rank 0 has 0"));
    }
}
