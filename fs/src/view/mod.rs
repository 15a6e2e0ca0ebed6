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

mod copyup;
mod ns;
mod rename;
mod setattr;

pub(crate) use ns::Caller;
pub(crate) use setattr::SetAttr;

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsStr;
use std::fs::{self, File, Metadata};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{FileAttr, FileType, INodeNo};
use lamina_sync::manifest::{Content, Entry, EntryKind, Meta, NAME_MAX};
use lamina_sync::ManifestId;
use nix::errno::Errno;

use crate::lower::{FileData, Lower};
use crate::rules::Rules;
use crate::upper::{self, Origin, UpperKind};

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
        target: PathBuf,
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
    pub fn upper_path(&self, slot: usize, rel: &[u8]) -> PathBuf {
        let base = self.slots[slot].upper.clone().unwrap_or_default();
        if rel.is_empty() {
            base
        } else {
            base.join(OsStr::from_bytes(rel))
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

    /// What each plane of directory `dir` holds for `name`, top-down.
    pub fn probe(&self, dir: u64, name: &[u8]) -> OpResult<Vec<(u32, Probe)>> {
        let info = self.dir_info(dir)?;
        let path = self.path(dir)?;
        let mut out = Vec::new();
        for part in &info.stack {
            let found = match part {
                Part::Upper(s) => {
                    let p = self.v.upper_path(*s, &join(&path, name));
                    match fs::symlink_metadata(&p) {
                        Ok(m) => Some(match upper::classify(&p, &m) {
                            UpperKind::Whiteout => Probe::Whiteout,
                            UpperKind::Dir { opaque } => Probe::Dir { opaque },
                            UpperKind::Other => Probe::Other,
                        }),
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                        Err(e) => return Err(errno(&e)),
                    }
                }
                Part::Lower { node, .. } => {
                    let d = self.v.lower.dir(*node)?;
                    d.get(name).map(|e| match &e.kind {
                        EntryKind::Whiteout => Probe::Whiteout,
                        EntryKind::Dir { opaque, .. } => Probe::Dir { opaque: *opaque },
                        _ => Probe::Other,
                    })
                }
            };
            if let Some(f) = found {
                out.push((self.v.plane(part), f));
            }
        }
        Ok(out)
    }

    /// Whether something in a plane below `plane` of directory `dir` would
    /// show `name` if nothing at or above `plane` hid it.
    pub fn shows_below(&self, dir: u64, name: &[u8], plane: u32) -> OpResult<bool> {
        Ok(self
            .probe(dir, name)?
            .into_iter()
            .find(|(p, _)| *p > plane)
            .is_some_and(|(_, f)| f != Probe::Whiteout))
    }

    /// The merged listing of directory `ino`, loading it on first use.
    pub fn children(&mut self, ino: u64) -> OpResult<&BTreeMap<Vec<u8>, u64>> {
        if self.dir_info(ino)?.children.is_none() {
            self.load_dir(ino)?;
        }
        self.dir_info(ino)?.children.as_ref().ok_or(Errno::EIO)
    }

    /// The child `name` of directory `parent`, if visible.
    pub fn child(&mut self, parent: u64, name: &[u8]) -> OpResult<Option<u64>> {
        Ok(self.children(parent)?.get(name).copied())
    }

    /// (Re)builds the listing of directory `ino` from its planes, keeping
    /// the inode numbers of names it already had.
    pub fn load_dir(&mut self, ino: u64) -> OpResult<()> {
        let info = self.dir_info(ino)?.clone();
        let path = self.path(ino)?;
        // Per name, what each plane holds, top-down.
        let mut found: BTreeMap<Vec<u8>, Vec<(u32, Found)>> = BTreeMap::new();
        for part in &info.stack {
            let plane = self.v.plane(part);
            match part {
                Part::Upper(s) => {
                    let dir = self.v.upper_path(*s, &path);
                    let rd = fs::read_dir(&dir).map_err(|e| {
                        tracing::error!(dir = %dir.display(), error = %e, "cannot list an upper directory");
                        errno(&e)
                    })?;
                    for e in rd {
                        let e = e.map_err(|e| errno(&e))?;
                        let ft = e.file_type().map_err(|e| errno(&e))?;
                        let f = upper_found(*s, &e.path(), ft)?;
                        found
                            .entry(e.file_name().as_bytes().to_vec())
                            .or_default()
                            .push((plane, f));
                    }
                }
                Part::Lower { slot, node, .. } => {
                    let d = self.v.lower.dir(*node)?;
                    for e in &d.entries {
                        found
                            .entry(e.name.clone())
                            .or_default()
                            .push((plane, lower_found(*slot, e)));
                    }
                }
            }
        }
        let old = info.children.unwrap_or_default();
        let mut children = BTreeMap::new();
        for (name, planes) in found {
            let Some((kind, src)) = self.decide(&path, &name, &planes, info.floor) else {
                continue;
            };
            let child = self.attach(ino, &name, kind, src, old.get(&name).copied())?;
            children.insert(name, child);
        }
        if let Some(d) = self.inode_mut(ino)?.dir_mut() {
            d.children = Some(children);
            d.nlink = None;
        }
        Ok(())
    }

    /// What each plane of directory `dir` holds for `name`, top-down.
    fn found_for(&self, dir: u64, name: &[u8]) -> OpResult<Vec<(u32, Found)>> {
        let info = self.dir_info(dir)?;
        let path = join(&self.path(dir)?, name);
        let mut out = Vec::new();
        for part in &info.stack {
            let plane = self.v.plane(part);
            match part {
                Part::Upper(s) => {
                    let p = self.v.upper_path(*s, &path);
                    match fs::symlink_metadata(&p) {
                        Ok(m) => out.push((plane, upper_found(*s, &p, m.file_type())?)),
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                        Err(e) => return Err(errno(&e)),
                    }
                }
                Part::Lower { slot, node, .. } => {
                    if let Some(e) = self.v.lower.dir(*node)?.get(name) {
                        out.push((plane, lower_found(*slot, e)));
                    }
                }
            }
        }
        Ok(out)
    }

    /// How a name shows, given what its planes hold (top-down) in a
    /// directory at `dir_path` whose floor is `floor`; `None` when hidden.
    fn decide(
        &self,
        dir_path: &[u8],
        name: &[u8],
        planes: &[(u32, Found)],
        floor: u32,
    ) -> Option<(Kind, Src)> {
        let (_, first) = planes.first()?;
        Some(match first {
            Found::Whiteout => return None,
            Found::Upper(slot, kind) => {
                let origin = if *kind == Kind::File {
                    let p = self.v.upper_path(*slot, &join(dir_path, name));
                    match upper::read_origin(&p) {
                        Ok(o) => o.map(Arc::new),
                        Err(e) => {
                            tracing::error!(path = %p.display(), error = %e, "unreadable placeholder");
                            None
                        }
                    }
                } else {
                    None
                };
                (
                    *kind,
                    Src::Upper {
                        slot: *slot,
                        origin,
                    },
                )
            }
            Found::Lower(slot, entry) => (
                Kind::of_entry(&entry.kind),
                Src::Lower {
                    slot: *slot,
                    entry: entry.clone(),
                },
            ),
            Found::UpperDir(..) | Found::LowerDir { .. } => {
                let mut stack = Vec::new();
                let mut floor = floor;
                for (plane, f) in planes {
                    let (part, opaque) = match f {
                        Found::UpperDir(s, opaque) => (Part::Upper(*s), *opaque),
                        Found::LowerDir {
                            slot,
                            node,
                            opaque,
                            meta,
                        } => (
                            Part::Lower {
                                slot: *slot,
                                node: *node,
                                meta: meta.clone(),
                            },
                            *opaque,
                        ),
                        _ => {
                            floor = floor.min(plane.saturating_sub(1));
                            break;
                        }
                    };
                    stack.push(part);
                    if opaque {
                        floor = floor.min(*plane);
                        break;
                    }
                }
                (
                    Kind::Dir,
                    Src::Dir(Box::new(DirInfo {
                        stack,
                        floor,
                        children: None,
                        nlink: None,
                    })),
                )
            }
        })
    }

    /// Recomputes where the child `name` of `parent` (inode `ino`) comes
    /// from after its planes changed, keeping its loaded listing.
    pub fn restack(&mut self, parent: u64, name: &[u8], ino: u64) -> OpResult<()> {
        let planes = self.found_for(parent, name)?;
        let floor = self.dir_info(parent)?.floor;
        let path = self.path(parent)?;
        let Some((_, src)) = self.decide(&path, name, &planes, floor) else {
            tracing::error!(ino, "entry vanished while being moved");
            return Err(Errno::EIO);
        };
        let i = self.inode_mut(ino)?;
        i.src = match (&mut i.src, src) {
            (Src::Dir(old), Src::Dir(mut new)) => {
                new.children = old.children.take();
                new.nlink = old.nlink;
                Src::Dir(new)
            }
            (_, s) => s,
        };
        Ok(())
    }

    /// Finds or makes the inode for a listed child, reusing `old` (the
    /// number the name had) or the inode of its hard-link group.
    fn attach(
        &mut self,
        parent: u64,
        name: &[u8],
        kind: Kind,
        src: Src,
        old: Option<u64>,
    ) -> OpResult<u64> {
        // A lower hard-link group is one inode.
        let group = match &src {
            Src::Lower { slot, entry } => match &entry.kind {
                EntryKind::File { link: Some(g), .. } => Some((*slot, g.clone())),
                _ => None,
            },
            _ => None,
        };
        // So is a multiply-linked upper file.
        let real = match &src {
            Src::Upper { slot, .. } if kind == Kind::File => {
                let path = join(&self.path(parent)?, name);
                let m = lstat(&self.v.upper_path(*slot, &path))?;
                (m.nlink() > 1).then_some(m.ino())
            }
            _ => None,
        };
        let shared = group
            .as_ref()
            .and_then(|g| self.st.groups.get(g).copied())
            .or_else(|| real.and_then(|r| self.st.upper_links.get(&r).copied()))
            .filter(|i| self.st.inodes.get(i).is_some_and(|x| !x.unlinked));
        let reuse = old
            .filter(|i| self.st.inodes.get(i).is_some_and(|x| x.kind == kind))
            .or(shared);
        let ino = match reuse {
            Some(i) => {
                let inode = self.inode_mut(i)?;
                let keep_children = match (&mut inode.src, src) {
                    (Src::Dir(old), Src::Dir(mut new)) => {
                        // The caller refreshes loaded listings itself.
                        new.children = old.children.take();
                        new.nlink = old.nlink;
                        Src::Dir(new)
                    }
                    (_, s) => s,
                };
                inode.src = keep_children;
                inode.unlinked = false;
                if !inode.has_name(parent, name) {
                    if old == Some(i) {
                        inode.parent = parent;
                        inode.name = name.to_vec();
                    } else {
                        inode.aliases.push((parent, name.to_vec()));
                    }
                }
                i
            }
            None => self.alloc(Inode::new(kind, parent, name.to_vec(), src)),
        };
        if let Some(g) = group {
            self.st.groups.insert(g, ino);
        }
        if let Some(r) = real {
            self.st.upper_links.insert(r, ino);
        }
        Ok(ino)
    }

    /// Rebuilds the listings of `ino` and of every loaded directory below
    /// it, after their planes changed (a directory moved or copied up).
    pub fn refresh_tree(&mut self, ino: u64) -> OpResult<()> {
        if self.dir_info(ino)?.children.is_none() {
            return Ok(());
        }
        self.load_dir(ino)?;
        let kids: Vec<u64> = self.children(ino)?.values().copied().collect();
        for k in kids {
            if self.inode(k)?.kind == Kind::Dir {
                self.refresh_tree(k)?;
            }
        }
        Ok(())
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

    /// Extents of a lower file or placeholder.
    pub fn file_data(&mut self, ino: u64) -> OpResult<Option<Arc<FileData>>> {
        let i = self.inode(ino)?;
        if let Some(d) = &i.data {
            return Ok(Some(d.clone()));
        }
        let (content, size): (Content, u64) = match &i.src {
            Src::Upper {
                origin: Some(o), ..
            } => (o.content.clone(), o.size),
            Src::Lower { entry, .. } => match &entry.kind {
                EntryKind::File { content, size, .. } => (content.clone(), *size),
                _ => return Ok(None),
            },
            _ => return Ok(None),
        };
        let d = self.v.lower.file_data(&content, size)?;
        self.inode_mut(ino)?.data = Some(d.clone());
        Ok(Some(d))
    }

    /// Path of an upper-backed inode's file (its fd when unlinked is the
    /// caller's business).
    pub fn upper_file(&self, ino: u64) -> OpResult<Option<PathBuf>> {
        let i = self.inode(ino)?;
        match i.src {
            Src::Upper { slot, .. } if !i.unlinked => {
                Ok(Some(self.v.upper_path(slot, &self.path(ino)?)))
            }
            _ => Ok(None),
        }
    }

    /// Attributes of an inode.
    pub fn attr(&mut self, ino: u64) -> OpResult<FileAttr> {
        let kind = self.inode(ino)?.kind;
        // A directory's listing can be large: don't copy it.
        let src = match &self.inode(ino)?.src {
            Src::Dir(info) => Src::Dir(Box::new(DirInfo {
                stack: info.stack.iter().take(1).cloned().collect(),
                floor: info.floor,
                children: None,
                nlink: None,
            })),
            other => other.clone(),
        };
        let mut a = match src {
            Src::Upper { slot, origin } => {
                let i = self.inode(ino)?;
                let m = match (&i.open_fd, i.unlinked) {
                    (Some(f), true) => f.metadata().map_err(|e| errno(&e))?,
                    _ => lstat(&self.v.upper_path(slot, &self.path(ino)?))?,
                };
                let mut a = stat_attr(&m);
                if origin.is_some() {
                    if let Some(d) = self.file_data(ino)? {
                        a.blocks = d.allocated().div_ceil(512);
                    }
                }
                a
            }
            Src::Lower { slot, entry } => {
                let mut a = meta_attr(&entry.meta, kind);
                match &entry.kind {
                    EntryKind::File { size, link, .. } => {
                        a.size = *size;
                        a.blocks = match self.file_data(ino)? {
                            Some(d) => d.allocated().div_ceil(512),
                            None => size.div_ceil(512),
                        };
                        if let Some(g) = link {
                            if let Some((_, root)) = &self.v.slots[slot].root {
                                let links = self.v.lower.links(*root)?;
                                a.nlink = links.get(g).map_or(1, |m| m.len() as u32);
                            }
                        }
                    }
                    EntryKind::Symlink { target } => a.size = target.len() as u64,
                    EntryKind::CharDevice { rdev } | EntryKind::BlockDevice { rdev } => {
                        a.rdev = *rdev as u32
                    }
                    _ => {}
                }
                a
            }
            Src::Dir(info) => {
                let mut a = match info.stack.first() {
                    Some(Part::Upper(s)) => {
                        stat_attr(&lstat(&self.v.upper_path(*s, &self.path(ino)?))?)
                    }
                    Some(Part::Lower { meta, .. }) => {
                        let mut a = meta_attr(meta, Kind::Dir);
                        a.size = 4096;
                        a.blocks = 8;
                        a
                    }
                    None => {
                        let mut a = meta_attr(&self.v.default_meta, Kind::Dir);
                        a.size = 4096;
                        a
                    }
                };
                a.nlink = self.dir_nlink(ino)?;
                a
            }
        };
        a.ino = INodeNo(ino);
        a.kind = kind.file_type();
        Ok(a)
    }

    /// `2 +` subdirectories, as on ext4; counted cheaply when one plane
    /// makes the directory.
    fn dir_nlink(&mut self, ino: u64) -> OpResult<u32> {
        let info = self.dir_info(ino)?;
        if let Some(n) = info.nlink {
            return Ok(n);
        }
        if let Some(children) = &info.children {
            let inodes = &self.st.inodes;
            let dirs = children
                .values()
                .filter(|k| inodes.get(k).is_some_and(|i| i.kind == Kind::Dir))
                .count();
            let n = 2 + dirs as u32;
            if let Some(d) = self.inode_mut(ino)?.dir_mut() {
                d.nlink = Some(n);
            }
            return Ok(n);
        }
        let stack: Vec<Part> = info.stack.iter().take(2).cloned().collect();
        match stack.as_slice() {
            [Part::Lower { node, .. }] => {
                let d = self.v.lower.dir(*node)?;
                let dirs = d
                    .entries
                    .iter()
                    .filter(|e| matches!(e.kind, EntryKind::Dir { .. }))
                    .count();
                Ok(2 + dirs as u32)
            }
            [Part::Upper(s)] => Ok(lstat(&self.v.upper_path(*s, &self.path(ino)?))?.nlink() as u32),
            [] => Ok(2),
            _ => {
                self.load_dir(ino)?;
                self.dir_nlink(ino)
            }
        }
    }

    /// Target of a symlink.
    pub fn readlink(&self, ino: u64) -> OpResult<Vec<u8>> {
        let i = self.inode(ino)?;
        if i.kind != Kind::Symlink {
            return Err(Errno::EINVAL);
        }
        match &i.src {
            Src::Upper { slot, .. } => {
                let p = self.v.upper_path(*slot, &self.path(ino)?);
                fs::read_link(&p)
                    .map(|t| t.as_os_str().as_bytes().to_vec())
                    .map_err(|e| errno(&e))
            }
            Src::Lower { entry, .. } => match &entry.kind {
                EntryKind::Symlink { target } => Ok(target.clone()),
                _ => Err(Errno::EINVAL),
            },
            Src::Dir(_) => Err(Errno::EINVAL),
        }
    }

    /// Where an inode's metadata is read from: an upper path, or lower
    /// metadata.
    fn meta_source(&self, ino: u64) -> OpResult<MetaSource> {
        let i = self.inode(ino)?;
        Ok(match &i.src {
            Src::Upper { slot, .. } => {
                MetaSource::Upper(self.v.upper_path(*slot, &self.path(ino)?))
            }
            Src::Lower { entry, .. } => MetaSource::Lower(Arc::new(entry.meta.clone())),
            Src::Dir(d) => match d.stack.first() {
                Some(Part::Upper(s)) => MetaSource::Upper(self.v.upper_path(*s, &self.path(ino)?)),
                Some(Part::Lower { meta, .. }) => MetaSource::Lower(meta.clone()),
                None => MetaSource::Lower(self.v.default_meta.clone()),
            },
        })
    }

    /// An extended attribute's value.
    pub fn getxattr(&self, ino: u64, name: &[u8]) -> OpResult<Vec<u8>> {
        if upper::is_private(name) {
            return Err(Errno::ENODATA);
        }
        match self.meta_source(ino)? {
            MetaSource::Upper(p) => match xattr::get(&p, OsStr::from_bytes(name)) {
                Ok(Some(v)) => Ok(v),
                Ok(None) => Err(Errno::ENODATA),
                Err(e) => Err(errno(&e)),
            },
            MetaSource::Lower(meta) => meta
                .xattrs
                .iter()
                .find(|x| x.name == name)
                .map(|x| x.value.clone())
                .ok_or(Errno::ENODATA),
        }
    }

    /// Names of the extended attributes, NUL-terminated and concatenated.
    pub fn listxattr(&self, ino: u64) -> OpResult<Vec<u8>> {
        let names: Vec<Vec<u8>> = match self.meta_source(ino)? {
            MetaSource::Upper(p) => xattr::list(&p)
                .map_err(|e| errno(&e))?
                .map(|n| n.as_bytes().to_vec())
                .collect(),
            MetaSource::Lower(meta) => meta.xattrs.iter().map(|x| x.name.clone()).collect(),
        };
        let mut out = Vec::new();
        for n in names.into_iter().filter(|n| !upper::is_private(n)) {
            out.extend_from_slice(&n);
            out.push(0);
        }
        Ok(out)
    }

    /// The upper directories making directory `ino` (to sync them).
    pub fn upper_dirs(&self, ino: u64) -> OpResult<Vec<PathBuf>> {
        let rel = self.path(ino)?;
        Ok(self
            .dir_info(ino)?
            .stack
            .iter()
            .filter_map(|p| match p {
                Part::Upper(s) => Some(self.v.upper_path(*s, &rel)),
                Part::Lower { .. } => None,
            })
            .collect())
    }

    /// A snapshot of a directory's entries for readdir: (ino, kind, name).
    pub fn list(&mut self, ino: u64) -> OpResult<Vec<(u64, Kind, Vec<u8>)>> {
        let kids: Vec<(Vec<u8>, u64)> = self
            .children(ino)?
            .iter()
            .map(|(n, i)| (n.clone(), *i))
            .collect();
        let mut out = Vec::with_capacity(kids.len());
        for (name, i) in kids {
            out.push((i, self.inode(i)?.kind, name));
        }
        Ok(out)
    }
}

enum MetaSource {
    Upper(PathBuf),
    Lower(Arc<Meta>),
}

/// What a plane holds for a name while a directory is listed.
#[derive(Clone)]
enum Found {
    Whiteout,
    Upper(usize, Kind),
    UpperDir(usize, bool),
    Lower(usize, Arc<Entry>),
    LowerDir {
        slot: usize,
        node: ManifestId,
        opaque: bool,
        meta: Arc<Meta>,
    },
}

/// What an upper directory entry is, from its type (and `lstat` for
/// character devices, which may be whiteouts).
fn upper_found(slot: usize, path: &std::path::Path, ft: std::fs::FileType) -> OpResult<Found> {
    Ok(if ft.is_char_device() {
        if upper::is_whiteout(&lstat(path)?) {
            Found::Whiteout
        } else {
            Found::Upper(slot, Kind::Char)
        }
    } else if ft.is_dir() {
        Found::UpperDir(slot, upper::is_opaque(path))
    } else {
        Found::Upper(slot, Kind::of_std(ft))
    })
}

fn lower_found(slot: usize, e: &Entry) -> Found {
    match &e.kind {
        EntryKind::Whiteout => Found::Whiteout,
        EntryKind::Dir { node, opaque } => Found::LowerDir {
            slot,
            node: *node,
            opaque: *opaque,
            meta: Arc::new(e.meta.clone()),
        },
        _ => Found::Lower(slot, Arc::new(e.clone())),
    }
}

fn blank_attr() -> FileAttr {
    FileAttr {
        ino: INodeNo(0),
        size: 0,
        blocks: 0,
        atime: UNIX_EPOCH,
        mtime: UNIX_EPOCH,
        ctime: UNIX_EPOCH,
        crtime: UNIX_EPOCH,
        kind: FileType::RegularFile,
        perm: 0,
        nlink: 1,
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: 4096,
        flags: 0,
    }
}

/// Attributes of a lower entry: times are its mtime (lower layers keep no
/// atime or ctime).
fn meta_attr(meta: &Meta, kind: Kind) -> FileAttr {
    let t = system_time(meta.mtime_sec, meta.mtime_nsec);
    FileAttr {
        atime: t,
        mtime: t,
        ctime: t,
        crtime: t,
        kind: kind.file_type(),
        perm: (meta.mode & 0o7777) as u16,
        uid: meta.uid,
        gid: meta.gid,
        ..blank_attr()
    }
}

/// Attributes of an upper file from its `lstat`.
fn stat_attr(m: &Metadata) -> FileAttr {
    FileAttr {
        size: m.size(),
        blocks: m.blocks(),
        atime: system_time(m.atime(), m.atime_nsec() as u32),
        mtime: system_time(m.mtime(), m.mtime_nsec() as u32),
        ctime: system_time(m.ctime(), m.ctime_nsec() as u32),
        crtime: system_time(m.ctime(), m.ctime_nsec() as u32),
        kind: Kind::of_std(m.file_type()).file_type(),
        perm: (m.mode() & 0o7777) as u16,
        nlink: m.nlink() as u32,
        uid: m.uid(),
        gid: m.gid(),
        rdev: m.rdev() as u32,
        blksize: m.blksize() as u32,
        ..blank_attr()
    }
}
