//! The on-disk format of upper directories (pending changes of one slot).
//!
//! An upper directory mirrors the paths it changes, as real files with real
//! metadata on the store's file system, plus three markers:
//!
//! * **whiteout**: a 0/0 character device, as overlayfs writes it — the
//!   name is deleted from the layers below;
//! * **opaque directory**: xattr `trusted.lamina.opaque` — the directory
//!   hides the lower layers' entries of the same path;
//! * **metacopy placeholder**: a sparse regular file with xattr
//!   `trusted.lamina.origin` holding the lower content (size and extents)
//!   its data still comes from. Metadata changes (chmod, chown, utimes,
//!   xattrs) and renames of lower files copy only metadata up; the data is
//!   filled in on the first write.
//!
//! The upper root directory only carries the root's metadata once it has
//! xattr `trusted.lamina.meta` (it exists before anything is changed).
//! Names in `trusted.lamina.` are private: hidden from and refused to users
//! of the mount.

use std::fs::{self, Metadata};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::Path;

use lamina_sync::manifest::{Content, Meta};
use nix::sys::stat::{mknod, Mode, SFlag};
use serde::{Deserialize, Serialize};

/// Prefix of the private extended attributes.
pub(crate) const PRIVATE_PREFIX: &[u8] = b"trusted.lamina.";
/// Placeholder origin.
pub(crate) const ORIGIN: &str = "trusted.lamina.origin";
/// Opaque directory marker.
pub(crate) const OPAQUE: &str = "trusted.lamina.opaque";
/// The upper root carries the root directory's metadata.
pub(crate) const ROOT_META: &str = "trusted.lamina.meta";

/// Whether `name` is one of Lamina's own extended attributes.
pub(crate) fn is_private(name: &[u8]) -> bool {
    name.starts_with(PRIVATE_PREFIX)
}

/// Lower content a placeholder's data still comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Origin {
    /// File size.
    pub size: u64,
    /// Extents (inline) or a file index node.
    pub content: Content,
}

impl Origin {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut out = b"LO1".to_vec();
        // Serialising plain data into a Vec cannot fail.
        #[allow(clippy::expect_used)]
        let out = postcard::to_extend(self, std::mem::take(&mut out))
            .expect("postcard serialises into a Vec");
        out
    }

    pub(crate) fn decode(bytes: &[u8]) -> Option<Origin> {
        postcard::from_bytes(bytes.strip_prefix(b"LO1")?).ok()
    }

    /// A key naming this content, for the materialised-file cache.
    pub(crate) fn key(&self) -> String {
        blake3::hash(&self.encode()).to_hex().to_string()
    }
}

/// Reads a placeholder's origin; `None` for a plain file.
pub(crate) fn read_origin(path: &Path) -> io::Result<Option<Origin>> {
    match xattr::get(path, ORIGIN)? {
        None => Ok(None),
        Some(v) => Origin::decode(&v).map(Some).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                "unreadable placeholder origin (written by a newer Lamina?)",
            )
        }),
    }
}

/// Whether `m` (an `lstat`) is a whiteout.
pub(crate) fn is_whiteout(m: &Metadata) -> bool {
    m.file_type().is_char_device() && m.rdev() == 0
}

/// Creates a whiteout at `path`.
pub(crate) fn make_whiteout(path: &Path) -> nix::Result<()> {
    mknod(path, SFlag::S_IFCHR, Mode::empty(), 0)
}

/// Whether the directory at `path` is opaque.
pub(crate) fn is_opaque(path: &Path) -> bool {
    matches!(xattr::get(path, OPAQUE), Ok(Some(_)))
}

/// Marks the directory at `path` opaque.
pub(crate) fn set_opaque(path: &Path) -> io::Result<()> {
    xattr::set(path, OPAQUE, b"y")
}

/// What an entry in an upper directory is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum UpperKind {
    Whiteout,
    Dir { opaque: bool },
    Other,
}

/// Classifies an upper entry from its `lstat`.
pub(crate) fn classify(path: &Path, m: &Metadata) -> UpperKind {
    if is_whiteout(m) {
        UpperKind::Whiteout
    } else if m.is_dir() {
        UpperKind::Dir {
            opaque: is_opaque(path),
        }
    } else {
        UpperKind::Other
    }
}

/// Applies manifest metadata to a new upper entry: owner, mode (not for
/// symlinks), user-visible xattrs, mtime (atime too). Owner first, since a
/// chown clears set-id bits.
pub(crate) fn apply_meta(path: &Path, meta: &Meta, symlink: bool) -> io::Result<()> {
    std::os::unix::fs::lchown(path, Some(meta.uid), Some(meta.gid))?;
    if !symlink {
        fs::set_permissions(path, fs::Permissions::from_mode(meta.mode))?;
    }
    for x in &meta.xattrs {
        if is_private(&x.name) {
            continue;
        }
        xattr::set(path, std::ffi::OsStr::from_bytes(&x.name), &x.value)?;
    }
    let t = filetime::FileTime::from_unix_time(meta.mtime_sec, meta.mtime_nsec);
    filetime::set_symlink_file_times(path, t, t)
}

/// Removes `path` and everything below it, whatever it is; absent is fine.
pub(crate) fn remove_all(path: &Path) -> io::Result<()> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lamina_sync::manifest::Extent;
    use lamina_sync::ChunkId;

    #[test]
    fn origin_round_trip() {
        let o = Origin {
            size: 70_000,
            content: Content::Inline(vec![
                Extent::Data {
                    chunk: ChunkId([7; 32]),
                    len: 65_536,
                },
                Extent::Hole { len: 4_464 },
            ]),
        };
        let bytes = o.encode();
        assert_eq!(Origin::decode(&bytes), Some(o.clone()));
        assert_eq!(Origin::decode(b"junk"), None);
        assert_eq!(o.key().len(), 64);
    }
}
