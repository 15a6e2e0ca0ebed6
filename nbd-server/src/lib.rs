//! `lamina-nbd`: Lamina's disk view.
//!
//! A **disk** is a base disk-layer version from the store under a writable
//! qcow2 overlay, with a **block map** recording every change since the
//! disk's last commit. This crate serves disks, layer versions and image
//! files over the NBD protocol, and implements the `lamina disk` lifecycle
//! (create, status, commit, reset, remove).
//!
//! # Parts
//!
//! * [`qcow`]: a focused qcow2 engine (read v2/v3 with backing chains and
//!   compressed clusters; write v3 with copy-on-write, zero clusters and
//!   crash repair).
//! * [`base::LayerImage`]: a disk layer version as a block device, with a
//!   verified local cluster cache.
//! * [`blockmap::BlockMap`]: the two-level changed-block map.
//! * [`export`]: what clients see: image files, layer versions, disks.
//! * [`disk`]: disk records in the store and their lifecycle.
//! * [`proto`], `session`, [`server`]: the NBD protocol on tokio.
//!
//! # Threads
//!
//! The server runs on a tokio runtime: accept loops, handshakes and
//! request/reply framing are async; every export operation (file and store
//! I/O) runs on tokio's blocking pool. Everything outside [`server`] is
//! synchronous.
//!
//! # Example
//!
//! ```no_run
//! use std::sync::Arc;
//! use lamina_nbd::server::{serve, FileExports, Listen};
//! # async fn run() -> lamina_nbd::Result<()> {
//! let exports = Arc::new(FileExports::open("disk.qcow2".as_ref(), "", true)?);
//! let listen = Listen { tcp: Some("127.0.0.1:10809".into()), unix: None };
//! serve(exports, &listen, None, |b| println!("{b:?}"), std::future::pending()).await
//! # }
//! ```

pub mod base;
pub mod blockmap;
pub mod commit;
pub mod control;
pub mod convert;
pub mod disk;
pub mod error;
pub mod export;
pub mod proto;
pub mod qcow;
pub mod rebase;
pub mod server;
pub mod session;
pub mod source;
pub mod stream;

pub use error::{Error, Result};
