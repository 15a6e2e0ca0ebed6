//! Importing a directory tree.
//!
//! Two passes. The scan reads every directory and `lstat`s every entry
//! (never following a symlink), so the total size is known for progress and
//! hard links can be grouped before any data is read. The build then walks
//! the scanned tree depth-first in name order: file data goes through the
//! chunk pipeline (or comes from the import cache), and each directory node
//! is stored once its children are.

use std::collections::HashMap;
use std::fs::{self, File, Metadata};
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::unistd::{lseek, Whence};

use super::cache::{Cache, CacheEntry, Stamp};
use super::pipeline::{self, ChunkSink};
use super::{ImportStats, Job};
use crate::chunk::CdcChunker;
use crate::error::{Error, IoContext, Result};
use crate::id::ManifestId;
use crate::manifest::tree::check_name;
use crate::manifest::{
    split_leaves, Content, DirNode, Entry, EntryKind, Extent, ExtentLeaf, FileIndex, LeafRef, Meta,
    Node, Root, Xattr, INLINE_EXTENTS,
};
use crate::store::Store;

/// Deepest directory nesting accepted (PATH_MAX / 2: each level needs at
/// least one name byte and a slash).
const MAX_DEPTH: usize = 2048;

struct Scanned {
    name: Vec<u8>,
    meta: Meta,
    kind: ScanKind,
}

enum ScanKind {
    File {
        path: PathBuf,
        stamp: Stamp,
        dev: u64,
        nlink: u64,
        /// Allocated blocks cover the size: there can be no hole.
        dense: bool,
    },
    Dir(Vec<Scanned>, bool),
    Symlink(Vec<u8>),
    CharDevice(u64),
    BlockDevice(u64),
    Fifo,
    Socket,
    Whiteout,
}

/// The overlayfs xattr that marks a directory opaque; imported as the
/// manifest's opaque flag (and exported back as this xattr).
pub(crate) const OVERLAY_OPAQUE: &[u8] = b"trusted.overlay.opaque";

/// Metadata of `path` (whose `lstat` is `m`) as a manifest stores it:
/// permission bits, owner, mtime and sorted extended attributes.
///
/// # Errors
/// Unreadable extended attributes.
pub fn read_meta(path: &Path, m: &Metadata) -> Result<Meta> {
    let mut xattrs = Vec::new();
    match xattr::list(path) {
        Ok(names) => {
            for name in names {
                match xattr::get(path, &name) {
                    Ok(Some(value)) => xattrs.push(Xattr {
                        name: name.as_bytes().to_vec(),
                        value,
                    }),
                    // Removed between list and get.
                    Ok(None) => {}
                    Err(e) => return Err(Error::io(path, "read extended attribute", e)),
                }
            }
        }
        Err(e) if e.raw_os_error() == Some(libc::ENOTSUP) => {}
        Err(e) => return Err(Error::io(path, "list extended attributes", e)),
    }
    xattrs.sort();
    let mtime_nsec = u32::try_from(m.mtime_nsec()).unwrap_or(0).min(999_999_999);
    Ok(Meta {
        mode: m.mode() & 0o7777,
        uid: m.uid(),
        gid: m.gid(),
        mtime_sec: m.mtime(),
        mtime_nsec,
        xattrs,
    })
}

fn scan_dir(dir: &Path, depth: usize, stats: &mut ImportStats) -> Result<Vec<Scanned>> {
    if depth > MAX_DEPTH {
        return Err(Error::Unsupported {
            path: dir.to_owned(),
            reason: format!("directories nested deeper than {MAX_DEPTH} levels"),
        });
    }
    let mut entries = Vec::new();
    for entry in fs::read_dir(dir).ctx(dir, "read directory")? {
        let entry = entry.ctx(dir, "read directory")?;
        // `DirEntry::metadata` is an fstatat relative to the open directory
        // (no path walk) and does not follow symlinks.
        let m = entry.metadata().ctx(entry.path(), "stat")?;
        entries.push((entry.file_name(), m));
    }
    entries.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
    let mut out = Vec::with_capacity(entries.len());
    for (name, m) in entries {
        let path = dir.join(&name);
        check_name(name.as_bytes()).map_err(|reason| Error::Unsupported {
            path: path.clone(),
            reason,
        })?;
        let meta = read_meta(&path, &m)?;
        let ft = m.file_type();
        let mut meta = meta;
        let kind = if ft.is_dir() {
            stats.dirs += 1;
            // The overlayfs convention for an opaque directory.
            let opaque = match meta.xattrs.iter().position(|x| x.name == OVERLAY_OPAQUE) {
                Some(i) => meta.xattrs.remove(i).value == b"y",
                None => false,
            };
            ScanKind::Dir(scan_dir(&path, depth + 1, stats)?, opaque)
        } else if ft.is_file() {
            stats.files += 1;
            stats.bytes += m.len();
            ScanKind::File {
                path: path.clone(),
                stamp: Stamp::of(&m),
                dev: m.dev(),
                nlink: m.nlink(),
                dense: m.blocks().saturating_mul(512) >= m.len(),
            }
        } else {
            stats.others += 1;
            if ft.is_symlink() {
                let target = fs::read_link(&path).ctx(&path, "read symlink")?;
                ScanKind::Symlink(target.as_os_str().as_bytes().to_vec())
            } else if ft.is_char_device() && m.rdev() == 0 {
                // The overlayfs convention for a whiteout: a 0/0 character
                // device (what export writes for one).
                ScanKind::Whiteout
            } else if ft.is_char_device() {
                ScanKind::CharDevice(m.rdev())
            } else if ft.is_block_device() {
                ScanKind::BlockDevice(m.rdev())
            } else if ft.is_fifo() {
                ScanKind::Fifo
            } else {
                ScanKind::Socket
            }
        };
        out.push(Scanned {
            name: name.as_bytes().to_vec(),
            meta,
            kind,
        });
    }
    Ok(out)
}

/// Counts tree members of every multiply-linked inode.
fn count_links(dir: &[Scanned], counts: &mut HashMap<(u64, u64), u32>) {
    for s in dir {
        match &s.kind {
            ScanKind::File {
                stamp, dev, nlink, ..
            } if *nlink > 1 => *counts.entry((*dev, stamp.ino)).or_default() += 1,
            ScanKind::Dir(children, _) => count_links(children, counts),
            _ => {}
        }
    }
}

struct Builder<'a> {
    store: &'a Store,
    old_cache: &'a Cache,
    new_cache: Cache,
    link_counts: HashMap<(u64, u64), u32>,
    /// First member of each link group met so far: its path and content.
    link_groups: HashMap<(u64, u64), (Vec<u8>, u64, Content)>,
    stats_cached: u64,
    /// Chunker buffer, reused across files.
    buf: Vec<u8>,
}

impl Builder<'_> {
    fn build_dir(
        &mut self,
        dir: Vec<Scanned>,
        rel: &[u8],
        sink: &mut ChunkSink<'_>,
    ) -> Result<ManifestId> {
        let mut entries = Vec::with_capacity(dir.len());
        for s in dir {
            let mut child_rel = rel.to_vec();
            if !child_rel.is_empty() {
                child_rel.push(b'/');
            }
            child_rel.extend_from_slice(&s.name);
            let kind = match s.kind {
                ScanKind::Dir(children, opaque) => EntryKind::Dir {
                    node: self.build_dir(children, &child_rel, sink)?,
                    opaque,
                },
                ScanKind::File {
                    path,
                    stamp,
                    dev,
                    dense,
                    ..
                } => self.file(&path, stamp, dev, dense, child_rel, sink)?,
                ScanKind::Symlink(target) => EntryKind::Symlink { target },
                ScanKind::CharDevice(rdev) => EntryKind::CharDevice { rdev },
                ScanKind::BlockDevice(rdev) => EntryKind::BlockDevice { rdev },
                ScanKind::Fifo => EntryKind::Fifo,
                ScanKind::Socket => EntryKind::Socket,
                ScanKind::Whiteout => EntryKind::Whiteout,
            };
            entries.push(Entry {
                name: s.name,
                meta: s.meta,
                kind,
            });
        }
        self.store.put_node(&Node::Dir(DirNode { entries }))
    }

    fn file(
        &mut self,
        path: &Path,
        stamp: Stamp,
        dev: u64,
        dense: bool,
        rel: Vec<u8>,
        sink: &mut ChunkSink<'_>,
    ) -> Result<EntryKind> {
        let key = (dev, stamp.ino);
        let grouped = self.link_counts.get(&key).is_some_and(|&n| n > 1);
        if grouped {
            if let Some((first, size, content)) = self.link_groups.get(&key) {
                sink.skip(stamp.size);
                return Ok(EntryKind::File {
                    size: *size,
                    content: content.clone(),
                    link: Some(first.clone()),
                });
            }
        }
        let (size, content) = match self.old_cache.get(&rel) {
            Some(CacheEntry::File { stamp: s, content }) if *s == stamp => {
                sink.skip(stamp.size);
                self.stats_cached += stamp.size;
                (stamp.size, content.clone())
            }
            _ => {
                let buf = std::mem::take(&mut self.buf);
                let (size, content, buf) = read_file(self.store, path, dense, buf, sink)?;
                self.buf = buf;
                (size, content)
            }
        };
        self.new_cache.insert(
            rel.clone(),
            CacheEntry::File {
                stamp,
                content: content.clone(),
            },
        );
        let link = if grouped {
            self.link_groups
                .insert(key, (rel.clone(), size, content.clone()));
            Some(rel)
        } else {
            None
        };
        Ok(EntryKind::File {
            size,
            content,
            link,
        })
    }
}

/// Finds the next data region at or after `pos`: `Some((start, end))`, or
/// `None` when only a hole remains. File systems without SEEK_DATA report
/// the whole file as data.
pub(crate) fn next_data(
    file: &File,
    path: &Path,
    pos: u64,
    size: u64,
) -> Result<Option<(u64, u64)>> {
    if pos >= size {
        return Ok(None);
    }
    let off = i64::try_from(pos).unwrap_or(i64::MAX);
    let start = match lseek(file, off, Whence::SeekData) {
        Ok(s) => s as u64,
        Err(Errno::ENXIO) => return Ok(None),
        Err(Errno::EINVAL) => return Ok(Some((pos, size))),
        Err(e) => return Err(Error::io(path, "seek data", e.into())),
    };
    if start >= size {
        return Ok(None);
    }
    let end = match lseek(file, start as i64, Whence::SeekHole) {
        Ok(e) => (e as u64).min(size),
        Err(_) => size,
    };
    Ok(Some((start, end.max(start))))
}

/// Reads a file's data regions through the chunker; holes stay holes. A
/// `dense` file (allocated blocks cover its size) is read without probing
/// for holes. Returns the chunker buffer for reuse.
pub(super) fn read_file(
    store: &Store,
    path: &Path,
    dense: bool,
    mut buf: Vec<u8>,
    sink: &mut ChunkSink<'_>,
) -> Result<(u64, Content, Vec<u8>)> {
    let mut file = File::open(path).ctx(path, "open")?;
    let size = file.metadata().ctx(path, "stat")?.len();
    let mut extents = Vec::new();
    let mut pos = 0u64;
    let hole = |extents: &mut Vec<Extent>, len: u64| {
        if len > 0 {
            extents.push(Extent::Hole { len });
        }
    };
    loop {
        let region = if dense {
            (pos < size).then_some((pos, size))
        } else {
            next_data(&file, path, pos, size)?
        };
        let Some((start, end)) = region else { break };
        hole(&mut extents, start - pos);
        sink.skip(start - pos);
        if start != pos {
            file.seek(SeekFrom::Start(start)).ctx(path, "seek")?;
        }
        let mut chunker = CdcChunker::with_buffer((&file).take(end - start), buf);
        let mut got = 0u64;
        while let Some((_, chunk)) = chunker.next_chunk().ctx(path, "read")? {
            let id = sink.add(chunk)?;
            got += chunk.len() as u64;
            extents.push(Extent::Data {
                chunk: id,
                len: chunk.len() as u32,
            });
        }
        buf = chunker.into_buffer();
        sink.read(got);
        // A file that shrank while being read: the rest reads as zeros.
        hole(&mut extents, end - start - got);
        pos = end;
    }
    hole(&mut extents, size - pos);
    sink.skip(size - pos);
    Ok((size, make_content(store, extents)?, buf))
}

/// Packs a file's extents into inline content or an index of leaves.
pub(crate) fn make_content(store: &Store, extents: Vec<Extent>) -> Result<Content> {
    if extents.len() <= INLINE_EXTENTS {
        return Ok(Content::Inline(extents));
    }
    let runs = split_leaves(&extents);
    let mut leaves = Vec::with_capacity(runs.len());
    for run in runs {
        let leaf = ExtentLeaf {
            extents: run.to_vec(),
        };
        let len = leaf.len();
        leaves.push(LeafRef {
            node: store.put_node(&Node::Extents(leaf))?,
            len,
        });
    }
    Ok(Content::Indexed(
        store.put_node(&Node::FileIndex(FileIndex { leaves }))?,
    ))
}

/// Imports the directory `job.path`; returns the root node and the new cache.
pub(super) fn import_tree(job: &Job<'_>, stats: &mut ImportStats) -> Result<(Node, Cache)> {
    let (store, root, progress) = (job.store, job.path, job.progress);
    progress.phase("scan", None);
    let root_meta = fs::metadata(root).ctx(root, "stat")?;
    let meta = read_meta(root, &root_meta)?;
    let scanned = scan_dir(root, 0, stats)?;
    let mut link_counts = HashMap::new();
    count_links(&scanned, &mut link_counts);
    progress.phase("import", Some(stats.bytes));
    let mut builder = Builder {
        store,
        old_cache: job.old_cache,
        new_cache: Cache::new(),
        link_counts,
        link_groups: HashMap::new(),
        stats_cached: 0,
        buf: Vec::new(),
    };
    let dir = pipeline::run(
        store.backend(),
        job.threads,
        true,
        job.counters,
        progress,
        |sink| builder.build_dir(scanned, b"", sink),
    )?;
    stats.bytes_cached = builder.stats_cached;
    Ok((Node::Root(Root::Tree { meta, dir }), builder.new_cache))
}
