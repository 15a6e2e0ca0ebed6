//! Materialised lower files: whole lower files written out as plain,
//! read-only files under `STORE/cache/files/`, named by a hash of their
//! content, so that later opens can hand the kernel a backing file (FUSE
//! passthrough) instead of going through the daemon. Shared by every
//! composition of the store.
//!
//! A file is materialised in the background after its first open (when it
//! is at least [`MATERIALIZE_MIN`] bytes; smaller ones are cheap to serve
//! from chunks and stay in the kernel's page cache). It is written to a
//! temporary name, synced, then renamed into place, so a present cache
//! file is always complete. `lamina` keeps at most [`CACHE_MAX`] bytes
//! (or `$LAMINA_FILE_CACHE_MAX`), dropping the least recently used files
//! when a mount starts.
//!
//! While a file is being written, readers of it through the daemon follow
//! the writer ([`FileCache::filling`]): a read of a range already written
//! comes from the temporary file (in the page cache, just written), a read
//! a little ahead waits for the writer, so one pass over the chunks serves
//! both the first reader and the cache.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File};
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use lamina_sync::Store;

use crate::lower::{FileData, Lower};

/// Smallest file worth materialising.
pub(crate) const MATERIALIZE_MIN: u64 = 256 * 1024;
/// Default size bound of the cache.
pub(crate) const CACHE_MAX: u64 = 20 << 30;

/// Chunks fetched per batch by the writer (about 4 MiB).
const FETCH_BATCH: usize = 64;
/// How far ahead of the writer a reader may be and still wait for it.
const FOLLOW_AHEAD: u64 = 32 << 20;
/// The longest a reader waits for the writer to move on.
const FOLLOW_WAIT: Duration = Duration::from_secs(2);

/// A file being materialised: how much of it is written.
pub(crate) struct Filling {
    file: File,
    size: u64,
    /// Everything below this offset is written; `None` once the writer
    /// failed.
    filled: Mutex<Option<u64>>,
    moved: Condvar,
}

impl Filling {
    fn advance(&self, to: Option<u64>) {
        *self.filled.lock().unwrap_or_else(|p| p.into_inner()) = to;
        self.moved.notify_all();
    }

    /// Bytes `[offset, offset + len)` once the writer has written them;
    /// `None` when it is too far behind (or failed): read the chunks then.
    pub fn read(&self, offset: u64, len: u32) -> Option<std::io::Result<Vec<u8>>> {
        let end = self.size.min(offset.saturating_add(u64::from(len)));
        if offset >= end {
            return Some(Ok(Vec::new()));
        }
        let mut filled = self.filled.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            let at = (*filled)?;
            if at >= end {
                break;
            }
            if end - at > FOLLOW_AHEAD {
                return None;
            }
            let (g, waited) = self
                .moved
                .wait_timeout(filled, FOLLOW_WAIT)
                .unwrap_or_else(|p| p.into_inner());
            filled = g;
            if waited.timed_out() && (*filled).is_none_or(|f| f < end) {
                return None;
            }
        }
        drop(filled);
        let mut buf = vec![0u8; (end - offset) as usize];
        Some(self.file.read_exact_at(&mut buf, offset).map(|()| buf))
    }
}

struct Job {
    key: String,
    data: Arc<FileData>,
}

/// The cache of materialised files.
pub(crate) struct FileCache {
    dir: PathBuf,
    tx: Mutex<Option<Sender<Job>>>,
    pending: Arc<Mutex<HashSet<String>>>,
    filling: Arc<Mutex<HashMap<String, Arc<Filling>>>>,
    worker: Mutex<Option<JoinHandle<()>>>,
}

impl FileCache {
    /// Opens the cache under `dir`, trimming it to its size bound, and
    /// starts its worker.
    pub fn open(
        dir: PathBuf,
        store: Arc<Store>,
        remotes: crate::lower::Remotes,
    ) -> std::io::Result<FileCache> {
        fs::create_dir_all(dir.join("tmp"))?;
        clean_tmp(&dir.join("tmp"));
        let max = std::env::var("LAMINA_FILE_CACHE_MAX")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(CACHE_MAX);
        trim(&dir, max);
        let (tx, rx) = channel::<Job>();
        let pending = Arc::new(Mutex::new(HashSet::new()));
        let filling = Arc::new(Mutex::new(HashMap::new()));
        let worker = {
            let dir = dir.clone();
            let pending = pending.clone();
            let filling = filling.clone();
            std::thread::Builder::new()
                .name("lamina-cache".into())
                .spawn(move || {
                    let lower = Lower::new(store, remotes);
                    for job in rx {
                        let dest = entry_path(&dir, &job.key);
                        if !dest.exists() {
                            let announce = |f: Arc<Filling>| {
                                lock(&filling).insert(job.key.clone(), f);
                            };
                            let done = materialize(&lower, &job.data, &dir, &dest, announce);
                            lock(&filling).remove(&job.key);
                            if let Err(e) = done {
                                tracing::warn!(key = %job.key, error = %e, "could not materialise a lower file");
                            }
                        }
                        pending
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .remove(&job.key);
                    }
                })?
        };
        Ok(FileCache {
            dir,
            tx: Mutex::new(Some(tx)),
            pending,
            filling,
            worker: Mutex::new(Some(worker)),
        })
    }

    /// The materialised file for content `key`, if present.
    pub fn get(&self, key: &str) -> Option<PathBuf> {
        let p = entry_path(&self.dir, key);
        p.exists().then_some(p)
    }

    /// Content `key` while it is being materialised.
    pub fn filling(&self, key: &str) -> Option<Arc<Filling>> {
        lock(&self.filling).get(key).cloned()
    }

    /// Asks for content `key` to be materialised (once).
    pub fn request(&self, key: &str, data: Arc<FileData>) {
        if data.size < MATERIALIZE_MIN {
            return;
        }
        if !self
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key.to_owned())
        {
            return;
        }
        if let Some(tx) = self.tx.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            let _ = tx.send(Job {
                key: key.to_owned(),
                data,
            });
        }
    }

    /// Stops the worker after the queued jobs.
    pub fn stop(&self) {
        self.tx.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(w) = self.worker.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = w.join();
        }
    }
}

fn entry_path(dir: &Path, key: &str) -> PathBuf {
    dir.join(&key[..2.min(key.len())]).join(key)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Writes `data` out to `dest` through a temporary file, which `announce`
/// is given (with its progress) for readers to follow.
fn materialize(
    lower: &Lower,
    data: &FileData,
    dir: &Path,
    dest: &Path,
    announce: impl FnOnce(Arc<Filling>),
) -> std::io::Result<()> {
    let tmp = dir.join("tmp").join(format!(
        "{}-{}",
        std::process::id(),
        hex::encode(rand::random::<[u8; 8]>())
    ));
    let mut progress: Option<Arc<Filling>> = None;
    let result = (|| {
        let f = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&tmp)?;
        f.set_len(data.size)?;
        let filling = Arc::new(Filling {
            file: f.try_clone()?,
            size: data.size,
            filled: Mutex::new(Some(0)),
            moved: Condvar::new(),
        });
        announce(filling.clone());
        let started = std::time::Instant::now();
        progress = Some(filling.clone());
        // Fetching and verifying chunks is the costly part: two threads
        // share each batch, then it is written in file order.
        let extents: Vec<_> = data.data_extents().collect();
        for batch in extents.chunks(FETCH_BATCH) {
            let (front, back) = batch.split_at(batch.len() / 2);
            let fetch = |part: &[(u64, lamina_sync::ChunkId, u32)]| {
                part.iter()
                    .map(|&(off, chunk, len)| lower.fetch(chunk, len).map(|b| (off, b)))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| std::io::Error::from_raw_os_error(e as i32))
            };
            let (a, b) = std::thread::scope(|s| {
                let other = s.spawn(|| fetch(back));
                let a = fetch(front);
                let b = other
                    .join()
                    .unwrap_or_else(|_| Err(std::io::Error::other("chunk fetch thread panicked")));
                (a, b)
            });
            for (off, bytes) in a?.into_iter().chain(b?) {
                f.write_all_at(&bytes, off)?;
                // Extents come in file order; holes before `off` read as
                // zeros.
                filling.advance(Some(off + bytes.len() as u64));
            }
        }
        filling.advance(Some(data.size));
        let written = started.elapsed();
        f.sync_all()?;
        tracing::debug!(bytes = data.size, ?written, synced = ?started.elapsed(), "materialised");
        f.set_permissions(fs::Permissions::from_mode(0o444))?;
        if let Some(parent) = dest.parent() {
            fs::create_dir_all(parent)?;
        }
        fs::rename(&tmp, dest)
    })();
    if result.is_err() {
        if let Some(p) = &progress {
            p.advance(None);
        }
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Removes temporaries of dead processes.
fn clean_tmp(tmp: &Path) {
    let Ok(rd) = fs::read_dir(tmp) else { return };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let pid = name.split('-').next().and_then(|p| p.parse::<u32>().ok());
        if pid.is_some_and(|p| !Path::new(&format!("/proc/{p}")).exists()) {
            let _ = fs::remove_file(e.path());
        }
    }
}

/// Drops least recently used files until the cache holds at most `max`
/// bytes.
fn trim(dir: &Path, max: u64) {
    let mut files = Vec::new();
    let Ok(rd) = fs::read_dir(dir) else { return };
    for sub in rd.flatten() {
        if sub.file_name() == "tmp" {
            continue;
        }
        let Ok(inner) = fs::read_dir(sub.path()) else {
            continue;
        };
        for f in inner.flatten() {
            if let Ok(m) = f.metadata() {
                files.push((m.atime().max(m.mtime()), m.blocks() * 512, f.path()));
            }
        }
    }
    let mut total: u64 = files.iter().map(|f| f.1).sum();
    if total <= max {
        return;
    }
    files.sort();
    for (_, size, path) in files {
        if total <= max {
            break;
        }
        if fs::remove_file(&path).is_ok() {
            total -= size;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filling(size: u64) -> (tempfile::TempDir, File, Arc<Filling>) {
        let dir = tempfile::tempdir().unwrap();
        let f = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(dir.path().join("f"))
            .unwrap();
        f.set_len(size).unwrap();
        let filling = Arc::new(Filling {
            file: f.try_clone().unwrap(),
            size,
            filled: Mutex::new(Some(0)),
            moved: Condvar::new(),
        });
        (dir, f, filling)
    }

    #[test]
    fn a_reader_follows_the_writer() {
        let (_dir, f, filling) = filling(1 << 20);
        let writer = {
            let filling = filling.clone();
            std::thread::spawn(move || {
                for i in 0..16u64 {
                    f.write_all_at(&[i as u8 + 1; 65536], i * 65536).unwrap();
                    filling.advance(Some((i + 1) * 65536));
                    std::thread::sleep(Duration::from_millis(5));
                }
            })
        };
        // Ahead of the writer: waits for it, then sees its bytes.
        let got = filling.read(15 * 65536, 65536).unwrap().unwrap();
        assert!(got.iter().all(|&b| b == 16));
        writer.join().unwrap();
        let got = filling.read(65536 - 2, 4).unwrap().unwrap();
        assert_eq!(got, [1, 1, 2, 2]);
        // Past the end: short.
        assert_eq!(filling.read((1 << 20) - 1, 10).unwrap().unwrap().len(), 1);
    }

    #[test]
    fn a_reader_far_ahead_or_after_a_failure_reads_chunks_itself() {
        let (_dir, _f, filling) = filling(1 << 30);
        assert!(filling.read(FOLLOW_AHEAD * 2, 4096).is_none());
        filling.advance(None);
        assert!(filling.read(0, 4096).is_none());
    }
}
