//! End-to-end tests of the file view's edge cases (issue #15): paths
//! longer than `PATH_MAX` once joined to the upper root, hard links and
//! `RENAME_EXCHANGE` across layers, and entries placed in an upper root
//! from outside the mount.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::ffi::OsStr;
use std::fs;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::fuse::*;
use common::*;
use nix::errno::Errno;
use nix::fcntl::{open, openat, readlinkat, renameat, renameat2, OFlag, RenameFlags, AT_FDCWD};
use nix::sys::stat::{fchmodat, fstatat, mkdirat, mknodat, FchmodatFlags, Mode, SFlag};
use nix::unistd::{
    fchownat, linkat, symlinkat, unlinkat, write as fd_write, Gid, Uid, UnlinkatFlags,
};

/// A one-layer-over-os composition `c` (as scripts/pjdfstest.sh makes).
fn simple() -> Option<Env> {
    if !fuse_ok() {
        return None;
    }
    let env = Env::new();
    let os = env.path("os-src");
    write(&os.join("etc/motd"), b"hi\n");
    personal_over_os(&env, &os);
    Some(env)
}

fn dir_fd(p: &Path) -> OwnedFd {
    open(p, OFlag::O_DIRECTORY | OFlag::O_RDONLY, Mode::empty()).unwrap()
}

fn at(rel: &[u8], name: &str) -> Vec<u8> {
    [rel, b"/", name.as_bytes()].concat()
}

/// A copy of the mounted tree, for comparing with what a commit kept.
fn snapshot(env: &Env, m: &Path, name: &str) -> PathBuf {
    let seen = env.path(name);
    assert!(Command::new("cp")
        .arg("-a")
        .arg(m)
        .arg(&seen)
        .status()
        .unwrap()
        .success());
    seen
}

fn commit_and_check(env: &Env, comp: &str, seen: &Path) {
    env.ok(&["commit", comp, "-m", "session"]);
    for l in env.status(comp) {
        assert!(
            l.added.is_empty() && l.changed.is_empty() && l.deleted.is_empty(),
            "{l:?}"
        );
    }
    let m = env.mount(comp);
    compare_trees(seen, &m.dir);
    m.umount();
}

/// pjdfstest's `*/03.t`: every call on a path of nearly `PATH_MAX` bytes
/// below the mount, which is far longer once joined to the upper root.
#[test]
fn paths_near_path_max_work_like_on_a_local_file_system() {
    let Some(env) = simple() else { return };
    let m = env.mount("c");
    let root = dir_fd(&m.dir);
    let mut rel: Vec<u8> = Vec::new();
    for i in 0..16 {
        if !rel.is_empty() {
            rel.push(b'/');
        }
        rel.extend_from_slice(format!("{i:02}{}", "d".repeat(248)).as_bytes());
        mkdirat(
            &root,
            OsStr::from_bytes(&rel),
            Mode::from_bits_truncate(0o755),
        )
        .unwrap();
    }
    // A last one takes the path to nearly PATH_MAX (4096) from the mount.
    rel.push(b'/');
    rel.extend_from_slice("e".repeat(4070 - rel.len()).as_bytes());
    mkdirat(
        &root,
        OsStr::from_bytes(&rel),
        Mode::from_bits_truncate(0o755),
    )
    .unwrap();
    assert_eq!(rel.len(), 4070);
    let f = at(&rel, "f");
    let fd = openat(
        &root,
        OsStr::from_bytes(&f),
        OFlag::O_CREAT | OFlag::O_WRONLY | OFlag::O_EXCL,
        Mode::from_bits_truncate(0o644),
    )
    .unwrap();
    assert_eq!(fd_write(&fd, b"long path\n").unwrap(), 10);
    drop(fd);
    let st = |p: &[u8]| {
        fstatat(
            &root,
            OsStr::from_bytes(p),
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        )
    };
    assert_eq!(st(&f).unwrap().st_size, 10);
    fchmodat(
        &root,
        OsStr::from_bytes(&f),
        Mode::from_bits_truncate(0o600),
        FchmodatFlags::FollowSymlink,
    )
    .unwrap();
    assert_eq!(st(&f).unwrap().st_mode & 0o7777, 0o600);
    fchownat(
        &root,
        OsStr::from_bytes(&f),
        Some(Uid::from_raw(65534)),
        Some(Gid::from_raw(65534)),
        nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
    )
    .unwrap();
    assert_eq!(st(&f).unwrap().st_uid, 65534);
    let g = at(&rel, "g");
    linkat(
        &root,
        OsStr::from_bytes(&f),
        &root,
        OsStr::from_bytes(&g),
        nix::fcntl::AtFlags::empty(),
    )
    .unwrap();
    assert_eq!(st(&f).unwrap().st_nlink, 2);
    let h = at(&rel, "h");
    renameat(&root, OsStr::from_bytes(&g), &root, OsStr::from_bytes(&h)).unwrap();
    assert_eq!(st(&g).unwrap_err(), Errno::ENOENT);
    let s = at(&rel, "s");
    symlinkat(OsStr::new("f"), &root, OsStr::from_bytes(&s)).unwrap();
    assert_eq!(
        readlinkat(&root, OsStr::from_bytes(&s)).unwrap(),
        OsStr::new("f")
    );
    let fifo = at(&rel, "fifo");
    mknodat(
        &root,
        OsStr::from_bytes(&fifo),
        SFlag::S_IFIFO,
        Mode::from_bits_truncate(0o644),
        0,
    )
    .unwrap();
    let tmp = at(&rel, "tmp");
    mkdirat(
        &root,
        OsStr::from_bytes(&tmp),
        Mode::from_bits_truncate(0o700),
    )
    .unwrap();
    unlinkat(&root, OsStr::from_bytes(&tmp), UnlinkatFlags::RemoveDir).unwrap();
    let lower = [&rel[..], b"/motd"].concat();
    // A lower file moved to a long path (a metadata copy-up), then its
    // data written (the copy-up of its data).
    renameat(
        &root,
        OsStr::new("etc/motd"),
        &root,
        OsStr::from_bytes(&lower),
    )
    .unwrap();
    let fd = openat(
        &root,
        OsStr::from_bytes(&lower),
        OFlag::O_WRONLY | OFlag::O_APPEND,
        Mode::empty(),
    )
    .unwrap();
    fd_write(&fd, b"more\n").unwrap();
    drop(fd);
    assert_eq!(st(&lower).unwrap().st_size, 8);
    // status and commit walk the long paths too.
    let p = layer(&env.status("c"), "p").clone();
    let shown = String::from_utf8_lossy(&f).into_owned();
    assert!(p.added.iter().any(|a| a == &format!("/{shown}")), "{p:?}");
    drop(root);
    m.umount();
    // (cp -a cannot copy such a tree: the committed one is checked by hand.)
    env.ok(&["commit", "c", "-m", "session"]);
    let p = layer(&env.status("c"), "p").clone();
    assert!(
        p.added.is_empty() && p.changed.is_empty() && p.deleted.is_empty(),
        "{p:?}"
    );
    let m = env.mount("c");
    let root = dir_fd(&m.dir);
    let st = |p: &[u8]| {
        fstatat(
            &root,
            OsStr::from_bytes(p),
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        )
    };
    let read = |p: &[u8]| {
        let fd = openat(&root, OsStr::from_bytes(p), OFlag::O_RDONLY, Mode::empty()).unwrap();
        let mut buf = vec![0u8; 64];
        let n = nix::unistd::read(&fd, &mut buf).unwrap();
        buf.truncate(n);
        buf
    };
    assert_eq!(read(&f), b"long path\n");
    assert_eq!(read(&lower), b"hi\nmore\n");
    let (sf, sh) = (st(&f).unwrap(), st(&h).unwrap());
    assert_eq!(
        (sf.st_ino, sf.st_nlink, sf.st_mode & 0o7777, sf.st_uid),
        (sh.st_ino, 2, 0o600, 65534)
    );
    assert_eq!(
        readlinkat(&root, OsStr::from_bytes(&s)).unwrap(),
        OsStr::new("f")
    );
    assert_eq!(st(&fifo).unwrap().st_mode & libc::S_IFMT, libc::S_IFIFO);
    assert!(std::path::Path::new(&m.dir)
        .join("etc")
        .read_dir()
        .unwrap()
        .next()
        .is_none());
    // And the deepest entries can be removed again.
    for n in ["f", "h", "s", "fifo", "motd"] {
        unlinkat(
            &root,
            OsStr::from_bytes(&at(&rel, n)),
            UnlinkatFlags::NoRemoveDir,
        )
        .unwrap();
    }
    unlinkat(&root, OsStr::from_bytes(&rel), UnlinkatFlags::RemoveDir).unwrap();
    drop(root);
    m.umount();
}

/// A hard link whose new name a higher layer hides (a whiteout) from the
/// file's layer: the file's names all move up, as overlayfs would allow.
#[test]
fn hard_links_and_renames_of_linked_files_cross_layers() {
    let Some(env) = desktop("persistent") else {
        return;
    };
    let m = env.mount("desk");
    // A whiteout in u-data over the os file.
    fs::remove_file(m.p("home/u/Documents/old.txt")).unwrap();
    // .profile is routed to u-sys, below u-data.
    fs::hard_link(m.p("home/u/.profile"), m.p("home/u/Documents/old.txt")).unwrap();
    let a = fs::metadata(m.p("home/u/.profile")).unwrap();
    let b = fs::metadata(m.p("home/u/Documents/old.txt")).unwrap();
    assert_eq!((a.ino(), a.nlink()), (b.ino(), 2));
    fs::write(m.p("home/u/Documents/old.txt"), b"shared profile\n").unwrap();
    assert_eq!(
        fs::read(m.p("home/u/.profile")).unwrap(),
        b"shared profile\n"
    );
    let st = env.status("desk");
    assert!(
        layer(&st, "u-data")
            .added
            .contains(&"/home/u/.profile".into()),
        "{st:?}"
    );
    assert!(!layer(&st, "u-sys")
        .added
        .contains(&"/home/u/.profile".into()));
    // A linked file of u-apps renamed over a u-data whiteout.
    fs::write(m.p("etc/motd"), b"motd 2\n").unwrap();
    fs::hard_link(m.p("etc/motd"), m.p("etc/motd.bak")).unwrap();
    fs::remove_file(m.p("home/u/Documents/old.txt")).unwrap();
    fs::rename(m.p("etc/motd.bak"), m.p("home/u/Documents/old.txt")).unwrap();
    let a = fs::metadata(m.p("etc/motd")).unwrap();
    let b = fs::metadata(m.p("home/u/Documents/old.txt")).unwrap();
    assert_eq!((a.ino(), a.nlink()), (b.ino(), 2));
    assert_eq!(
        fs::read(m.p("home/u/Documents/old.txt")).unwrap(),
        b"motd 2\n"
    );
    assert_eq!(
        fs::read(m.p("home/u/.profile")).unwrap(),
        b"shared profile\n"
    );
    let seen = snapshot(&env, &m.dir, "seen");
    m.umount();
    commit_and_check(&env, "desk", &seen);
    // The links survive the commit.
    let m = env.mount("desk");
    let a = fs::metadata(m.p("etc/motd")).unwrap();
    let b = fs::metadata(m.p("home/u/Documents/old.txt")).unwrap();
    assert_eq!((a.ino(), a.nlink()), (b.ino(), 2));
    m.umount();
}

fn exchange(a: &Path, b: &Path) -> nix::Result<()> {
    renameat2(AT_FDCWD, a, AT_FDCWD, b, RenameFlags::RENAME_EXCHANGE)
}

#[test]
fn rename_exchange_swaps_names_in_different_layers() {
    let Some(env) = desktop("persistent") else {
        return;
    };
    let m = env.mount("desk");
    // Upper files of two layers (u-sys, u-apps).
    fs::write(m.p("etc/hostname"), b"laptop\n").unwrap();
    fs::write(m.p("opt/office/bin"), b"office 2\n").unwrap();
    exchange(&m.p("etc/hostname"), &m.p("opt/office/bin")).unwrap();
    assert_eq!(fs::read(m.p("etc/hostname")).unwrap(), b"office 2\n");
    assert_eq!(fs::read(m.p("opt/office/bin")).unwrap(), b"laptop\n");
    // Two lower files of different layers.
    exchange(&m.p("etc/motd"), &m.p("opt/cad/bin")).unwrap();
    assert_eq!(fs::read(m.p("etc/motd")).unwrap(), b"cad\n");
    assert_eq!(fs::read(m.p("opt/cad/bin")).unwrap(), b"welcome\n");
    // A directory of u-data with a lower file; then the same directory
    // over a lower directory's name.
    fs::create_dir(m.p("home/u/Documents/new")).unwrap();
    fs::write(m.p("home/u/Documents/new/inside"), b"inside\n").unwrap();
    exchange(&m.p("home/u/Documents/new"), &m.p("etc/app.d/one.conf")).unwrap();
    assert_eq!(fs::read(m.p("home/u/Documents/new")).unwrap(), b"one\n");
    assert_eq!(
        fs::read(m.p("etc/app.d/one.conf/inside")).unwrap(),
        b"inside\n"
    );
    // A directory merged with lower layers cannot be swapped (as on
    // overlayfs without redirect_dir), and nothing changes.
    assert_eq!(
        exchange(&m.p("etc/app.d"), &m.p("etc/motd")),
        Err(Errno::EXDEV)
    );
    assert_eq!(fs::read(m.p("etc/motd")).unwrap(), b"cad\n");
    assert_eq!(fs::read(m.p("etc/app.d/two.conf")).unwrap(), b"two\n");
    let seen = snapshot(&env, &m.dir, "seen");
    m.umount();
    commit_and_check(&env, "desk", &seen);
}

/// Entries placed in an upper root from outside (before it carries the
/// root's metadata) are pending changes for `lamina status` and commit,
/// so the mount shows them too.
#[test]
fn status_and_the_mount_agree_on_entries_placed_in_an_upper_root() {
    let Some(env) = simple() else { return };
    let comps = env.path("store/compositions");
    let id = fs::read_dir(&comps)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let upper = id.join("upper/1");
    fs::create_dir_all(&upper).unwrap();
    fs::write(upper.join("placed"), b"from outside\n").unwrap();
    let p = layer(&env.status("c"), "p").clone();
    assert_eq!(p.added, ["/placed"]);
    assert!(p.changed.is_empty(), "{p:?}");
    let m = env.mount("c");
    assert_eq!(fs::read(m.p("placed")).unwrap(), b"from outside\n");
    assert_eq!(fs::read(m.p("etc/motd")).unwrap(), b"hi\n");
    let p = layer(&env.status("c"), "p").clone();
    assert_eq!(p.added, ["/placed"]);
    assert!(
        p.changed.is_empty(),
        "the root's metadata did not change: {p:?}"
    );
    let seen = snapshot(&env, &m.dir, "seen");
    let pid = m.pid;
    m.umount();
    // `lamina umount` returns once the daemon has ended.
    let state = fs::read_to_string(format!("/proc/{pid}/stat")).map(|s| {
        let rest = s.rsplit_once(')').unwrap().1.to_owned();
        rest.split_whitespace().next().unwrap().to_owned()
    });
    assert!(
        state.as_ref().map_or(true, |s| s == "Z" || s == "X"),
        "daemon {pid} still running after umount: {state:?}"
    );
    commit_and_check(&env, "c", &seen);
}
