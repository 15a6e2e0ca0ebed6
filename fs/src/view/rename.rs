//! Rename, across directories and across layers, never `EXDEV`.
//!
//! A non-directory is copied up (metadata only) if it is lower, then moved
//! with one `renameat2` into the destination's slot — all uppers share a
//! file system — leaving a whiteout behind in the same call when a lower
//! plane still has the old name. A directory made entirely by one upper
//! moves the same way (marked opaque if the destination has lower content).
//! A merged directory is rebuilt at the destination as an opaque upper
//! directory: upper files move into it, lower files become metacopy
//! placeholders (no data is copied), subdirectories recurse; then the old
//! name is removed. At every step each entry is at its old or its new
//! path, so a crash loses nothing.

use std::collections::HashMap;
use std::fs;

use lamina_sync::manifest::EntryKind;
use nix::errno::Errno;
use nix::fcntl::RenameFlags;

use super::copyup::rename2;
use super::{check_name, errno, join, Ctx, Kind, OpResult, Part, Probe, Src, ROOT};
use crate::upper::{self, Origin};

/// One rename, resolved: the source `src` at `name` in `parent`, the
/// destination `newname` in `newparent` (replacing `dst` if any), and both
/// paths relative to the mount.
#[derive(Clone, Copy)]
struct Move<'a> {
    parent: u64,
    name: &'a [u8],
    src: u64,
    newparent: u64,
    newname: &'a [u8],
    dst: Option<u64>,
    old_rel: &'a [u8],
    new_rel: &'a [u8],
}

impl Ctx<'_> {
    /// Renames `name` in `parent` to `newname` in `newparent`. `flags` are
    /// `renameat2` flags (`RENAME_NOREPLACE`, `RENAME_EXCHANGE`).
    pub fn rename(
        &mut self,
        parent: u64,
        name: &[u8],
        newparent: u64,
        newname: &[u8],
        flags: u32,
    ) -> OpResult<()> {
        check_name(name)?;
        check_name(newname)?;
        let src = self.child(parent, name)?.ok_or(Errno::ENOENT)?;
        let dst = self.child(newparent, newname)?;
        if flags & libc::RENAME_EXCHANGE != 0 {
            return self.exchange(parent, name, src, newparent, newname, dst);
        }
        if flags & libc::RENAME_NOREPLACE != 0 && dst.is_some() {
            return Err(Errno::EEXIST);
        }
        if dst == Some(src) {
            return Ok(());
        }
        let is_dir = self.inode(src)?.kind == Kind::Dir;
        if let Some(d) = dst {
            match (is_dir, self.inode(d)?.kind == Kind::Dir) {
                (true, false) => return Err(Errno::ENOTDIR),
                (false, true) => return Err(Errno::EISDIR),
                (true, true) if !self.children(d)?.is_empty() => return Err(Errno::ENOTEMPTY),
                _ => {}
            }
        }
        if is_dir {
            let mut cur = newparent;
            while cur != ROOT {
                if cur == src {
                    return Err(Errno::EINVAL);
                }
                cur = self.inode(cur)?.parent;
            }
        }
        let old_rel = join(&self.path(parent)?, name);
        let new_rel = join(&self.path(newparent)?, newname);
        let mv = Move {
            parent,
            name,
            src,
            newparent,
            newname,
            dst,
            old_rel: &old_rel,
            new_rel: &new_rel,
        };
        if is_dir {
            self.rename_dir(&mv)
        } else {
            self.rename_file(&mv)
        }
    }

    /// The highest plane a new entry `name` in `dir` may take.
    fn bound(&self, dir: u64, name: &[u8]) -> OpResult<u32> {
        let floor = self.dir_info(dir)?.floor;
        Ok(self
            .probe(dir, name)?
            .first()
            .map_or(floor, |(p, _)| (*p).min(floor)))
    }

    /// Moves the name of `ino` in the inode table.
    fn move_name(
        &mut self,
        parent: u64,
        name: &[u8],
        ino: u64,
        newparent: u64,
        newname: &[u8],
    ) -> OpResult<()> {
        let is_dir = self.inode(ino)?.kind == Kind::Dir;
        for (dir, add) in [(parent, false), (newparent, true)] {
            if let Some(d) = self.inode_mut(dir)?.dir_mut() {
                if let Some(c) = d.children.as_mut() {
                    if add {
                        c.insert(newname.to_vec(), ino);
                    } else {
                        c.remove(name);
                    }
                }
                if is_dir {
                    d.nlink = None;
                }
            }
        }
        let i = self.inode_mut(ino)?;
        if i.parent == parent && i.name == name {
            i.parent = newparent;
            i.name = newname.to_vec();
        } else if let Some(a) = i
            .aliases
            .iter_mut()
            .find(|(p, n)| *p == parent && n == name)
        {
            *a = (newparent, newname.to_vec());
        }
        Ok(())
    }

    fn rename_file(&mut self, mv: &Move<'_>) -> OpResult<()> {
        let Move {
            parent,
            name,
            src,
            newparent,
            newname,
            dst,
            old_rel,
            new_rel,
        } = *mv;
        self.make_upper(src)?;
        let Src::Upper { slot: s1, .. } = self.inode(src)?.src else {
            return Err(Errno::EIO);
        };
        let bound = self.bound(newparent, newname)?;
        let (s1, w2) = if self.attr(src)?.nlink > 1 {
            // Every name of a file stays in one slot: if the new name
            // cannot be in this one, they all move up to where it can.
            if self.v.up(s1) > bound {
                let w = self.pick_slot(new_rel, bound)?;
                self.lift(src, w)?;
                (w, w)
            } else {
                (s1, s1)
            }
        } else {
            (s1, self.pick_slot(new_rel, bound)?)
        };
        self.ensure_upper_dir(newparent, w2)?;
        let from = self.v.upper_path(s1, old_rel);
        let to = self.v.upper_path(w2, new_rel);
        let whiteout = self.shows_below(parent, name, self.v.up(s1))?;
        // The destination, if it is in this very upper, is replaced by the
        // rename itself; anything lower is hidden by the new entry.
        if let Some(d) = dst {
            if let Src::Upper { slot, .. } = self.inode(d)?.src {
                if slot != w2 {
                    let stale = self.v.upper_path(slot, new_rel);
                    if self.v.up(slot) < self.v.up(w2) {
                        // Above the new entry: it would hide it.
                        fs::remove_file(&stale).map_err(|e| errno(&e))?;
                    }
                }
            }
        }
        let flags = if whiteout {
            RenameFlags::RENAME_WHITEOUT
        } else {
            RenameFlags::empty()
        };
        rename2(&from, &to, flags)?;
        if let Some(d) = dst {
            self.drop_child(newparent, newname, d)?;
        }
        self.move_name(parent, name, src, newparent, newname)?;
        if let Src::Upper { slot, .. } = &mut self.inode_mut(src)?.src {
            *slot = w2;
        }
        self.touch_dir(parent, s1)?;
        self.touch_dir(newparent, w2)
    }

    fn rename_dir(&mut self, mv: &Move<'_>) -> OpResult<()> {
        let Move {
            parent,
            name,
            src,
            newparent,
            newname,
            dst,
            old_rel,
            new_rel,
        } = *mv;
        // The destination is an empty directory: remove it first (it may
        // hold whiteouts over lower entries, which then need hiding again:
        // the moved directory is made opaque if anything shows below).
        if dst.is_some() {
            self.rmdir(newparent, newname)?;
        }
        let stack = self.dir_info(src)?.stack.clone();
        let bound = self.bound(newparent, newname)?;
        let w2 = self.pick_slot(new_rel, bound)?;
        let pure = match stack.as_slice() {
            [Part::Upper(s)] => Some(*s),
            _ => None,
        };
        let s1 = match pure {
            Some(s1) => {
                self.ensure_upper_dir(newparent, w2)?;
                let from = self.v.upper_path(s1, old_rel);
                let to = self.v.upper_path(w2, new_rel);
                let up = self.v.up(w2);
                let probes = self.probe(newparent, newname)?;
                let over_whiteout = probes
                    .iter()
                    .any(|(p, f)| *p == up && *f == Probe::Whiteout);
                if probes
                    .iter()
                    .find(|(p, _)| *p > up)
                    .is_some_and(|(_, f)| *f != Probe::Whiteout)
                {
                    upper::set_opaque(&from).map_err(|e| errno(&e))?;
                }
                let whiteout = self.shows_below(parent, name, self.v.up(s1))?;
                if over_whiteout {
                    // A directory cannot replace the whiteout by rename:
                    // swap them, then drop the whiteout or turn it into the
                    // source's whiteout.
                    rename2(&from, &to, RenameFlags::RENAME_EXCHANGE)?;
                    if !whiteout {
                        fs::remove_file(&from).map_err(|e| errno(&e))?;
                    }
                } else {
                    let flags = if whiteout {
                        RenameFlags::RENAME_WHITEOUT
                    } else {
                        RenameFlags::RENAME_NOREPLACE
                    };
                    rename2(&from, &to, flags)?;
                }
                s1
            }
            None => {
                let s1 = match stack.first() {
                    Some(Part::Upper(s)) => *s,
                    Some(p) => self.pick_slot(old_rel, self.v.plane(p))?,
                    None => return Err(Errno::EIO),
                };
                self.rebuild_dir(src, newparent, newname, new_rel)?;
                self.remove_source(parent, name, old_rel, &stack)?;
                s1
            }
        };
        self.move_name(parent, name, src, newparent, newname)?;
        self.restack(newparent, newname, src)?;
        self.refresh_tree(src)?;
        self.touch_dir(parent, s1)?;
        self.touch_dir(newparent, w2)
    }

    /// Rebuilds merged directory `src` as a new opaque upper directory
    /// `newname` in `newparent`, moving or copying everything it shows.
    fn rebuild_dir(
        &mut self,
        src: u64,
        newparent: u64,
        newname: &[u8],
        new_rel: &[u8],
    ) -> OpResult<()> {
        let ne = self.new_entry(newparent, newname)?;
        let meta = self.visible_meta(src)?;
        let tmp = self.tmp_path();
        fs::create_dir(&tmp).map_err(|e| errno(&e))?;
        let made = upper::apply_meta(&tmp, &meta, false)
            .and_then(|()| upper::set_opaque(&tmp))
            .map_err(|e| errno(&e));
        if let Err(e) = made {
            let _ = fs::remove_dir(&tmp);
            return Err(e);
        }
        let placed = if ne.over_whiteout {
            rename2(&tmp, &ne.dest, RenameFlags::RENAME_EXCHANGE)
                .and_then(|()| fs::remove_file(&tmp).map_err(|e| errno(&e)))
        } else {
            rename2(&tmp, &ne.dest, RenameFlags::RENAME_NOREPLACE)
        };
        if let Err(e) = placed {
            let _ = upper::remove_all(&tmp);
            return Err(e);
        }
        let mut links = HashMap::new();
        self.move_children(src, ne.slot, new_rel, &mut links)
    }

    /// Moves (upper) or copies up (lower, as placeholders) every entry of
    /// directory `dir` into `slot`'s upper at `dest_rel`.
    fn move_children(
        &mut self,
        dir: u64,
        slot: usize,
        dest_rel: &[u8],
        links: &mut HashMap<(usize, Vec<u8>), crate::hostpath::HostPath>,
    ) -> OpResult<()> {
        let kids: Vec<(Vec<u8>, u64)> = self
            .children(dir)?
            .iter()
            .map(|(n, i)| (n.clone(), *i))
            .collect();
        let dir_rel = self.path(dir)?;
        for (name, child) in kids {
            let to = self.v.upper_path(slot, &join(dest_rel, &name));
            let from_rel = join(&dir_rel, &name);
            match self.inode(child)?.src.clone() {
                Src::Upper { slot: s, .. } => {
                    rename2(
                        &self.v.upper_path(s, &from_rel),
                        &to,
                        RenameFlags::RENAME_NOREPLACE,
                    )?;
                }
                Src::Lower { slot: ls, entry } => {
                    let group = match &entry.kind {
                        EntryKind::File { link: Some(g), .. } => Some((ls, g.clone())),
                        _ => None,
                    };
                    if let Some(first) = group.as_ref().and_then(|g| links.get(g)) {
                        fs::hard_link(first, &to).map_err(|e| errno(&e))?;
                        continue;
                    }
                    let origin = match &entry.kind {
                        EntryKind::File { size, content, .. } if *size > 0 => Some(Origin {
                            size: *size,
                            content: content.clone(),
                        }),
                        _ => None,
                    };
                    super::copyup::make_entry(&to, &entry, origin.as_ref())?;
                    if let Some(g) = group {
                        links.insert(g, to);
                    }
                }
                Src::Dir(_) => {
                    let meta = self.visible_meta(child)?;
                    fs::create_dir(&to).map_err(|e| errno(&e))?;
                    upper::apply_meta(&to, &meta, false).map_err(|e| errno(&e))?;
                    self.move_children(child, slot, &join(dest_rel, &name), links)?;
                }
            }
        }
        Ok(())
    }

    /// Removes what is left of a moved merged directory at its old name,
    /// leaving a whiteout if a lower plane still has it.
    fn remove_source(
        &mut self,
        parent: u64,
        name: &[u8],
        old_rel: &[u8],
        stack: &[Part],
    ) -> OpResult<()> {
        for p in stack {
            if let Part::Upper(s) = p {
                upper::remove_all(&self.v.upper_path(*s, old_rel)).map_err(|e| errno(&e))?;
            }
        }
        if let Some((q, f)) = self.probe(parent, name)?.first().copied() {
            if f != Probe::Whiteout {
                let w = self.pick_slot(old_rel, q)?;
                self.ensure_upper_dir(parent, w)?;
                upper::make_whiteout(&self.v.upper_path(w, old_rel))?;
            }
        }
        Ok(())
    }

    /// Moves every name of upper entry `ino` (a non-directory, or a
    /// directory made by one upper alone) from its slot up to slot `w`, at
    /// the same paths: there they hide what the old slot had below them,
    /// so nothing else changes in the view. Each name moves with one
    /// rename, so a crash leaves each at its old or its new place.
    pub(super) fn lift(&mut self, ino: u64, w: usize) -> OpResult<()> {
        let i = self.inode(ino)?;
        let s = match &i.src {
            Src::Upper { slot, .. } => *slot,
            Src::Dir(d) => match d.stack.as_slice() {
                [Part::Upper(s)] => *s,
                // Merged with lower planes: as overlayfs without
                // redirect_dir, callers fall back to copying.
                _ => return Err(Errno::EXDEV),
            },
            Src::Lower { .. } => return Err(Errno::EIO),
        };
        if s == w {
            return Ok(());
        }
        if !self.v.writable(w) || self.v.up(w) > self.v.up(s) {
            return Err(Errno::EXDEV);
        }
        let names: Vec<(u64, Vec<u8>)> = std::iter::once((i.parent, i.name.clone()))
            .chain(i.aliases.iter().cloned())
            .collect();
        for (p, _) in &names {
            if self.v.up(w) > self.dir_info(*p)?.floor {
                return Err(Errno::EXDEV);
            }
        }
        for (p, n) in &names {
            self.ensure_upper_dir(*p, w)?;
            let rel = join(&self.path(*p)?, n);
            rename2(
                &self.v.upper_path(s, &rel),
                &self.v.upper_path(w, &rel),
                RenameFlags::RENAME_NOREPLACE,
            )?;
        }
        let is_dir = match &mut self.inode_mut(ino)?.src {
            Src::Upper { slot, .. } => {
                *slot = w;
                false
            }
            Src::Dir(d) => {
                d.stack = vec![Part::Upper(w)];
                true
            }
            Src::Lower { .. } => false,
        };
        if is_dir {
            self.refresh_tree(ino)?;
        }
        Ok(())
    }

    /// Swaps two names (`RENAME_EXCHANGE`). Both are copied up, the one in
    /// the lower slot is lifted to the other's (see [`Ctx::lift`]), then
    /// one `renameat2` swaps them. A directory merged with lower planes
    /// cannot be swapped (`EXDEV`, as on overlayfs without redirect_dir).
    fn exchange(
        &mut self,
        parent: u64,
        name: &[u8],
        src: u64,
        newparent: u64,
        newname: &[u8],
        dst: Option<u64>,
    ) -> OpResult<()> {
        let dst = dst.ok_or(Errno::ENOENT)?;
        let mut slots = Vec::new();
        for ino in [src, dst] {
            if self.inode(ino)?.kind == Kind::Dir {
                match self.dir_info(ino)?.stack.as_slice() {
                    [Part::Upper(s)] => slots.push(*s),
                    _ => return Err(Errno::EXDEV),
                }
            } else {
                slots.push(self.make_upper(ino)?);
            }
        }
        // The higher of the two slots takes both.
        let (w, low) = if self.v.up(slots[0]) <= self.v.up(slots[1]) {
            (slots[0], dst)
        } else {
            (slots[1], src)
        };
        self.lift(low, w)?;
        let a = self.v.upper_path(w, &join(&self.path(parent)?, name));
        let b = self.v.upper_path(w, &join(&self.path(newparent)?, newname));
        // A directory landing where a lower plane shows a directory would
        // merge with it: opaque, it keeps showing only its own entries.
        for (ino, from, dir, at) in [(src, &a, newparent, newname), (dst, &b, parent, name)] {
            if self.inode(ino)?.kind == Kind::Dir && self.shows_below(dir, at, self.v.up(w))? {
                upper::set_opaque(from).map_err(|e| errno(&e))?;
            }
        }
        rename2(&a, &b, RenameFlags::RENAME_EXCHANGE)?;
        self.move_name(parent, name, src, newparent, b"\0tmp")?;
        self.move_name(newparent, newname, dst, parent, name)?;
        self.move_name(newparent, b"\0tmp", src, newparent, newname)?;
        for ino in [src, dst] {
            if self.inode(ino)?.kind == Kind::Dir {
                self.refresh_tree(ino)?;
            }
        }
        self.touch_dir(parent, w)?;
        self.touch_dir(newparent, w)
    }
}
