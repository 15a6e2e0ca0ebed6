//! `lamina-fs`: the file view of Lamina — a layered FUSE file system over
//! the store's tree layers.
//!
//! A [composition](compose) stacks tree layers by kind (a golden `os` at
//! the bottom, `group` applications, `personal` applications, redirected
//! `system` data, user `data` on top) with [redirection rules](rules)
//! saying which layer receives a write to which path, and a mode:
//! `persistent` keeps a session's writes until they are committed,
//! `revert` drops them at unmount.
//!
//! # Flow
//!
//! [`mount()`] shows the composed tree at a directory. Reads walk the stack
//! top-down and stop at a whiteout or an opaque directory; lower file data
//! comes from the store's chunks, and lower files in use are materialised
//! in a local cache so the kernel can read them directly (FUSE
//! passthrough), as it does for upper files. Writes land in per-layer upper
//! directories inside the store (see [`upper`](crate) docs in the source):
//! files are copied up on first change (metadata only for chmod, chown,
//! utimes, xattrs and renames), deletions leave whiteouts. [`status()`]
//! lists pending changes per layer; [`commit()`] turns them into new layer
//! versions in one atomic catalog write; [`reset()`] drops them.
//!
//! # Threads
//!
//! The daemon serves FUSE requests on several threads; namespace and
//! metadata operations take one lock, file data moves outside it (or never
//! passes through the daemon at all with passthrough).

mod cache;
mod commit;
pub mod compose;
mod control;
mod error;
mod fuse;
mod hostpath;
mod lower;
mod marker;
mod mount;
pub mod rules;
mod status;
mod upper;
mod view;

pub use commit::{commit, commit_mounted, describe, CommitReport, CommittedLayer};
pub use compose::{Composition, CreateOptions, LayerArg, Mode, Slot};
pub use error::{Error, Result};
pub use mount::{mount, mounted, reset, umount, MountInfo, Mounted};
pub use status::{status, SlotChanges};
