//! The gc lock of a store on Ceph: a RADOS advisory lock on `lamina.gc`.
//!
//! Imports, pushes and uploads hold it shared from their first chunk to
//! their commit; gc holds it exclusive from its mark to its sweep, on any
//! server of the pool. A lock is taken for [`LEASE`] and renewed by a
//! thread every [`RENEW`], so a server that dies releases its hold when
//! the lease runs out.

use std::sync::mpsc::{channel, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::{Pool, RadosTarget, GC_OBJECT};
use crate::error::{Error, Result};

const LOCK_NAME: &str = "gc";
/// How long a hold lasts without renewal.
const LEASE: u32 = 60;
/// How often a hold is renewed.
const RENEW: Duration = Duration::from_secs(15);

/// A hold of the gc lock; released on drop.
pub(crate) struct GcLock {
    pool: Arc<Pool>,
    cookie: String,
    stop: Option<Sender<()>>,
    renewer: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for GcLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "GcLock({}/{GC_OBJECT}, {})",
            self.pool.name(),
            self.cookie
        )
    }
}

impl GcLock {
    /// Takes the lock, waiting up to `wait` while an incompatible holder
    /// has it.
    ///
    /// # Errors
    /// [`Error::Locked`]-like `InvalidInput` when it stays busy, cluster
    /// failures.
    pub(crate) fn acquire(
        pool: &Arc<Pool>,
        target: &RadosTarget,
        exclusive: bool,
        wait: Duration,
    ) -> Result<GcLock> {
        let cookie = hex::encode(rand::random::<[u8; 12]>());
        let deadline = Instant::now() + wait;
        loop {
            if pool
                .lock(GC_OBJECT, LOCK_NAME, &cookie, exclusive, LEASE, false)
                .map_err(target.err())?
            {
                break;
            }
            if Instant::now() >= deadline {
                return Err(Error::InvalidInput(format!(
                    "RADOS pool {}: {} (lock {GC_OBJECT}); try again later",
                    target.pool,
                    if exclusive {
                        "imports or another gc are running on a server of this pool"
                    } else {
                        "a gc is running on a server of this pool"
                    }
                )));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        let (stop, rx) = channel::<()>();
        let p = pool.clone();
        let c = cookie.clone();
        let renewer = std::thread::Builder::new()
            .name("lamina-gc-lease".into())
            .spawn(move || loop {
                match rx.recv_timeout(RENEW) {
                    Err(RecvTimeoutError::Timeout) => {
                        if let Err(e) = p.lock(GC_OBJECT, LOCK_NAME, &c, exclusive, LEASE, true) {
                            tracing::warn!(%e, "could not renew the gc lock");
                        }
                    }
                    _ => return,
                }
            })
            .map_err(|e| Error::io("lamina-gc-lease", "spawn thread", e))?;
        Ok(GcLock {
            pool: pool.clone(),
            cookie,
            stop: Some(stop),
            renewer: Some(renewer),
        })
    }
}

impl Drop for GcLock {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.renewer.take() {
            let _ = t.join();
        }
        if let Err(e) = self.pool.unlock(GC_OBJECT, LOCK_NAME, &self.cookie) {
            tracing::warn!(%e, "could not release the gc lock (it lapses by itself)");
        }
    }
}
