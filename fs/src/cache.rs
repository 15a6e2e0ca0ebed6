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

use std::collections::HashSet;
use std::fs::{self, File};
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use lamina_sync::Store;

use crate::lower::{FileData, Lower};

/// Smallest file worth materialising.
pub(crate) const MATERIALIZE_MIN: u64 = 256 * 1024;
/// Default size bound of the cache.
pub(crate) const CACHE_MAX: u64 = 20 << 30;

struct Job {
    key: String,
    data: Arc<FileData>,
}

/// The cache of materialised files.
pub(crate) struct FileCache {
    dir: PathBuf,
    tx: Mutex<Option<Sender<Job>>>,
    pending: Arc<Mutex<HashSet<String>>>,
    worker: Mutex<Option<JoinHandle<()>>>,
}

impl FileCache {
    /// Opens the cache under `dir`, trimming it to its size bound, and
    /// starts its worker.
    pub fn open(dir: PathBuf, store: Arc<Store>) -> std::io::Result<FileCache> {
        fs::create_dir_all(dir.join("tmp"))?;
        clean_tmp(&dir.join("tmp"));
        let max = std::env::var("LAMINA_FILE_CACHE_MAX")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(CACHE_MAX);
        trim(&dir, max);
        let (tx, rx) = channel::<Job>();
        let pending = Arc::new(Mutex::new(HashSet::new()));
        let worker = {
            let dir = dir.clone();
            let pending = pending.clone();
            std::thread::Builder::new()
                .name("lamina-cache".into())
                .spawn(move || {
                    let lower = Lower::new(store);
                    for job in rx {
                        let dest = entry_path(&dir, &job.key);
                        if !dest.exists() {
                            if let Err(e) = materialize(&lower, &job.data, &dir, &dest) {
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
            worker: Mutex::new(Some(worker)),
        })
    }

    /// The materialised file for content `key`, if present.
    pub fn get(&self, key: &str) -> Option<PathBuf> {
        let p = entry_path(&self.dir, key);
        p.exists().then_some(p)
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

fn materialize(lower: &Lower, data: &FileData, dir: &Path, dest: &Path) -> std::io::Result<()> {
    let tmp = dir.join("tmp").join(format!(
        "{}-{}",
        std::process::id(),
        hex::encode(rand::random::<[u8; 8]>())
    ));
    let result = (|| {
        let f = File::create(&tmp)?;
        f.set_len(data.size)?;
        for (off, chunk, len) in data.data_extents() {
            let bytes = lower
                .chunk(chunk, len)
                .map_err(|e| std::io::Error::from_raw_os_error(e as i32))?;
            f.write_all_at(&bytes, off)?;
        }
        f.sync_all()?;
        f.set_permissions(fs::Permissions::from_mode(0o444))?;
        if let Some(parent) = dest.parent() {
            fs::create_dir_all(parent)?;
        }
        fs::rename(&tmp, dest)
    })();
    if result.is_err() {
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
