//! The chunk pipeline of an import.
//!
//! The walking thread reads, cuts and hashes data (cheap: FastCDC and BLAKE3
//! run at several GB/s) and asks the backend whether each chunk is known.
//! Only new chunks are copied and queued to the workers, which compress
//! (the expensive part) and store them. The queue is bounded, so memory stays
//! at about `QUEUE_DEPTH × FRAME_TARGET_BYTES` however large the import.
//!
//! For tree imports consecutive new chunks are queued together, up to
//! [`FRAME_TARGET_BYTES`], so a worker can compress them as one frame (see
//! the pack format); disk imports queue clusters one by one.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use crossbeam_channel::{bounded, Sender};

use crate::backend::pack::FRAME_MAX_MEMBERS;
use crate::backend::ChunkBackend;
use crate::chunk::{Sealed, Sealer};
use crate::error::{Error, Result};
use crate::id::ChunkId;
use crate::progress::Progress;

/// Chunks whose presence is asked of the backend in one `has_many`: one
/// round trip per this many chunks on a remote backend (RADOS), instead of
/// one per chunk.
const LOOKAHEAD: usize = 64;
/// Jobs queued to the workers at most.
const QUEUE_DEPTH: usize = 16;
/// Plain bytes of consecutive new chunks grouped into one frame: ~1 MiB of
/// context is where zstd's ratio on text-like data levels off.
pub(crate) const FRAME_TARGET_BYTES: usize = 1024 * 1024;
/// Ids of queued chunks remembered to skip repeats within one import. The set
/// is cleared when it reaches this size: a repeat then costs one more index
/// lookup (the backend dedups it), never a second copy.
const SENT_MEMORY: usize = 1 << 20;

/// Counters of an import's chunk traffic.
#[derive(Debug, Default)]
pub(crate) struct ChunkCounters {
    pub chunks: AtomicU64,
    pub bytes_read: AtomicU64,
    pub chunks_new: AtomicU64,
    pub bytes_new: AtomicU64,
    pub stored_new: AtomicU64,
}

/// Where the walking thread sends chunk data.
pub(crate) struct ChunkSink<'a> {
    backend: &'a dyn ChunkBackend,
    tx: Sender<Vec<(ChunkId, Vec<u8>)>>,
    sent: HashSet<ChunkId>,
    /// Consecutive new chunks waiting to be queued as one frame (`None`:
    /// no framing).
    frame: Option<Vec<(ChunkId, Vec<u8>)>>,
    frame_bytes: usize,
    /// Chunks added but not yet looked up (at most [`LOOKAHEAD`]).
    lookahead: Vec<(ChunkId, Vec<u8>)>,
    failure: &'a Mutex<Option<Error>>,
    counters: &'a ChunkCounters,
    progress: &'a dyn Progress,
}

impl ChunkSink<'_> {
    /// Registers one chunk of data and returns its id; queues it for storage
    /// if the store lacks it (looked up with the next chunks, in order).
    pub fn add(&mut self, data: &[u8]) -> Result<ChunkId> {
        let id = ChunkId::of(data);
        self.counters.chunks.fetch_add(1, Ordering::Relaxed);
        self.progress.advance(data.len() as u64);
        if self.sent.contains(&id) {
            return Ok(id);
        }
        self.lookahead.push((id, data.to_vec()));
        if self.lookahead.len() >= LOOKAHEAD {
            self.resolve()?;
        }
        Ok(id)
    }

    /// Looks the chunks in `lookahead` up and queues the new ones.
    fn resolve(&mut self) -> Result<()> {
        if self.lookahead.is_empty() {
            return Ok(());
        }
        let batch = std::mem::take(&mut self.lookahead);
        let ids: Vec<ChunkId> = batch.iter().map(|(id, _)| *id).collect();
        let have = self.backend.has_many(&ids)?;
        for ((id, data), have) in batch.into_iter().zip(have) {
            if have || self.sent.contains(&id) {
                continue;
            }
            self.queue_new(id, data)?;
        }
        Ok(())
    }

    fn queue_new(&mut self, id: ChunkId, data: Vec<u8>) -> Result<()> {
        if let Some(e) = take(self.failure) {
            return Err(e);
        }
        if self.sent.len() >= SENT_MEMORY {
            self.sent.clear();
        }
        self.sent.insert(id);
        self.counters.chunks_new.fetch_add(1, Ordering::Relaxed);
        self.counters
            .bytes_new
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        match self.frame.as_mut() {
            Some(frame) => {
                self.frame_bytes += data.len();
                frame.push((id, data));
                if self.frame_bytes >= FRAME_TARGET_BYTES || frame.len() >= FRAME_MAX_MEMBERS {
                    self.send_frame()?;
                }
            }
            None => self.send(vec![(id, data)])?,
        }
        Ok(())
    }

    fn send(&self, job: Vec<(ChunkId, Vec<u8>)>) -> Result<()> {
        self.tx.send(job).map_err(|_| {
            // Workers only stop early after recording a failure.
            take(self.failure)
                .unwrap_or_else(|| Error::InvalidInput("chunk workers stopped unexpectedly".into()))
        })
    }

    /// Queues the pending frame, if any.
    fn send_frame(&mut self) -> Result<()> {
        if let Some(frame) = self.frame.as_mut() {
            if !frame.is_empty() {
                let job = std::mem::take(frame);
                self.frame_bytes = 0;
                self.send(job)?;
            }
        }
        Ok(())
    }

    /// Notes bytes read from the source.
    pub fn read(&self, bytes: u64) {
        self.counters.bytes_read.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Notes bytes covered without reading them (cached or holes).
    pub fn skip(&self, bytes: u64) {
        self.progress.advance(bytes);
    }
}

fn take(failure: &Mutex<Option<Error>>) -> Option<Error> {
    failure.lock().unwrap_or_else(|p| p.into_inner()).take()
}

/// Runs `walk` with a [`ChunkSink`] backed by `threads` storing workers, and
/// returns its result once every queued chunk is stored (not yet flushed).
/// `framed` groups consecutive new chunks into frames.
pub(crate) fn run<T>(
    backend: &dyn ChunkBackend,
    threads: usize,
    framed: bool,
    counters: &ChunkCounters,
    progress: &dyn Progress,
    walk: impl FnOnce(&mut ChunkSink<'_>) -> Result<T>,
) -> Result<T> {
    let failure = Mutex::new(None);
    let (tx, rx) = bounded::<Vec<(ChunkId, Vec<u8>)>>(QUEUE_DEPTH);
    let result = std::thread::scope(|scope| {
        for _ in 0..threads.max(1) {
            let rx = rx.clone();
            let failure = &failure;
            scope.spawn(move || {
                let mut sealer = Sealer::new();
                for job in rx {
                    for sealed in sealer.seal_many(&job) {
                        let stored = match &sealed {
                            Sealed::Chunk(c) => c.data.len(),
                            Sealed::Frame(f) => f.data.len(),
                        } as u64;
                        match backend.put(sealed) {
                            Ok(0) => {}
                            Ok(_) => {
                                counters.stored_new.fetch_add(stored, Ordering::Relaxed);
                            }
                            Err(e) => {
                                failure
                                    .lock()
                                    .unwrap_or_else(|p| p.into_inner())
                                    .get_or_insert(e);
                                // Returning drops this receiver; the walker
                                // sees the failure on its next chunk.
                                return;
                            }
                        }
                    }
                }
            });
        }
        drop(rx);
        let mut sink = ChunkSink {
            backend,
            tx,
            sent: HashSet::new(),
            failure: &failure,
            counters,
            progress,
            frame: framed.then(Vec::new),
            frame_bytes: 0,
            lookahead: Vec::with_capacity(LOOKAHEAD),
        };
        let r = walk(&mut sink)
            .and_then(|v| sink.resolve().map(|()| v))
            .and_then(|v| sink.send_frame().map(|()| v));
        drop(sink);
        r
    });
    if let Some(e) = take(&failure) {
        return Err(e);
    }
    result
}
