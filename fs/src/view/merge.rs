//! Merging a directory's planes: what each layer holds for a name, which
//! one shows, and the listing built from that.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::sync::Arc;

use lamina_sync::manifest::{Entry, EntryKind, Meta};
use lamina_sync::ManifestId;
use nix::errno::Errno;

use super::{errno, join, lstat, Ctx, DirInfo, Inode, Kind, OpResult, Part, Probe, Src};
use crate::upper::{self, UpperKind};

impl Ctx<'_> {
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
