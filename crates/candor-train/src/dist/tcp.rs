//! Ranks as processes over TCP, star-connected through rank 0: the rendezvous every
//! multi-process run starts with (NCCL too sends its unique id over it), and the transport
//! of CPU runs.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::host::{combine, host_comm, Exchange, Op, WAIT};
use super::{err, LaunchEnv};
use crate::error::{Error, Result};

/// Ranks as processes, star-connected to rank 0 over TCP at MASTER_ADDR:MASTER_PORT. Rank 0
/// receives every rank's buffer, combines them and sends the result back: simple and
/// deterministic, fine for CPU runs and small models; NCCL is the fast path on GPUs.
pub struct Tcp {
    rank: usize,
    world: usize,
    /// Rank 0: streams to ranks 1..world (index r-1). Others: one stream to rank 0.
    peers: Mutex<Vec<TcpStream>>,
}

const MAGIC: &[u8; 4] = b"CNDR";

fn io_err(what: &str, e: std::io::Error) -> Error {
    err(format!("{what}: {e}"))
}

impl Tcp {
    /// Rendezvous: rank 0 listens on `master_port` and waits (up to [`WAIT`]) for the other
    /// ranks, which connect (retrying while rank 0 starts) and say who they are.
    pub fn connect(env: &LaunchEnv) -> Result<Tcp> {
        let deadline = Instant::now() + WAIT;
        let (addr, port) = (env.master_addr.as_str(), env.master_port);
        if env.rank == 0 {
            let loopback = addr == "localhost" || addr.starts_with("127.");
            let bind = if loopback {
                format!("{addr}:{port}")
            } else {
                format!("0.0.0.0:{port}")
            };
            let listener = TcpListener::bind(&bind)
                .map_err(|e| io_err(&format!("rank 0 cannot listen on {bind} (MASTER_PORT)"), e))?;
            listener
                .set_nonblocking(true)
                .map_err(|e| io_err("listener", e))?;
            let mut peers: Vec<Option<TcpStream>> = (1..env.world_size).map(|_| None).collect();
            while peers.iter().any(Option::is_none) {
                match listener.accept() {
                    Ok((mut s, from)) => {
                        s.set_nonblocking(false).map_err(|e| io_err("socket", e))?;
                        s.set_read_timeout(Some(Duration::from_secs(30)))
                            .map_err(|e| io_err("socket", e))?;
                        let mut hello = [0u8; 12];
                        s.read_exact(&mut hello)
                            .map_err(|e| io_err(&format!("rank 0: hello from {from}"), e))?;
                        let r = u32::from_le_bytes(hello[4..8].try_into().unwrap()) as usize;
                        let w = u32::from_le_bytes(hello[8..12].try_into().unwrap()) as usize;
                        if &hello[..4] != MAGIC || w != env.world_size || r == 0 || r >= w {
                            return Err(err(format!(
                                "rank 0: {from} connected to MASTER_PORT {port} claiming rank {r} of {w} (this run has {} ranks)",
                                env.world_size
                            )));
                        }
                        if peers[r - 1].is_some() {
                            return Err(err(format!("rank 0: two processes claim rank {r}")));
                        }
                        s.set_read_timeout(None).map_err(|e| io_err("socket", e))?;
                        s.set_nodelay(true).map_err(|e| io_err("socket", e))?;
                        peers[r - 1] = Some(s);
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        if Instant::now() > deadline {
                            let missing: Vec<String> = peers
                                .iter()
                                .enumerate()
                                .filter(|(_, p)| p.is_none())
                                .map(|(i, _)| (i + 1).to_string())
                                .collect();
                            return Err(err(format!(
                                "rank 0: rank(s) {} did not connect to {bind} within {} s",
                                missing.join(", "),
                                WAIT.as_secs()
                            )));
                        }
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    Err(e) => return Err(io_err("rank 0: accept", e)),
                }
            }
            Ok(Tcp {
                rank: 0,
                world: env.world_size,
                peers: Mutex::new(peers.into_iter().map(Option::unwrap).collect()),
            })
        } else {
            let target = format!("{addr}:{port}");
            let stream = loop {
                let attempt = target
                    .to_socket_addrs()
                    .map_err(|e| io_err(&format!("rank {}: MASTER_ADDR {addr}", env.rank), e))?
                    .find_map(|a| TcpStream::connect_timeout(&a, Duration::from_secs(2)).ok());
                if let Some(s) = attempt {
                    break s;
                }
                if Instant::now() > deadline {
                    return Err(err(format!(
                        "rank {}: cannot reach rank 0 at {target} within {} s",
                        env.rank,
                        WAIT.as_secs()
                    )));
                }
                std::thread::sleep(Duration::from_millis(50));
            };
            stream.set_nodelay(true).map_err(|e| io_err("socket", e))?;
            let mut hello = MAGIC.to_vec();
            hello.extend((env.rank as u32).to_le_bytes());
            hello.extend((env.world_size as u32).to_le_bytes());
            (&stream)
                .write_all(&hello)
                .map_err(|e| io_err(&format!("rank {}: hello to rank 0", env.rank), e))?;
            Ok(Tcp {
                rank: env.rank,
                world: env.world_size,
                peers: Mutex::new(vec![stream]),
            })
        }
    }
}

fn send(s: &mut TcpStream, data: &[f64]) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(8 + 8 * data.len());
    buf.extend((data.len() as u64).to_le_bytes());
    for x in data {
        buf.extend(x.to_le_bytes());
    }
    s.write_all(&buf)
}

fn recv(s: &mut TcpStream) -> std::io::Result<Vec<f64>> {
    let mut len = [0u8; 8];
    s.read_exact(&mut len)?;
    let n = u64::from_le_bytes(len) as usize;
    let mut buf = vec![0u8; n * 8];
    s.read_exact(&mut buf)?;
    Ok(buf
        .chunks_exact(8)
        .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
        .collect())
}

impl Exchange for Tcp {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world
    }
    fn exchange(&self, data: Vec<f64>, op: Op) -> Result<Vec<f64>> {
        let mut peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        let lost = |r: usize, e: std::io::Error| {
            err(format!(
                "rank {}: lost rank {r} ({e}); it probably failed: see its error",
                self.rank
            ))
        };
        if self.rank == 0 {
            let mut parts = vec![data];
            for (i, s) in peers.iter_mut().enumerate() {
                parts.push(recv(s).map_err(|e| lost(i + 1, e))?);
            }
            let out = combine(&parts, op).map_err(Error::Msg)?;
            for (i, s) in peers.iter_mut().enumerate() {
                send(s, &out).map_err(|e| lost(i + 1, e))?;
            }
            Ok(out)
        } else {
            let s = &mut peers[0];
            send(s, &data).map_err(|e| lost(0, e))?;
            recv(s).map_err(|e| lost(0, e))
        }
    }
}

host_comm!(Tcp, "tcp");

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dist::connect;
    use candle_core::{DType, Device, Tensor};

    #[test]
    fn tcp_ranks_rendezvous_and_all_reduce_across_threads() {
        let port = free_port();
        let handles: Vec<_> = (0..3)
            .map(|rank| {
                std::thread::spawn(move || {
                    let env = LaunchEnv {
                        rank,
                        world_size: 3,
                        local_rank: rank,
                        master_addr: "127.0.0.1".into(),
                        master_port: port,
                    };
                    let d = connect(&env, &Device::Cpu, "auto").unwrap();
                    assert_eq!(d.backend(), "tcp");
                    let t = Tensor::new(&[[rank as f32, 1.0], [2.0, 3.0]], &Device::Cpu).unwrap();
                    let s = d.comm().all_reduce_sum(std::slice::from_ref(&t)).unwrap();
                    let b = d
                        .comm()
                        .broadcast(&[t.to_dtype(DType::BF16).unwrap()], 2)
                        .unwrap();
                    assert_eq!(b[0].dtype(), DType::BF16);
                    d.barrier().unwrap();
                    (
                        s[0].to_vec2::<f32>().unwrap(),
                        b[0].to_dtype(DType::F32).unwrap().to_vec2::<f32>().unwrap(),
                    )
                })
            })
            .collect();
        for h in handles {
            let (s, b) = h.join().unwrap();
            assert_eq!(s, vec![vec![3.0, 3.0], vec![6.0, 9.0]]);
            assert_eq!(b, vec![vec![2.0, 1.0], vec![2.0, 3.0]]);
        }
    }

    fn free_port() -> u16 {
        TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }
}
