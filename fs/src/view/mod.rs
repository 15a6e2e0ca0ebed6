//! The composed tree a mount shows, independent of FUSE.
//!
//! # Planes
//!
//! Each slot of the composition contributes two *planes*: its upper
//! directory (pending changes; absent for pinned slots) above its lower
//! version (from the store). Planes are numbered top-down: slot `s` of `n`
//! has its upper at `2(n-1-s)` and its lower just below. A name resolves to
//! the first plane that has it: a whiteout hides it, a non-directory is the
//! entry, a directory is merged with the same directory in the planes below
//! until one is opaque or a plane has a non-directory or whiteout there.
//!
//! A merged directory keeps its *stack* (the planes it is made of, top
//! first) and its *floor* (the lowest plane a new upper copy may take and
//! still be part of the merge).
//!
//! # Inodes
//!
//! Inode numbers are handed out as entries are first seen and kept for the
//! life of the mount (a directory's loaded listing holds them), so they are
//! stable; a lower hard-link group and the upper hard links of one file
//! each get one number. The whole state sits behind one mutex; file data
//! moves outside it (see `fuse`).

mod attr;
mod copyup;
mod merge;
mod ns;
mod rename;
mod setattr;

use attr::MetaSource;

pub(crate) use ns::Caller;
pub(crate) use setattr::SetAttr;

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File, Metadata};
use std::os::unix::fs::FileTypeExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{FileAttr, FileType};
use lamina_sync::manifest::{Entry, EntryKind, Meta, NAME_MAX};
use lamina_sync::ManifestId;
use nix::errno::Errno;

use crate::error::IoContext;
use crate::hostpath::HostPath;
use crate::lower::{FileData, Lower};
use crate::rules::Rules;
use crate::upper::{self, Origin};

/// The root directory's inode number.
pub(crate) const ROOT: u64 = 1;

/// Errno-valued result of a file system operation.
pub(crate) type OpResult<T> = Result<T, Errno>;

/// Maps an I/O error to the errno a FUSE reply carries, logging errors that
/// are not the caller's fault.
pub(crate) fn errno(e: &std::io::Error) -> Errno {
    match e.raw_os_error() {
        Some(n) => Errno::from_raw(n),
        None => {
            tracing::error!(error = %e, "I/O error without an errno");
            Errno::EIO
        }
    }
}

/// What kind of file an inode is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Dir,
    File,
    Symlink,
    Char,
    Block,
    Fifo,
    Socket,
}

impl Kind {
    pub fn of_std(ft: std::fs::FileType) -> Kind {
        if ft.is_dir() {
            Kind::Dir
        } else if ft.is_symlink() {
            Kind::Symlink
        } else if ft.is_char_device() {
            Kind::Char
        } else if ft.is_block_device() {
            Kind::Block
        } else if ft.is_fifo() {
            Kind::Fifo
        } else if ft.is_socket() {
            Kind::Socket
        } else {
            Kind::File
        }
    }

    fn of_entry(k: &EntryKind) -> Kind {
        match k {
            EntryKind::Dir { .. } => Kind::Dir,
            EntryKind::File { .. } => Kind::File,
            EntryKind::Symlink { .. } => Kind::Symlink,
            EntryKind::CharDevice { .. } => Kind::Char,
            EntryKind::BlockDevice { .. } => Kind::Block,
            EntryKind::Fifo => Kind::Fifo,
            // Whiteouts never become inodes.
            EntryKind::Socket | EntryKind::Whiteout => Kind::Socket,
        }
    }

    pub fn file_type(self) -> FileType {
        match self {
            Kind::Dir => FileType::Directory,
            Kind::File => FileType::RegularFile,
            Kind::Symlink => FileType::Symlink,
            Kind::Char => FileType::CharDevice,
            Kind::Block => FileType::BlockDevice,
            Kind::Fifo => FileType::NamedPipe,
            Kind::Socket => FileType::Socket,
        }
    }
}

/// One plane of a merged directory.
#[derive(Debug, Clone)]
pub(crate) enum Part {
    /// The directory at the same path in slot `0`'s upper.
    Upper(usize),
    /// A lower directory node of a slot, with the directory's own metadata.
    Lower {
        slot: usize,
        node: ManifestId,
        meta: Arc<Meta>,
    },
}

/// A merged directory.
#[derive(Debug, Clone)]
pub(crate) struct DirInfo {
    pub stack: Vec<Part>,
    pub floor: u32,
    pub children: Option<BTreeMap<Vec<u8>, u64>>,
    /// `st_nlink` as last counted; cleared when a subdirectory comes or
    /// goes, so creating files in a large directory stays cheap.
    pub nlink: Option<u32>,
}

/// Where an inode's content is.
#[derive(Debug, Clone)]
pub(crate) enum Src {
    Dir(Box<DirInfo>),
    /// A file in a slot's upper; `origin` when it is a metacopy placeholder.
    Upper {
        slot: usize,
        origin: Option<Arc<Origin>>,
    },
    /// An entry of a slot's lower version.
    Lower {
        slot: usize,
        entry: Arc<Entry>,
    },
}

/// How the kernel currently does I/O on an inode (see `fuse`): FUSE
/// passthrough to one backing file, or through the daemon.
#[derive(Default)]
pub(crate) enum Io {
    #[default]
    Idle,
    Cached(u32),
    Passthrough {
        backing: Arc<fuser::BackingId>,
        /// Device and inode number of the backing file.
        target: (u64, u64),
        count: u32,
    },
}

pub(crate) struct Inode {
    pub kind: Kind,
    pub parent: u64,
    pub name: Vec<u8>,
    /// Other names of a hard-linked file.
    pub aliases: Vec<(u64, Vec<u8>)>,
    pub src: Src,
    pub nlookup: u64,
    pub opens: u32,
    /// An open descriptor of the upper file while any handle is open, so
    /// an unlinked open file can still be stat'ed.
    pub open_fd: Option<Arc<File>>,
    pub unlinked: bool,
    pub io: Io,
    /// Extents of lower (or placeholder) data, loaded on first need.
    pub data: Option<Arc<FileData>>,
}

impl Inode {
    fn new(kind: Kind, parent: u64, name: Vec<u8>, src: Src) -> Inode {
        Inode {
            kind,
            parent,
            name,
            aliases: Vec::new(),
            src,
            nlookup: 0,
            opens: 0,
            open_fd: None,
            unlinked: false,
            io: Io::Idle,
            data: None,
        }
    }

    pub fn dir(&self) -> Option<&DirInfo> {
        match &self.src {
            Src::Dir(d) => Some(d),
            _ => None,
        }
    }

    fn dir_mut(&mut self) -> Option<&mut DirInfo> {
        match &mut self.src {
            Src::Dir(d) => Some(d),
            _ => None,
        }
    }

    /// Whether `(parent, name)` is one of the inode's names.
    fn has_name(&self, parent: u64, name: &[u8]) -> bool {
        (self.parent == parent && self.name == name)
            || self.aliases.iter().any(|(p, n)| *p == parent && n == name)
    }

    /// Drops one name; returns whether any is left.
    fn drop_name(&mut self, parent: u64, name: &[u8]) -> bool {
        if self.parent == parent && self.name == name {
            match self.aliases.pop() {
                Some((p, n)) => {
                    self.parent = p;
                    self.name = n;
                }
                None => return false,
            }
        } else {
            self.aliases.retain(|(p, n)| !(*p == parent && n == name));
        }
        true
    }
}

/// One slot as the mount sees it.
pub(crate) struct SlotView {
    /// Root metadata and directory node of the lower version shown
    /// (`None`: the layer has no version yet).
    pub root: Option<(Arc<Meta>, ManifestId)>,
    /// Upper directory; `None` for a pinned (read-only) slot.
    pub upper: Option<PathBuf>,
}

/// Fixed facts of a mount.
pub(crate) struct View {
    pub lower: Lower,
    pub slots: Vec<SlotView>,
    pub rules: Option<Rules>,
    /// Scratch directory on the uppers' file system.
    pub work: PathBuf,
    /// Shown for the root when no layer has one.
    pub default_meta: Arc<Meta>,
    state: Mutex<State>,
}

/// Everything that changes.
pub(crate) struct State {
    pub inodes: HashMap<u64, Inode>,
    next_ino: u64,
    /// Inode of each lower hard-link group: (slot, group key).
    groups: HashMap<(usize, Vec<u8>), u64>,
    /// Inode of each multiply-linked upper file, by its real inode number.
    upper_links: HashMap<u64, u64>,
    tmp_seq: u64,
}

/// An operation in progress: the view plus its locked state.
pub(crate) struct Ctx<'a> {
    pub v: &'a View,
    pub st: MutexGuard<'a, State>,
}

/// What one plane holds for a name (see [`Ctx::probe`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Probe {
    Whiteout,
    Dir { opaque: bool },
    Other,
}

/// Checks a name coming from the kernel.
pub(crate) fn check_name(name: &[u8]) -> OpResult<()> {
    if name.len() > NAME_MAX {
        return Err(Errno::ENAMETOOLONG);
    }
    if name.is_empty() || name == b"." || name == b".." || name.contains(&b'/') {
        return Err(Errno::EINVAL);
    }
    Ok(())
}

pub(crate) fn system_time(sec: i64, nsec: u32) -> SystemTime {
    if sec >= 0 {
        UNIX_EPOCH + Duration::new(sec as u64, nsec)
    } else {
        UNIX_EPOCH - Duration::from_secs(sec.unsigned_abs()) + Duration::from_nanos(u64::from(nsec))
    }
}

impl View {
    pub fn new(
        lower: Lower,
        slots: Vec<SlotView>,
        rules: Option<Rules>,
        work: PathBuf,
        default_meta: Meta,
    ) -> View {
        let v = View {
            lower,
            slots,
            rules,
            work,
            default_meta: Arc::new(default_meta),
            state: Mutex::new(State {
                inodes: HashMap::new(),
                next_ino: ROOT + 1,
                groups: HashMap::new(),
                upper_links: HashMap::new(),
                tmp_seq: 0,
            }),
        };
        v.mark_upper_roots();
        let root = Inode::new(
            Kind::Dir,
            0,
            Vec::new(),
            Src::Dir(Box::new(DirInfo {
                stack: v.root_stack(),
                floor: v.bottom(),
                children: None,
                nlink: None,
            })),
        );
        v.lock().st.inodes.insert(ROOT, root);
        v
    }

    /// Marks each upper root that holds entries but not the root's
    /// metadata (entries placed there from outside the mount) as carrying
    /// the metadata shown below it, so that the mount shows those entries
    /// as `lamina status` and commit see them: an upper root's entries
    /// always count, its metadata only once marked.
    fn mark_upper_roots(&self) {
        let mut below = self.default_meta.clone();
        for slot in &self.slots {
            if let Some((meta, _)) = &slot.root {
                below = meta.clone();
            }
            let Some(u) = &slot.upper else { continue };
            if matches!(xattr::get(u, upper::ROOT_META), Ok(Some(_))) {
                match fs::symlink_metadata(u)
                    .ctx(u, "stat")
                    .and_then(|m| crate::commit::upper_meta(u, &m))
                {
                    Ok(m) => below = Arc::new(m),
                    Err(e) => {
                        tracing::warn!(upper = %u.display(), error = %e, "cannot read an upper root's metadata")
                    }
                }
                continue;
            }
            let has_entries = fs::read_dir(u).is_ok_and(|mut d| d.next().is_some());
            if !has_entries {
                continue;
            }
            let marked = upper::apply_meta(u, &below, false)
                .and_then(|()| xattr::set(u, upper::ROOT_META, b"y"));
            match marked {
                Ok(()) => {
                    tracing::info!(upper = %u.display(), "upper root held entries without the root's metadata: marked")
                }
                Err(e) => {
                    tracing::warn!(upper = %u.display(), error = %e, "cannot mark an upper root; its entries stay hidden")
                }
            }
        }
    }

    fn root_stack(&self) -> Vec<Part> {
        let mut stack = Vec::new();
        for s in (0..self.slots.len()).rev() {
            let slot = &self.slots[s];
            if let Some(u) = &slot.upper {
                if matches!(xattr::get(u, upper::ROOT_META), Ok(Some(_))) {
                    stack.push(Part::Upper(s));
                }
            }
            if let Some((meta, node)) = &slot.root {
                stack.push(Part::Lower {
                    slot: s,
                    node: *node,
                    meta: meta.clone(),
                });
            }
        }
        stack
    }

    /// Locks the state for one operation.
    pub fn lock(&self) -> Ctx<'_> {
        Ctx {
            v: self,
            st: self.state.lock().unwrap_or_else(|p| p.into_inner()),
        }
    }

    /// Plane of slot `s`'s upper.
    pub fn up(&self, s: usize) -> u32 {
        2 * (self.slots.len() - 1 - s) as u32
    }

    /// The lowest plane.
    pub fn bottom(&self) -> u32 {
        (2 * self.slots.len()).saturating_sub(1) as u32
    }

    pub fn plane(&self, p: &Part) -> u32 {
        match p {
            Part::Upper(s) => self.up(*s),
            Part::Lower { slot, .. } => self.up(*slot) + 1,
        }
    }

    pub fn writable(&self, s: usize) -> bool {
        self.slots.get(s).is_some_and(|x| x.upper.is_some())
    }

    /// `slot`'s upper path of `rel` (relative, no leading `/`).
    pub fn upper_path(&self, slot: usize, rel: &[u8]) -> HostPath {
        match &self.slots[slot].upper {
            Some(base) => HostPath::join(base, rel),
            None => HostPath::plain(PathBuf::new()),
        }
    }

    /// The slot the rules send a write of `rel` to (`None`: read-only).
    pub fn route(&self, rel: &[u8]) -> Option<usize> {
        let rules = self.rules.as_ref()?;
        let mut abs = Vec::with_capacity(rel.len() + 1);
        abs.push(b'/');
        abs.extend_from_slice(rel);
        Some(rules.route(&abs))
    }
}

pub(crate) fn join(dir: &[u8], name: &[u8]) -> Vec<u8> {
    let mut p = Vec::with_capacity(dir.len() + name.len() + 1);
    p.extend_from_slice(dir);
    if !dir.is_empty() {
        p.push(b'/');
    }
    p.extend_from_slice(name);
    p
}

fn lstat(path: &std::path::Path) -> OpResult<Metadata> {
    fs::symlink_metadata(path).map_err(|e| errno(&e))
}

impl Ctx<'_> {
    pub fn inode(&self, ino: u64) -> OpResult<&Inode> {
        self.st.inodes.get(&ino).ok_or(Errno::ENOENT)
    }

    pub fn inode_mut(&mut self, ino: u64) -> OpResult<&mut Inode> {
        self.st.inodes.get_mut(&ino).ok_or(Errno::ENOENT)
    }

    fn dir_info(&self, ino: u64) -> OpResult<&DirInfo> {
        self.inode(ino)?.dir().ok_or(Errno::ENOTDIR)
    }

    fn alloc(&mut self, inode: Inode) -> u64 {
        let ino = self.st.next_ino;
        self.st.next_ino += 1;
        self.st.inodes.insert(ino, inode);
        ino
    }

    /// Path of an inode relative to the root (its primary name).
    pub fn path(&self, ino: u64) -> OpResult<Vec<u8>> {
        let mut parts = Vec::new();
        let mut cur = ino;
        while cur != ROOT {
            let i = self.inode(cur)?;
            if i.unlinked {
                return Err(Errno::ENOENT);
            }
            parts.push(i.name.as_slice());
            cur = i.parent;
            if parts.len() > 4096 {
                tracing::error!(ino, "inode parent chain does not reach the root");
                return Err(Errno::EIO);
            }
        }
        let mut out = Vec::new();
        for p in parts.iter().rev() {
            if !out.is_empty() {
                out.push(b'/');
            }
            out.extend_from_slice(p);
        }
        Ok(out)
    }

    /// A unique scratch path in the work directory.
    pub fn tmp_path(&mut self) -> PathBuf {
        self.st.tmp_seq += 1;
        self.v.work.join(format!("tmp-{}", self.st.tmp_seq))
    }

    /// Looks `name` up in `parent`; counts a kernel reference on success.
    pub fn lookup(&mut self, parent: u64, name: &[u8]) -> OpResult<(u64, FileAttr)> {
        check_name(name)?;
        let ino = self.child(parent, name)?.ok_or(Errno::ENOENT)?;
        let attr = self.attr(ino)?;
        self.inode_mut(ino)?.nlookup += 1;
        Ok((ino, attr))
    }

    /// The kernel dropped `n` references.
    pub fn forget(&mut self, ino: u64, n: u64) {
        let Some(i) = self.st.inodes.get_mut(&ino) else {
            return;
        };
        i.nlookup = i.nlookup.saturating_sub(n);
        if i.unlinked && i.nlookup == 0 && i.opens == 0 {
            self.st.inodes.remove(&ino);
        }
    }
}
