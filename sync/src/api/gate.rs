//! The server's way into its store, and the one adapter from async handlers
//! to the synchronous store.
//!
//! A store has one writer process at a time, and the admin's own commands
//! (`lamina layer import`, `lamina user add`, …) must keep working while the
//! server runs. So the server keeps a long-lived *reader* (a catalog
//! secondary that takes no lock, caught up before each use) and opens the
//! *writer* only while requests need it: a [`WriteLease`] holds it, and the
//! reaper closes it once no lease has been held for [`WRITER_IDLE`], or at
//! once when another process waits for the lock (it announces itself on
//! `lock.wait`). Reads use the writer while it is open (it sees everything
//! at once) and the reader otherwise.
//!
//! Between the requests of a check-in, uploaded chunks are not yet named by
//! any version; a [`GcPin`] held until [`UPLOAD_PIN`] after the last upload
//! keeps `lamina gc` from sweeping them meanwhile.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use super::error::ApiError;
use crate::error::Result;
use crate::store::{writer_waiting, Access, GcPin, LockWait, OpenOptions, Store};

/// A writer nobody leases is closed after this long.
pub const WRITER_IDLE: Duration = Duration::from_millis(250);
/// Longest wait for the writer lock before a request gives up with 503.
pub const WRITER_WAIT: Duration = Duration::from_secs(120);
/// gc is kept out this long after the last upload.
pub const UPLOAD_PIN: Duration = Duration::from_secs(600);

#[derive(Default)]
struct WriterSlot {
    store: Option<Arc<Store>>,
    leases: usize,
    idle_since: Option<Instant>,
}

/// Access to the server's store (see the module doc).
pub struct Gate {
    root: PathBuf,
    reader: Mutex<Option<Arc<Store>>>,
    writer: Mutex<WriterSlot>,
    /// Serialises opening the writer: a second open in this process would
    /// wait for the lock the first holds.
    opening: Mutex<()>,
    pin: Mutex<Option<(GcPin, Instant)>>,
}

/// Holds the writer open; derefs to the store.
pub struct WriteLease {
    gate: Arc<Gate>,
    store: Arc<Store>,
}

impl std::ops::Deref for WriteLease {
    type Target = Store;
    fn deref(&self) -> &Store {
        &self.store
    }
}

impl Drop for WriteLease {
    fn drop(&mut self) {
        let mut slot = self.gate.slot();
        slot.leases = slot.leases.saturating_sub(1);
        if slot.leases == 0 {
            slot.idle_since = Some(Instant::now());
            if writer_waiting(&self.gate.root) {
                tracing::debug!("another process waits for the store: closing the writer");
                slot.store = None;
            }
        }
    }
}

impl Gate {
    /// Opens the reader of the store at `root` and starts the reaper.
    ///
    /// # Errors
    /// The store cannot be opened.
    pub fn open(root: &Path) -> Result<Arc<Gate>> {
        let reader = Store::open(root, &OpenOptions::new(Access::Serve))?;
        let gate = Arc::new(Gate {
            root: root.to_owned(),
            reader: Mutex::new(Some(Arc::new(reader))),
            writer: Mutex::new(WriterSlot::default()),
            opening: Mutex::new(()),
            pin: Mutex::new(None),
        });
        let weak = Arc::downgrade(&gate);
        std::thread::Builder::new()
            .name("lamina-gate".into())
            .spawn(move || reap(weak))
            .map_err(|e| crate::Error::io(root, "start the store reaper", e))?;
        Ok(gate)
    }

    /// The store directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn slot(&self) -> MutexGuard<'_, WriterSlot> {
        // The slot holds plain counters; a panic elsewhere leaves it usable.
        self.writer.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The store for reading, up to date with every committed change.
    ///
    /// # Errors
    /// Catalog failures.
    pub fn read(&self) -> Result<Arc<Store>> {
        if let Some(w) = self.slot().store.clone() {
            return Ok(w);
        }
        let reader = self
            .reader
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        match reader {
            Some(r) => {
                r.refresh()?;
                Ok(r)
            }
            None => Ok(Arc::new(Store::open(
                &self.root,
                &OpenOptions::new(Access::Serve),
            )?)),
        }
    }

    /// The writer, opened if needed (waiting up to [`WRITER_WAIT`] for the
    /// lock).
    ///
    /// # Errors
    /// [`crate::Error::Locked`] after the wait, open failures.
    pub fn write(self: &Arc<Self>) -> Result<WriteLease> {
        let lease = |slot: &mut WriterSlot| {
            slot.store.clone().map(|store| {
                slot.leases += 1;
                WriteLease {
                    gate: self.clone(),
                    store,
                }
            })
        };
        if let Some(l) = lease(&mut self.slot()) {
            return Ok(l);
        }
        let _opening = self.opening.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(l) = lease(&mut self.slot()) {
            return Ok(l);
        }
        if writer_waiting(&self.root) {
            // Let the waiting command take the lock first.
            std::thread::sleep(Duration::from_millis(120));
        }
        let opts = OpenOptions {
            access: Access::Write,
            wait: LockWait::Wait(Some(WRITER_WAIT)),
            notice: &|holder| tracing::info!(holder, "waiting for the store lock"),
            command: "lamina server".into(),
        };
        let opened = Arc::new(Store::open(&self.root, &opts)?);
        let mut slot = self.slot();
        slot.store = Some(opened.clone());
        slot.leases += 1;
        Ok(WriteLease {
            gate: self.clone(),
            store: opened,
        })
    }

    /// Keeps gc out until [`UPLOAD_PIN`] from now.
    ///
    /// # Errors
    /// Lock failures.
    pub fn pin_uploads(&self) -> Result<()> {
        let mut pin = self.pin.lock().unwrap_or_else(|p| p.into_inner());
        match pin.as_mut() {
            Some((_, until)) => *until = Instant::now() + UPLOAD_PIN,
            None => *pin = Some((self.read()?.gc_pin()?, Instant::now() + UPLOAD_PIN)),
        }
        Ok(())
    }

    /// Closes the writer and the reader (at shutdown).
    pub fn close(&self) {
        self.slot().store = None;
        *self.reader.lock().unwrap_or_else(|p| p.into_inner()) = None;
        *self.pin.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }
}

/// Closes the idle writer and expired pins until the gate is gone.
fn reap(gate: Weak<Gate>) {
    loop {
        std::thread::sleep(Duration::from_millis(100));
        let Some(g) = gate.upgrade() else { return };
        {
            let mut slot = g.slot();
            let idle = slot
                .idle_since
                .is_some_and(|t| t.elapsed() >= WRITER_IDLE || writer_waiting(&g.root));
            if slot.leases == 0 && slot.store.is_some() && idle {
                slot.store = None;
            }
        }
        let mut pin = g.pin.lock().unwrap_or_else(|p| p.into_inner());
        if pin
            .as_ref()
            .is_some_and(|(_, until)| Instant::now() >= *until)
        {
            *pin = None;
        }
    }
}

/// Runs blocking store work for a handler on tokio's blocking pool, inside
/// the request's tracing span.
///
/// # Errors
/// The work's own error, or 500 if it panicked.
pub async fn blocking<T, F>(f: F) -> std::result::Result<T, ApiError>
where
    T: Send + 'static,
    F: FnOnce() -> std::result::Result<T, ApiError> + Send + 'static,
{
    let span = tracing::Span::current();
    tokio::task::spawn_blocking(move || span.in_scope(f))
        .await
        .map_err(|e| ApiError::Internal(format!("request worker failed: {e}")))?
}
