//! End-to-end tests of the file view (issue #4), POSIX semantics on a real
//! FUSE mount of a two-layer composition (os below, personal above).

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use common::fuse::*;
use common::*;
use nix::errno::Errno;

const MIB: u64 = 1 << 20;

/// The lower tree: files, hard links, a sparse file, a symlink, a fifo,
/// xattrs, a private directory and a sticky one.
fn lower_tree(env: &Env) -> PathBuf {
    let src = env.path("lower");
    write(&src.join("etc/motd"), b"hello\n");
    write(&src.join("etc/hostname"), b"host0\n");
    xattr::set(src.join("etc/motd"), "user.color", b"blue").unwrap();
    let tool = src.join("usr/bin/tool");
    write(&tool, &random_bytes(300_000, 1));
    fs::set_permissions(&tool, fs::Permissions::from_mode(0o755)).unwrap();
    fs::hard_link(&tool, src.join("usr/bin/tool2")).unwrap();
    let sparse = src.join("usr/lib/big.sparse");
    write(&sparse, b"");
    File::options()
        .write(true)
        .open(&sparse)
        .unwrap()
        .set_len(8 * MIB)
        .unwrap();
    overwrite(&sparse, MIB, &random_bytes(65536, 2));
    overwrite(&sparse, 6 * MIB, &random_bytes(65536, 3));
    for f in ["var/lib/app/a", "var/lib/app/b", "var/lib/app/c/d"] {
        write(&src.join(f), f.as_bytes());
    }
    std::os::unix::fs::symlink("etc/motd", src.join("link")).unwrap();
    nix::unistd::mkfifo(
        &src.join("fifo"),
        nix::sys::stat::Mode::from_bits_truncate(0o644),
    )
    .unwrap();
    write(&src.join("private/secret"), b"secret");
    fs::set_permissions(src.join("private"), fs::Permissions::from_mode(0o700)).unwrap();
    fs::create_dir_all(src.join("tmp")).unwrap();
    fs::set_permissions(src.join("tmp"), fs::Permissions::from_mode(0o1777)).unwrap();
    src
}

/// A store with layers `os` (the lower tree) and `p` (empty) composed as
/// `c`; `None` where FUSE can't run (outside CI).
fn comp_env() -> Option<(Env, PathBuf)> {
    if !fuse_ok() {
        return None;
    }
    let env = Env::new();
    let src = lower_tree(&env);
    personal_over_os(&env, &src);
    Some((env, src))
}

fn err_of<T: std::fmt::Debug>(r: std::io::Result<T>) -> Errno {
    Errno::from_raw(errno(r.unwrap_err()))
}

#[test]
fn the_mount_shows_the_lower_tree_exactly() {
    let Some((env, src)) = comp_env() else { return };
    let m = env.mount("c");
    compare_trees(&src, &m.dir);
    // Readable twice (second time from the local file cache).
    assert_eq!(
        fs::read(m.p("usr/bin/tool")).unwrap(),
        fs::read(src.join("usr/bin/tool")).unwrap()
    );
    m.umount();
}

#[test]
fn open_flags_truncate_and_fallocate() {
    let Some((env, src)) = comp_env() else { return };
    let m = env.mount("c");
    // O_EXCL on a lower file.
    let r = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(m.p("etc/motd"));
    assert_eq!(err_of(r), Errno::EEXIST);
    // O_APPEND on a lower file copies it up and appends.
    let mut f = OpenOptions::new()
        .append(true)
        .open(m.p("etc/motd"))
        .unwrap();
    f.write_all(b"more\n").unwrap();
    drop(f);
    assert_eq!(fs::read(m.p("etc/motd")).unwrap(), b"hello\nmore\n");
    // O_TRUNC empties a lower file.
    OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(m.p("etc/hostname"))
        .unwrap();
    assert_eq!(fs::metadata(m.p("etc/hostname")).unwrap().len(), 0);
    // Positional writes and reads in a new file.
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(m.p("new"))
        .unwrap();
    f.write_all_at(b"abc", 10).unwrap();
    let mut buf = [0xffu8; 13];
    f.read_exact_at(&mut buf, 0).unwrap();
    assert_eq!(&buf, b"\0\0\0\0\0\0\0\0\0\0abc");
    drop(f);
    // Shrinking and growing a lower file keeps the prefix.
    let tool = fs::read(src.join("usr/bin/tool")).unwrap();
    let f = OpenOptions::new()
        .write(true)
        .open(m.p("usr/bin/tool"))
        .unwrap();
    f.set_len(1000).unwrap();
    f.set_len(5000).unwrap();
    drop(f);
    let now = fs::read(m.p("usr/bin/tool")).unwrap();
    assert_eq!(&now[..1000], &tool[..1000]);
    assert!(now[1000..].iter().all(|&b| b == 0));
    // The lower file is untouched.
    assert_eq!(fs::read(src.join("usr/bin/tool")).unwrap(), tool);
    // fallocate: extend, keep size, punch a hole.
    use nix::fcntl::{fallocate, FallocateFlags};
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(m.p("alloc"))
        .unwrap();
    fallocate(&f, FallocateFlags::empty(), 0, (2 * MIB) as i64).unwrap();
    assert_eq!(f.metadata().unwrap().len(), 2 * MIB);
    fallocate(&f, FallocateFlags::FALLOC_FL_KEEP_SIZE, 0, (4 * MIB) as i64).unwrap();
    assert_eq!(f.metadata().unwrap().len(), 2 * MIB);
    f.write_all_at(&random_bytes(MIB as usize, 4), 0).unwrap();
    fallocate(
        &f,
        FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
        0,
        65536,
    )
    .unwrap();
    let mut head = vec![1u8; 65536];
    f.read_exact_at(&mut head, 0).unwrap();
    assert!(head.iter().all(|&b| b == 0));
    drop(f);
    m.umount();
}

#[test]
fn directories_and_renames() {
    let Some((env, src)) = comp_env() else { return };
    let m = env.mount("c");
    fs::create_dir_all(m.p("a/b/c")).unwrap();
    assert_eq!(err_of(fs::remove_dir(m.p("a/b"))), Errno::ENOTEMPTY);
    assert_eq!(err_of(fs::remove_dir(m.p("var/lib/app"))), Errno::ENOTEMPTY);
    assert_eq!(err_of(fs::create_dir(m.p("etc"))), Errno::EEXIST);
    // Removing a lower directory, then re-creating it: it comes back empty.
    fs::remove_dir_all(m.p("var/lib/app")).unwrap();
    assert!(!m.p("var/lib/app").exists());
    fs::create_dir(m.p("var/lib/app")).unwrap();
    assert_eq!(fs::read_dir(m.p("var/lib/app")).unwrap().count(), 0);
    // A file renamed over a lower file.
    fs::rename(m.p("etc/hostname"), m.p("etc/motd")).unwrap();
    assert_eq!(fs::read(m.p("etc/motd")).unwrap(), b"host0\n");
    assert!(!m.p("etc/hostname").exists());
    // A lower directory renamed: everything in it follows, holes too.
    fs::rename(m.p("usr/lib"), m.p("usr/lib2")).unwrap();
    assert!(!m.p("usr/lib").exists());
    assert_eq!(
        data_map(&m.p("usr/lib2/big.sparse")),
        data_map(&src.join("usr/lib/big.sparse"))
    );
    assert_eq!(
        fs::read(m.p("usr/lib2/big.sparse")).unwrap(),
        fs::read(src.join("usr/lib/big.sparse")).unwrap()
    );
    // ...and a directory renamed into a new one, across levels.
    fs::rename(m.p("usr/lib2"), m.p("a/b/lib3")).unwrap();
    assert!(m.p("a/b/lib3/big.sparse").is_file());
    // The error cases of rename(2).
    assert_eq!(err_of(fs::rename(m.p("a"), m.p("usr"))), Errno::ENOTEMPTY);
    assert_eq!(
        err_of(fs::rename(m.p("etc/motd"), m.p("usr"))),
        Errno::EISDIR
    );
    fs::create_dir(m.p("empty")).unwrap();
    assert_eq!(
        err_of(fs::rename(m.p("empty"), m.p("etc/motd"))),
        Errno::ENOTDIR
    );
    assert_eq!(
        err_of(fs::rename(m.p("a"), m.p("a/b/inside"))),
        Errno::EINVAL
    );
    let noreplace = nix::fcntl::renameat2(
        nix::fcntl::AT_FDCWD,
        &m.p("link"),
        nix::fcntl::AT_FDCWD,
        &m.p("etc/motd"),
        nix::fcntl::RenameFlags::RENAME_NOREPLACE,
    );
    assert_eq!(noreplace, Err(Errno::EEXIST));
    // An empty directory replaces an empty one.
    fs::create_dir(m.p("empty2")).unwrap();
    fs::rename(m.p("empty"), m.p("empty2")).unwrap();
    assert!(!m.p("empty").exists());
    // A directory's st_nlink counts its subdirectories, as on ext4,
    // through files and subdirectories coming and going.
    let nlink = |rel: &str| fs::metadata(m.p(rel)).unwrap().nlink();
    assert_eq!(nlink("var/lib/app"), 2);
    assert_eq!(nlink("var/lib"), 3);
    fs::create_dir(m.p("var/lib/app/s1")).unwrap();
    fs::create_dir(m.p("var/lib/app/s2")).unwrap();
    fs::write(m.p("var/lib/app/f"), b"f").unwrap();
    assert_eq!(nlink("var/lib/app"), 4);
    fs::rename(m.p("var/lib/app/s1"), m.p("var/lib/s1")).unwrap();
    assert_eq!((nlink("var/lib/app"), nlink("var/lib")), (3, 4));
    fs::remove_dir(m.p("var/lib/app/s2")).unwrap();
    fs::remove_file(m.p("var/lib/app/f")).unwrap();
    assert_eq!(nlink("var/lib/app"), 2);
    fs::rename(m.p("var/lib/s1"), m.p("var/lib/app")).unwrap();
    assert_eq!(nlink("var/lib"), 3);
    // Listings (which the kernel may cache) follow every change.
    let names_in = |rel: &str| {
        let mut v: Vec<String> = fs::read_dir(m.p(rel))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        v.sort();
        v
    };
    let before = names_in("var/lib/app");
    fs::write(m.p("var/lib/app/listed"), b"").unwrap();
    assert_eq!(names_in("var/lib/app").len(), before.len() + 1);
    fs::rename(m.p("var/lib/app/listed"), m.p("var/lib/app/renamed")).unwrap();
    assert!(names_in("var/lib/app").contains(&"renamed".to_string()));
    assert!(!names_in("var/lib/app").contains(&"listed".to_string()));
    fs::remove_file(m.p("var/lib/app/renamed")).unwrap();
    assert_eq!(names_in("var/lib/app"), before);
    // Listings agree with lookups.
    let mut names: Vec<_> = fs::read_dir(&m.dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["a", "empty2", "etc", "fifo", "link", "private", "tmp", "usr", "var"]
    );
    m.umount();
}

#[test]
fn links_unlink_and_symlinks() {
    let Some((env, _src)) = comp_env() else {
        return;
    };
    let m = env.mount("c");
    // Lower hard links: one inode, nlink 2, and a write through one name
    // shows through the other.
    let (a, b) = (
        fs::metadata(m.p("usr/bin/tool")).unwrap(),
        fs::metadata(m.p("usr/bin/tool2")).unwrap(),
    );
    assert_eq!((a.ino(), a.nlink()), (b.ino(), 2));
    overwrite(&m.p("usr/bin/tool"), 0, b"patched");
    assert_eq!(&fs::read(m.p("usr/bin/tool2")).unwrap()[..7], b"patched");
    let b2 = fs::metadata(m.p("usr/bin/tool2")).unwrap();
    assert_eq!((b2.ino(), b2.nlink()), (a.ino(), 2));
    // New hard links.
    fs::hard_link(m.p("etc/motd"), m.p("motd2")).unwrap();
    let s = fs::metadata(m.p("motd2")).unwrap();
    assert_eq!(s.nlink(), 2);
    assert_eq!(s.ino(), fs::metadata(m.p("etc/motd")).unwrap().ino());
    fs::remove_file(m.p("etc/motd")).unwrap();
    assert_eq!(fs::metadata(m.p("motd2")).unwrap().nlink(), 1);
    assert_eq!(fs::read(m.p("motd2")).unwrap(), b"hello\n");
    assert_eq!(err_of(fs::hard_link(m.p("etc"), m.p("etc2"))), Errno::EPERM);
    // An open, unlinked file stays readable and writable.
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(m.p("etc/hostname"))
        .unwrap();
    fs::remove_file(m.p("etc/hostname")).unwrap();
    assert!(!m.p("etc/hostname").exists());
    let mut text = String::new();
    f.read_to_string(&mut text).unwrap();
    assert_eq!(text, "host0\n");
    f.write_all(b"after\n").unwrap();
    f.seek(SeekFrom::Start(0)).unwrap();
    text.clear();
    f.read_to_string(&mut text).unwrap();
    assert_eq!(text, "host0\nafter\n");
    assert_eq!(f.metadata().unwrap().nlink(), 0);
    drop(f);
    // An unlinked lower file that was never opened for writing.
    let mut g = File::open(m.p("var/lib/app/a")).unwrap();
    fs::remove_file(m.p("var/lib/app/a")).unwrap();
    text.clear();
    g.read_to_string(&mut text).unwrap();
    assert_eq!(text, "var/lib/app/a");
    drop(g);
    // Symlinks.
    std::os::unix::fs::symlink("no/such/target", m.p("dangling")).unwrap();
    assert_eq!(
        fs::read_link(m.p("dangling")).unwrap(),
        Path::new("no/such/target")
    );
    assert!(fs::symlink_metadata(m.p("dangling"))
        .unwrap()
        .file_type()
        .is_symlink());
    assert_eq!(fs::read_link(m.p("link")).unwrap(), Path::new("etc/motd"));
    assert_eq!(err_of(fs::read_link(m.p("usr"))), Errno::EINVAL);
    m.umount();
}

#[test]
fn metadata_and_xattrs() {
    let Some((env, src)) = comp_env() else { return };
    let m = env.mount("c");
    let motd = m.p("etc/motd");
    fs::set_permissions(&motd, fs::Permissions::from_mode(0o600)).unwrap();
    assert_eq!(fs::metadata(&motd).unwrap().mode() & 0o7777, 0o600);
    std::os::unix::fs::chown(&motd, Some(1234), Some(5678)).unwrap();
    let s = fs::metadata(&motd).unwrap();
    assert_eq!((s.uid(), s.gid()), (1234, 5678));
    std::os::unix::fs::lchown(m.p("link"), Some(42), Some(43)).unwrap();
    let l = fs::symlink_metadata(m.p("link")).unwrap();
    assert_eq!((l.uid(), l.gid()), (42, 43));
    let t = filetime::FileTime::from_unix_time(1_500_000_000, 123_456_789);
    filetime::set_file_times(&motd, t, t).unwrap();
    let s = fs::metadata(&motd).unwrap();
    assert_eq!((s.mtime(), s.mtime_nsec()), (1_500_000_000, 123_456_789));
    assert_eq!((s.atime(), s.atime_nsec()), (1_500_000_000, 123_456_789));
    assert_eq!(fs::read(&motd).unwrap(), b"hello\n");
    // Lower xattrs show; all three namespaces can be set, listed, removed.
    assert_eq!(xattr::get(&motd, "user.color").unwrap().unwrap(), b"blue");
    xattr::set(&motd, "user.x", b"1").unwrap();
    xattr::set(&motd, "trusted.t", b"2").unwrap();
    xattr::set(&motd, "security.s", b"3").unwrap();
    xattr::set(m.p("var/lib/app"), "user.dir", b"4").unwrap();
    let mut names: Vec<_> = xattr::list(&motd)
        .unwrap()
        .map(|n| n.into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["security.s", "trusted.t", "user.color", "user.x"]);
    xattr::remove(&motd, "user.color").unwrap();
    assert_eq!(xattr::get(&motd, "user.color").unwrap(), None);
    assert_eq!(
        xattr::get(m.p("var/lib/app"), "user.dir").unwrap().unwrap(),
        b"4"
    );
    let e = xattr::remove(&motd, "user.absent").unwrap_err();
    assert_eq!(Errno::from_raw(errno(e)), Errno::ENODATA);
    // Lamina's own bookkeeping names are not for users.
    assert!(xattr::set(&motd, "trusted.lamina.origin", b"x").is_err());
    // The lower layer's source is untouched.
    assert_eq!(
        xattr::get(src.join("etc/motd"), "user.color")
            .unwrap()
            .unwrap(),
        b"blue"
    );
    m.umount();
}

#[test]
fn special_files_statfs_and_fsync() {
    let Some((env, _src)) = comp_env() else {
        return;
    };
    let m = env.mount("c");
    use nix::sys::stat::{mknod, Mode, SFlag};
    mknod(
        &m.p("null"),
        SFlag::S_IFCHR,
        Mode::from_bits_truncate(0o666),
        nix::sys::stat::makedev(1, 3),
    )
    .unwrap();
    let s = fs::metadata(m.p("null")).unwrap();
    assert_eq!(s.mode() & 0o170000, 0o020000);
    assert_eq!(s.rdev(), nix::sys::stat::makedev(1, 3));
    // It is a real device node: writes vanish, reads are empty.
    fs::write(m.p("null"), b"gone").unwrap();
    assert_eq!(fs::read(m.p("null")).unwrap(), b"");
    nix::unistd::mkfifo(&m.p("pipe"), Mode::from_bits_truncate(0o600)).unwrap();
    assert_eq!(
        fs::metadata(m.p("pipe")).unwrap().mode() & 0o170000,
        0o010000
    );
    assert_eq!(
        fs::symlink_metadata(m.p("fifo")).unwrap().mode() & 0o170000,
        0o010000
    );
    mknod(
        &m.p("sock"),
        SFlag::S_IFSOCK,
        Mode::from_bits_truncate(0o600),
        0,
    )
    .unwrap();
    assert_eq!(
        fs::metadata(m.p("sock")).unwrap().mode() & 0o170000,
        0o140000
    );
    let st = nix::sys::statvfs::statvfs(&m.dir).unwrap();
    assert!(st.blocks() > 0 && st.block_size() > 0, "{st:?}");
    assert_eq!(st.name_max(), 255);
    let f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(m.p("synced"))
        .unwrap();
    (&f).write_all(b"durable").unwrap();
    f.sync_all().unwrap();
    f.sync_data().unwrap();
    drop(f);
    File::open(&m.dir).unwrap().sync_all().unwrap();
    File::open(m.p("etc")).unwrap().sync_all().unwrap();
    m.umount();
}

#[test]
fn sparse_files_and_files_over_4_gib() {
    let Some((env, src)) = comp_env() else { return };
    let m = env.mount("c");
    let sparse = m.p("usr/lib/big.sparse");
    assert_eq!(data_map(&sparse), data_map(&src.join("usr/lib/big.sparse")));
    // Growing a lower sparse file past 4 GiB and writing there.
    let far = 5 * 1024 * MIB;
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&sparse)
        .unwrap();
    f.set_len(far + MIB).unwrap();
    f.write_all_at(b"far away", far).unwrap();
    let mut buf = [0u8; 8];
    f.read_exact_at(&mut buf, far).unwrap();
    assert_eq!(&buf, b"far away");
    f.read_exact_at(&mut buf, 4 * 1024 * MIB).unwrap();
    assert_eq!(buf, [0; 8]);
    drop(f);
    let map = data_map(&sparse);
    assert_eq!(map[..2], data_map(&src.join("usr/lib/big.sparse"))[..]);
    assert!(map.iter().any(|&(s, e)| s <= far && e > far), "{map:?}");
    let blocks = fs::metadata(&sparse).unwrap().blocks();
    assert!(
        blocks * 512 < 64 * MIB,
        "holes were filled: {blocks} blocks"
    );
    // A new file with data only above 4 GiB.
    let f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(m.p("huge"))
        .unwrap();
    f.write_all_at(&random_bytes(MIB as usize, 7), 4 * 1024 * MIB + 4096)
        .unwrap();
    drop(f);
    let s = fs::metadata(m.p("huge")).unwrap();
    assert_eq!(s.len(), 4 * 1024 * MIB + 4096 + MIB);
    assert!(
        s.blocks() * 512 < 4 * MIB,
        "not sparse: {} blocks",
        s.blocks()
    );
    let mut f = File::open(m.p("huge")).unwrap();
    f.seek(SeekFrom::Start(4 * 1024 * MIB + 4096)).unwrap();
    let mut got = vec![0u8; MIB as usize];
    f.read_exact(&mut got).unwrap();
    assert_eq!(got, random_bytes(MIB as usize, 7));
    drop(f);
    m.umount();
}

#[test]
fn names_up_to_255_bytes() {
    let Some((env, _src)) = comp_env() else {
        return;
    };
    let m = env.mount("c");
    let ok = "n".repeat(255);
    let long = "n".repeat(256);
    fs::write(m.p(&ok), b"x").unwrap();
    fs::create_dir(m.p(&format!("d{}", &ok[1..]))).unwrap();
    assert_eq!(fs::read(m.p(&ok)).unwrap(), b"x");
    assert_eq!(err_of(fs::write(m.p(&long), b"x")), Errno::ENAMETOOLONG);
    assert_eq!(err_of(fs::create_dir(m.p(&long))), Errno::ENAMETOOLONG);
    assert_eq!(
        err_of(fs::rename(m.p(&ok), m.p(&long))),
        Errno::ENAMETOOLONG
    );
    assert_eq!(
        err_of(std::os::unix::fs::symlink("t", m.p(&long))),
        Errno::ENAMETOOLONG
    );
    assert_eq!(
        err_of(fs::hard_link(m.p(&ok), m.p(&long))),
        Errno::ENAMETOOLONG
    );
    assert_eq!(err_of(fs::metadata(m.p(&long))), Errno::ENAMETOOLONG);
    m.umount();
}

#[test]
fn non_root_users_get_permission_checks() {
    let Some((env, _src)) = comp_env() else {
        return;
    };
    // The test directory must be searchable by `nobody`.
    fs::set_permissions(env.dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let m = env.mount("c");
    let p = |rel: &str| m.p(rel).display().to_string();
    // Reads: a private lower directory stays private.
    let (ok, err) = as_nobody(&format!("cat {}", p("private/secret")));
    assert!(!ok && err.contains("Permission denied"), "{err}");
    let (ok, err) = as_nobody(&format!("ls {}", p("private")));
    assert!(!ok && err.contains("Permission denied"), "{err}");
    assert!(as_nobody(&format!("cat {}", p("etc/motd"))).0);
    // Writes: root's directories and files refuse, the sticky one accepts.
    let (ok, err) = as_nobody(&format!("touch {}", p("etc/new")));
    assert!(!ok && err.contains("Permission denied"), "{err}");
    let (ok, err) = as_nobody(&format!("echo x >> {}", p("etc/motd")));
    assert!(!ok && err.contains("Permission denied"), "{err}");
    let (ok, err) = as_nobody(&format!("chmod 777 {}", p("etc/motd")));
    assert!(!ok && err.contains("Operation not permitted"), "{err}");
    let (ok, err) = as_nobody(&format!(
        "echo mine > {f} && cat {f} && mkdir {d} && touch {d}/x",
        f = p("tmp/mine"),
        d = p("tmp/dir")
    ));
    assert!(ok, "{err}");
    let s = fs::metadata(m.p("tmp/mine")).unwrap();
    assert_eq!((s.uid(), s.mode() & 0o777), (65534, 0o644));
    assert_eq!(fs::metadata(m.p("tmp/dir/x")).unwrap().uid(), 65534);
    // The sticky bit: nobody can't remove root's file in /tmp.
    fs::write(m.p("tmp/roots"), b"r").unwrap();
    let (ok, err) = as_nobody(&format!("rm -f {}", p("tmp/roots")));
    assert!(!ok && err.contains("Operation not permitted"), "{err}");
    assert!(m.p("tmp/roots").exists());
    // chown to someone else is root's.
    let (ok, _) = as_nobody(&format!("chown root {}", p("tmp/mine")));
    assert!(!ok);
    m.umount();
}

#[test]
fn inode_numbers_stay_stable_while_mounted() {
    let Some((env, _src)) = comp_env() else {
        return;
    };
    let m = env.mount("c");
    let ino = |rel: &str| fs::symlink_metadata(m.p(rel)).unwrap().ino();
    let paths = [
        "etc/motd",
        "etc",
        "usr/bin/tool",
        "link",
        "var/lib/app/c/d",
        "usr/lib",
    ];
    let before: Vec<u64> = paths.iter().map(|p| ino(p)).collect();
    let mut sorted = before.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(
        sorted.len(),
        paths.len(),
        "inode numbers collide: {before:?}"
    );
    // Copy-up, metadata copy-up, and a new file.
    overwrite(&m.p("etc/motd"), 0, b"J");
    fs::set_permissions(m.p("usr/bin/tool"), fs::Permissions::from_mode(0o700)).unwrap();
    fs::write(m.p("var/lib/app/new"), b"n").unwrap();
    let new = ino("var/lib/app/new");
    // Forget everything the kernel caches, then look again.
    fs::write("/proc/sys/vm/drop_caches", b"3").unwrap();
    let after: Vec<u64> = paths.iter().map(|p| ino(p)).collect();
    assert_eq!(before, after);
    assert_eq!(ino("var/lib/app/new"), new);
    // A renamed file keeps its number.
    fs::rename(m.p("var/lib/app/c/d"), m.p("moved")).unwrap();
    assert_eq!(ino("moved"), before[4]);
    m.umount();
}
