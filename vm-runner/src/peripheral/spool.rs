//! The printer's adapter: a spool between the guest's parallel port and a
//! network print server (port 9100 style).
//!
//! The guest's device is read at all times, whether the server is up or
//! not, into a spool of at most [`SPOOL_MAX`] bytes, so QEMU never waits
//! and no job is lost while the server is down (beyond the spool's size,
//! bytes are dropped and counted). Whenever the spool holds bytes, the
//! adapter connects and sends them; when the guest has sent nothing more
//! for [`JOB_GAP`], the job is over and the connection is closed — raw
//! print servers take the end of a connection as the end of a job. A
//! connection lost mid-job is made again and the rest of the job sent.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::Notify;

use super::adapter::{Shared, Task};

/// The most a spool holds.
pub(super) const SPOOL_MAX: usize = 16 << 20;
/// How long the guest may be silent before its job counts as finished.
pub(super) const JOB_GAP: Duration = Duration::from_secs(2);
/// The most sent in one write.
const CHUNK: usize = 64 * 1024;

struct Spool {
    bytes: Mutex<VecDeque<u8>>,
    more: Notify,
}

impl Spool {
    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<u8>> {
        // A poisoned lock only means a panicking holder: the bytes stand.
        self.bytes.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes up to [`CHUNK`] bytes from the front.
    fn take(&self) -> Vec<u8> {
        let mut q = self.lock();
        let n = q.len().min(CHUNK);
        q.drain(..n).collect()
    }

    /// Puts bytes that could not be sent back at the front.
    fn put_back(&self, chunk: Vec<u8>) {
        let mut q = self.lock();
        for b in chunk.into_iter().rev() {
            q.push_front(b);
        }
    }

    /// Waits until the spool holds something, or `limit` passes (false).
    async fn wait(&self, limit: Option<Duration>) -> bool {
        loop {
            let more = self.more.notified();
            if !self.lock().is_empty() {
                return true;
            }
            match limit {
                Some(t) => {
                    if tokio::time::timeout(t, more).await.is_err() {
                        return !self.lock().is_empty();
                    }
                }
                None => more.await,
            }
        }
    }
}

/// Reads the guest's device into `spool` for as long as the VM runs.
async fn read_guest(path: PathBuf, spool: Arc<Spool>, shared: Arc<Shared>) {
    let mut buf = vec![0u8; CHUNK];
    loop {
        let Ok(mut g) = UnixStream::connect(&path).await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        loop {
            let n = match g.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let mut q = spool.lock();
            let room = SPOOL_MAX.saturating_sub(q.len()).min(n);
            q.extend(&buf[..room]);
            let queued = q.len() as u64;
            drop(q);
            let mut s = shared.lock();
            s.dropped += (n - room) as u64;
            s.queued = queued;
            drop(s);
            spool.more.notify_one();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

impl Task {
    /// The printer's link: see the module's comment.
    pub(super) async fn printer(self, host: String, port: u16) {
        let spool = Arc::new(Spool {
            bytes: Mutex::new(VecDeque::new()),
            more: Notify::new(),
        });
        let reader = tokio::spawn(read_guest(
            self.guest.clone(),
            spool.clone(),
            self.shared.clone(),
        ));
        // Dropped with this task (the link taken away): the reader goes too.
        struct AbortOnDrop(tokio::task::JoinHandle<()>);
        impl Drop for AbortOnDrop {
            fn drop(&mut self) {
                self.0.abort();
            }
        }
        let _reader = AbortOnDrop(reader);
        let mut backoff = Duration::from_secs(1);
        loop {
            self.shared.set("idle", None, None);
            spool.wait(None).await;
            self.shared.set("connecting", None, None);
            let mut net = match self.dial_within(&host, port).await {
                Ok(n) => n,
                Err(why) => {
                    self.retry(why, &mut backoff).await;
                    continue;
                }
            };
            backoff = Duration::from_secs(1);
            self.shared.lock().connections += 1;
            self.shared
                .set("connected", Some(self.endpoint.clone()), None);
            // One job: until the guest has been silent for JOB_GAP.
            let mut failed = None;
            while spool.wait(Some(JOB_GAP)).await {
                let chunk = spool.take();
                let n = chunk.len() as u64;
                if let Err(e) = async {
                    net.write_all(&chunk).await?;
                    net.flush().await
                }
                .await
                {
                    spool.put_back(chunk);
                    failed = Some(format!("{}: {e}", self.endpoint));
                    break;
                }
                self.shared.from_guest.fetch_add(n, Ordering::Relaxed);
                self.shared.lock().queued = spool.lock().len() as u64;
            }
            match failed {
                Some(why) => self.retry(why, &mut backoff).await,
                None => {
                    // The end of the job: the server sees the connection end.
                    let _ = net.shutdown().await;
                }
            }
        }
    }
}
