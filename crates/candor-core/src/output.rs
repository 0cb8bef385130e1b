//! Writing outputs safely: whole files atomically ([`AtomicFile`]), the output location
//! checked before any work ([`probe_output`]), one writer per output ([`lock_output`]).
//!
//! Every error names the path the user gave (`--out`), never a hidden temporary.

use std::collections::HashMap;
use std::fs;
use std::io::{self, BufWriter, Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::error::{Error, Result};

/// `.<name>.<tag>-<pid>` beside `path`: a temporary sibling on the same filesystem (so the
/// final rename is atomic), named after its writer (so a dead writer's leftovers can be
/// recognised and removed).
pub fn sibling(path: &Path, tag: &str) -> Result<PathBuf> {
    let name = path
        .file_name()
        .ok_or_else(|| Error::Checkpoint {
            path: path.to_path_buf(),
            msg: "the path has no file name".into(),
        })?
        .to_string_lossy()
        .to_string();
    let parent = path.parent().map(Path::to_path_buf).unwrap_or_default();
    Ok(parent.join(format!(".{name}.{tag}-{}", std::process::id())))
}

fn write_err(path: &Path, e: io::Error) -> Error {
    Error::Checkpoint {
        path: path.to_path_buf(),
        msg: format!("cannot write: {e}"),
    }
}

/// A file written into a temporary sibling and renamed over `path` by [`commit`]: readers
/// see the old file or the whole new one, never a part. Dropped without commit (an error,
/// a panic), the temporary is removed. Errors name `path`.
///
/// [`commit`]: AtomicFile::commit
pub struct AtomicFile {
    path: PathBuf,
    tmp: PathBuf,
    file: Option<BufWriter<fs::File>>,
}

impl AtomicFile {
    pub fn create(path: &Path) -> Result<Self> {
        let tmp = sibling(path, "tmp")?;
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            fs::create_dir_all(parent).map_err(|e| write_err(path, e))?;
        }
        let file = fs::File::create(&tmp).map_err(|e| write_err(path, e))?;
        Ok(AtomicFile {
            path: path.to_path_buf(),
            tmp,
            file: Some(BufWriter::new(file)),
        })
    }

    /// The final path (what errors name).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Flush, fsync, rename into place, fsync the directory.
    pub fn commit(mut self) -> Result<()> {
        let w = self.file.take().expect("committed once");
        let done = w
            .into_inner()
            .map_err(|e| e.into_error())
            .and_then(|file| file.sync_all())
            .and_then(|()| fs::rename(&self.tmp, &self.path));
        if let Err(e) = done {
            // the last buffered bytes, the fsync or the rename failed: nothing is kept
            let _ = fs::remove_file(&self.tmp);
            return Err(write_err(&self.path, e));
        }
        sync_parent(&self.path);
        Ok(())
    }
}

impl Write for AtomicFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.file.as_mut().expect("not committed").write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.file.as_mut().expect("not committed").flush()
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if self.file.take().is_some() {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

/// Write `bytes` to `path` atomically ([`AtomicFile`]).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = AtomicFile::create(path)?;
    f.write_all(bytes).map_err(|e| write_err(path, e))?;
    f.commit()
}

/// fsync the directory holding `path`, so a rename into it survives a power cut.
pub fn sync_parent(path: &Path) {
    if let Some(parent) = path.parent() {
        let parent = if parent.as_os_str().is_empty() {
            Path::new(".")
        } else {
            parent
        };
        if let Ok(d) = fs::File::open(parent) {
            let _ = d.sync_all();
        }
    }
}

/// Check, before any work, that an output can be made at `path` (a file or a checkpoint
/// directory): its parent directories are created and a file is created and removed there.
/// The error names `path` and says why (under a regular file, a read-only place, ...).
pub fn probe_output(path: &Path) -> Result<()> {
    let fail = |e: io::Error| Error::Checkpoint {
        path: path.to_path_buf(),
        msg: format!("cannot write an output here: {e}"),
    };
    if path.file_name().is_none() {
        return Err(Error::Checkpoint {
            path: path.to_path_buf(),
            msg: "an output needs a file or directory name".into(),
        });
    }
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        fs::create_dir_all(parent).map_err(fail)?;
    }
    let probe = sibling(path, "probe")?;
    fs::File::create(&probe).map_err(fail)?;
    fs::remove_file(&probe).map_err(fail)?;
    Ok(())
}

/// The permission bits a new file gets here: 0666 less the process umask (what
/// `File::create` gives), for files a library writes through a private temporary (0600).
pub fn default_file_mode() -> u32 {
    // Linux reports the umask without changing it; elsewhere assume the usual 022.
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Umask:"))
                .and_then(|v| u32::from_str_radix(v.trim(), 8).ok())
        })
        .map_or(0o644, |umask| 0o666 & !umask)
}

/// Give `path` the mode a newly created file would have ([`default_file_mode`]).
pub fn set_default_mode(path: &Path) -> Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(path, fs::Permissions::from_mode(default_file_mode()))
            .map_err(|e| write_err(path, e))?;
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

/// Locks this process holds, by output path: taking one twice is a no-op (a recipe's
/// stages, a stage and its checkpoint saves), and all are released together at the end.
static HELD: Mutex<Option<HashMap<PathBuf, Held>>> = Mutex::new(None);

struct Held {
    file: fs::File,
    lock_path: PathBuf,
}

/// `.<name>.lock` beside the output: not inside it, since a checkpoint directory is
/// replaced whole on every save.
fn lock_path(out: &Path) -> Result<PathBuf> {
    let name = out
        .file_name()
        .ok_or_else(|| Error::Checkpoint {
            path: out.to_path_buf(),
            msg: "an output needs a file or directory name".into(),
        })?
        .to_string_lossy()
        .to_string();
    let parent = out.parent().map(Path::to_path_buf).unwrap_or_default();
    Ok(parent.join(format!(".{name}.lock")))
}

/// The same path however it was spelled (`runs/x`, `./runs/x`, `/abs/runs/x`).
fn canonical_out(out: &Path) -> PathBuf {
    let abs = std::path::absolute(out).unwrap_or_else(|_| out.to_path_buf());
    match (abs.parent(), abs.file_name()) {
        (Some(p), Some(n)) => fs::canonicalize(p).unwrap_or(p.to_path_buf()).join(n),
        _ => abs,
    }
}

/// Take the advisory lock on an output (`--out`) for the rest of this process, or refuse at
/// once, naming the process that holds it. Two runs writing one output would replace each
/// other's checkpoints; the second one is told instead. The lock is an OS file lock on
/// `.<name>.lock` beside the output, so it dies with its process (kill -9 included); a
/// lock file left by a killed run is harmless and is reused.
pub fn lock_output(out: &Path) -> Result<()> {
    let key = canonical_out(out);
    let mut held = HELD.lock().unwrap_or_else(|e| e.into_inner());
    let held = held.get_or_insert_with(HashMap::new);
    if held.contains_key(&key) {
        return Ok(());
    }
    probe_output(out)?;
    let lock_path = lock_path(out)?;
    let fail = |e: io::Error| Error::Checkpoint {
        path: out.to_path_buf(),
        msg: format!("cannot lock the output ({}): {e}", lock_path.display()),
    };
    // A holder that releases removes the lock file; if that happened between our open and
    // our lock, we locked a file no one else can see: open again.
    for _ in 0..100 {
        let mut file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&lock_path)
            .map_err(fail)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                let mut pid = String::new();
                let _ = file.read_to_string(&mut pid);
                let pid = pid.trim();
                let holder = if pid.is_empty() {
                    "another process".to_string()
                } else {
                    format!("process {pid}")
                };
                return Err(Error::Checkpoint {
                    path: out.to_path_buf(),
                    msg: format!(
                        "is being written by {holder} (lock {}); wait for it to finish, or choose another --out",
                        lock_path.display()
                    ),
                });
            }
            Err(fs::TryLockError::Error(e)) => return Err(fail(e)),
        }
        if !same_file(&file, &lock_path) {
            continue;
        }
        file.set_len(0).map_err(fail)?;
        file.rewind().map_err(fail)?;
        write!(file, "{}", std::process::id()).map_err(fail)?;
        file.flush().map_err(fail)?;
        held.insert(key, Held { file, lock_path });
        return Ok(());
    }
    Err(fail(io::Error::other("the lock file keeps being replaced")))
}

fn same_file(file: &fs::File, path: &Path) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        match (file.metadata(), fs::metadata(path)) {
            (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
            _ => false,
        }
    }
    #[cfg(not(unix))]
    {
        let _ = (file, path);
        true
    }
}

/// Release every output lock this process holds and remove the lock files (call when the
/// command is done; a process that ends without it releases its locks all the same).
pub fn release_outputs() {
    let mut held = HELD.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(held) = held.take() {
        for (_, h) in held {
            // remove first, then unlock: a waiter that locked the removed file re-opens
            let _ = fs::remove_file(&h.lock_path);
            drop(h.file);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_file_replaces_whole_or_not_at_all() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("sub/out.jsonl");
        write_atomic(&path, b"one\n").unwrap();
        assert_eq!(fs::read_to_string(&path).unwrap(), "one\n");
        let mut f = AtomicFile::create(&path).unwrap();
        f.write_all(b"two\n").unwrap();
        drop(f); // abandoned
        assert_eq!(fs::read_to_string(&path).unwrap(), "one\n");
        assert_eq!(fs::read_dir(tmp.path().join("sub")).unwrap().count(), 1);
    }

    #[test]
    fn probe_names_the_output_under_a_file() {
        let tmp = tempfile::tempdir().unwrap();
        let afile = tmp.path().join("afile");
        fs::write(&afile, "x").unwrap();
        let out = afile.join("sub");
        let e = probe_output(&out).unwrap_err().to_string();
        assert!(e.starts_with(&out.display().to_string()), "{e}");
        assert!(!e.contains(".tmp-") && !e.contains(".probe-"), "{e}");
        let e = write_atomic(&out.join("x.jsonl"), b"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("afile/sub/x.jsonl: cannot write"), "{e}");
    }

    #[test]
    fn lock_is_reentrant_in_process_and_released() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("run");
        lock_output(&out).unwrap();
        lock_output(&tmp.path().join("./run")).unwrap();
        let lock = tmp.path().join(".run.lock");
        assert_eq!(
            fs::read_to_string(&lock).unwrap(),
            std::process::id().to_string()
        );
        // another open file description is another holder: it is refused
        let other = fs::OpenOptions::new().write(true).open(&lock).unwrap();
        assert!(matches!(
            other.try_lock(),
            Err(fs::TryLockError::WouldBlock)
        ));
        drop(other);
        release_outputs();
        assert!(!lock.exists());
    }

    #[test]
    fn default_mode_is_umask_applied() {
        let m = default_file_mode();
        assert_eq!(m & !0o666, 0);
        assert!(m & 0o600 == 0o600, "{m:o}");
    }
}
