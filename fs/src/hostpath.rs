//! Host paths that may be longer than the kernel takes in one call.
//!
//! An upper directory mirrors the paths of the mount below its root, so a
//! path the mount accepts (up to `PATH_MAX` from a directory inside it)
//! can be longer than `PATH_MAX` once it is joined to the upper root, and
//! every host call would fail with `ENAMETOOLONG`. A [`HostPath`] whose
//! text would be too long holds an open descriptor of its parent directory
//! instead, reached by `openat` a few components at a time, and names the
//! entry as `/proc/self/fd/N/NAME`. The kernel resolves `NAME` relative to
//! that descriptor, as the `*at` calls do, and the name works with every
//! call that takes a path — including the extended-attribute calls, which
//! have no `*at` form on the kernels Lamina supports. Paths short enough
//! stay plain absolute paths, so the common case costs nothing extra.

use std::ffi::OsStr;
use std::io;
use std::ops::Deref;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use nix::fcntl::{openat, OFlag, AT_FDCWD};
use nix::sys::stat::Mode;

/// Longest host path used as text; longer ones go through a directory
/// descriptor. Below `PATH_MAX` (4096) with room for a name (255) and the
/// `/proc/self/fd/N/` prefix.
const DIRECT_MAX: usize = 3072;

/// A path on the host, possibly relative to an open directory (see the
/// module docs). Derefs to a [`Path`] usable with any path-taking call for
/// as long as the `HostPath` lives.
#[derive(Debug, Clone)]
pub(crate) struct HostPath {
    path: PathBuf,
    /// Holds the directory `path` is relative to open.
    _dir: Option<Arc<OwnedFd>>,
}

impl HostPath {
    /// `base` joined with the relative byte path `rel` (no leading `/`).
    pub fn join(base: &Path, rel: &[u8]) -> HostPath {
        if rel.is_empty() {
            return HostPath::plain(base.to_owned());
        }
        if base.as_os_str().len() + 1 + rel.len() <= DIRECT_MAX {
            return HostPath::plain(base.join(OsStr::from_bytes(rel)));
        }
        match Self::via_dir(base, rel) {
            Ok(p) => p,
            // A parent that cannot be opened (absent, not a directory, no
            // permission): the plain path makes the caller's own call fail
            // with the errno it would have had, or ENAMETOOLONG.
            Err(e) => {
                tracing::debug!(error = %e, "long host path: parent not opened");
                HostPath::plain(base.join(OsStr::from_bytes(rel)))
            }
        }
    }

    /// A path used as it is.
    pub fn plain(path: PathBuf) -> HostPath {
        HostPath { path, _dir: None }
    }

    /// Opens `rel`'s parent below `base` in steps shorter than `DIRECT_MAX`.
    fn via_dir(base: &Path, rel: &[u8]) -> io::Result<HostPath> {
        let (parent, name) = match rel.iter().rposition(|&b| b == b'/') {
            Some(i) => (&rel[..i], &rel[i + 1..]),
            None => (&b""[..], rel),
        };
        let flags = OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC;
        let mut dir = openat(AT_FDCWD, base, flags, Mode::empty())?;
        let mut rest = parent;
        while !rest.is_empty() {
            let (step, more) = split_step(rest);
            match openat(&dir, OsStr::from_bytes(step), flags, Mode::empty()) {
                Ok(d) => dir = d,
                // Missing or not a directory: the caller's call on what is
                // left meets the same error, as it would on the full path.
                Err(_) if rest.len() + 1 + name.len() <= DIRECT_MAX => break,
                Err(e) => return Err(e.into()),
            }
            rest = more;
        }
        let mut path = PathBuf::from(format!("/proc/self/fd/{}", dir.as_raw_fd()));
        if !rest.is_empty() {
            path.push(OsStr::from_bytes(rest));
        }
        if !name.is_empty() {
            path.push(OsStr::from_bytes(name));
        }
        Ok(HostPath {
            path,
            _dir: Some(Arc::new(dir)),
        })
    }

    /// A directory's entry `name` (for walks down a tree).
    pub fn child(&self, name: &[u8]) -> HostPath {
        if self.path.as_os_str().len() + 1 + name.len() <= DIRECT_MAX {
            return HostPath {
                path: self.path.join(OsStr::from_bytes(name)),
                _dir: self._dir.clone(),
            };
        }
        // Too long: continue from a descriptor of this directory, whose
        // own path is short enough to open.
        let flags = OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC;
        match openat(AT_FDCWD, &self.path, flags, Mode::empty()) {
            Ok(dir) => HostPath {
                path: Path::new(&format!("/proc/self/fd/{}", dir.as_raw_fd()))
                    .join(OsStr::from_bytes(name)),
                _dir: Some(Arc::new(dir)),
            },
            Err(e) => {
                tracing::debug!(error = %e, "long host path: directory not opened");
                HostPath::plain(self.path.join(OsStr::from_bytes(name)))
            }
        }
    }
}

/// The first piece of `rel` no longer than `DIRECT_MAX`, cut at a `/`, and
/// what follows it.
fn split_step(rel: &[u8]) -> (&[u8], &[u8]) {
    if rel.len() <= DIRECT_MAX {
        return (rel, b"");
    }
    match rel[..=DIRECT_MAX].iter().rposition(|&b| b == b'/') {
        Some(i) if i > 0 => (&rel[..i], &rel[i + 1..]),
        // No separator early enough: one component is at most NAME_MAX,
        // so this cannot happen for a path the mount accepted; let the
        // kernel say so.
        _ => (rel, b""),
    }
}

impl Deref for HostPath {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.path
    }
}

impl AsRef<Path> for HostPath {
    fn as_ref(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_paths_resolve_through_a_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let base = tmp.path();
        let comp = "d".repeat(200);
        let mut rel = Vec::new();
        for _ in 0..30 {
            if !rel.is_empty() {
                rel.push(b'/');
            }
            rel.extend_from_slice(comp.as_bytes());
        }
        // 30 × 201 bytes: past PATH_MAX once joined to the base.
        std::fs::create_dir_all(base.join(OsStr::from_bytes(&rel))).unwrap_or_else(|_| {
            // create_dir_all itself hits ENAMETOOLONG: build it step by step.
            let mut cur = HostPath::plain(base.to_owned());
            for _ in 0..30 {
                cur = cur.child(comp.as_bytes());
                std::fs::create_dir(&*cur).unwrap();
            }
        });
        let mut file = rel.clone();
        file.extend_from_slice(b"/f");
        let p = HostPath::join(base, &file);
        assert!(p.as_os_str().len() < 100, "{}", p.display());
        std::fs::write(&*p, b"x").unwrap();
        assert_eq!(std::fs::read(&*HostPath::join(base, &file)).unwrap(), b"x");
        let short = HostPath::join(base, b"a/b");
        assert_eq!(&*short, base.join("a/b"));
    }

    #[test]
    fn steps_cut_at_separators() {
        let rel = [b"x".repeat(3000), b"y".repeat(3000)].join(&b'/');
        let (a, b) = split_step(&rel);
        assert_eq!(a.len(), 3000);
        assert_eq!(b.len(), 3000);
    }
}
