//! What a composition's uppers were last committed as, while mounted.
//!
//! A commit of a mounted composition (a *live* commit, made by its daemon)
//! cannot empty the uppers: files in them are open. So the uppers stay, and
//! `STORE/compositions/<id>/committed.json` records per writable slot:
//!
//! * `view_base`: the version the mount shows under the upper (the head
//!   when it was mounted). A commit always turns exactly `view_base +
//!   upper` — what the user sees — into the new tree, so deletions and
//!   renames since the last commit are committed too.
//! * `last`: the version the last live commit made from the upper. The next
//!   commit descends from it; when the layer's head moved meanwhile (a sync
//!   merged another machine's changes) the commit is merged three ways with
//!   the head, `last` as the base.
//! * `entries`: a stamp (inode, size, times, mode) of every upper entry as
//!   committed, so an unchanged file is not read again, and so the next
//!   mount can drop from the upper what `last` already holds.
//!
//! An offline commit empties the uppers and removes the marker.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use lamina_sync::VersionId;
use serde::{Deserialize, Serialize};

use crate::compose::write_atomic;
use crate::error::{Error, Result};

const FILE: &str = "committed.json";

/// Identity and state of an upper entry: equal stamps mean unchanged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Stamp {
    ino: u64,
    size: u64,
    mtime_ns: i64,
    ctime_ns: i64,
    mode: u32,
}

impl Stamp {
    pub fn of(m: &fs::Metadata) -> Stamp {
        Stamp {
            ino: m.ino(),
            size: m.size(),
            mtime_ns: m.mtime() * 1_000_000_000 + m.mtime_nsec(),
            ctime_ns: m.ctime() * 1_000_000_000 + m.ctime_nsec(),
            mode: m.mode(),
        }
    }
}

/// One slot's record.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct SlotMark {
    pub view_base: Option<VersionId>,
    pub last: Option<VersionId>,
    /// Relative path (hex of its bytes) → stamp at the last commit.
    pub entries: BTreeMap<String, Stamp>,
}

impl SlotMark {
    /// Whether the entry at `rel` is as the last commit saw it.
    pub fn unchanged(&self, rel: &[u8], m: &fs::Metadata) -> bool {
        self.entries.get(&hex::encode(rel)) == Some(&Stamp::of(m))
    }
}

/// Every slot's record.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Marker {
    pub slots: BTreeMap<usize, SlotMark>,
}

fn path(comp_dir: &Path) -> PathBuf {
    comp_dir.join(FILE)
}

impl Marker {
    /// The marker of the composition in `comp_dir` (empty if none).
    pub fn load(comp_dir: &Path) -> Result<Marker> {
        let p = path(comp_dir);
        match fs::read(&p) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| Error::Upper {
                path: p,
                reason: format!("unreadable commit marker: {e}"),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Marker::default()),
            Err(e) => Err(Error::io(p, "read commit marker", e)),
        }
    }

    /// Writes the marker atomically.
    pub fn save(&self, comp_dir: &Path) -> Result<()> {
        // Plain data always serialises.
        #[allow(clippy::expect_used)]
        let bytes = serde_json::to_vec(self).expect("marker serialises");
        write_atomic(&path(comp_dir), &bytes)
    }

    /// Removes the marker.
    pub fn remove(comp_dir: &Path) -> Result<()> {
        match fs::remove_file(path(comp_dir)) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io(path(comp_dir), "remove commit marker", e)),
        }
    }
}
