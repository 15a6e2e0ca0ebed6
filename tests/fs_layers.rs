//! End-to-end tests of compositions (issue #4): redirection rules, whiteouts
//! across layers, commit, revert, crashes, corrupt chunks, bad input and a
//! real workload, on real FUSE mounts.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use common::fuse::*;
use common::*;
use nix::errno::Errno;

#[test]
fn group_layers_stack_in_order_and_rules_route_each_write() {
    let Some(env) = desktop("persistent") else {
        return;
    };
    let m = env.mount("desk");
    // Both group layers show; the later one wins a shared path.
    assert_eq!(fs::read(m.p("opt/office/bin")).unwrap(), b"office 1\n");
    assert_eq!(fs::read(m.p("opt/cad/bin")).unwrap(), b"cad\n");
    assert_eq!(fs::read(m.p("opt/shared")).unwrap(), b"from g2\n");
    // One write per rule.
    fs::write(m.p("home/u/Documents/report.txt"), b"report").unwrap();
    fs::create_dir_all(m.p("home/u/Documents/sub/deep")).unwrap();
    fs::write(m.p("home/u/.bashrc"), b"alias").unwrap();
    fs::write(m.p("etc/hostname"), b"laptop7\n").unwrap();
    fs::write(m.p("opt/office/plugin"), b"plugin").unwrap();
    fs::write(m.p("etc/motd"), b"changed\n").unwrap();
    fs::remove_file(m.p("home/u/Documents/old.txt")).unwrap();
    let st = env.status("desk");
    let data = layer(&st, "u-data");
    assert!(
        data.added.contains(&"/home/u/Documents/report.txt".into()),
        "{data:?}"
    );
    assert!(
        data.added.contains(&"/home/u/Documents/sub/deep".into()),
        "{data:?}"
    );
    assert_eq!(data.deleted, ["/home/u/Documents/old.txt"]);
    let sys = layer(&st, "u-sys");
    assert!(sys.added.contains(&"/home/u/.bashrc".into()), "{sys:?}");
    assert!(sys.added.contains(&"/etc/hostname".into()), "{sys:?}");
    assert!(
        !sys.added.iter().any(|p| p.contains("Documents/")),
        "{sys:?}"
    );
    let apps = layer(&st, "u-apps");
    assert!(
        apps.added.contains(&"/opt/office/plugin".into()),
        "{apps:?}"
    );
    assert!(apps.added.contains(&"/etc/motd".into()), "{apps:?}");
    assert!(!apps
        .added
        .iter()
        .any(|p| p.contains("hostname") || p.starts_with("/home/u/")));
    for read_only in ["os", "g1", "g2"] {
        let l = layer(&st, read_only);
        assert!(
            l.added.is_empty() && l.changed.is_empty() && l.deleted.is_empty(),
            "{l:?}"
        );
    }
    // The uppers hold exactly that.
    let comp = env.json(&["compose", "show", "desk"]);
    assert_eq!(comp["layers"].as_array().unwrap().len(), 6);
    m.umount();
}

#[test]
fn cross_layer_renames_and_whiteouts_commit_to_what_the_mount_showed() {
    let Some(env) = desktop("persistent") else {
        return;
    };
    let m = env.mount("desk");
    // A document moved out of Documents: from data to system.
    fs::write(m.p("home/u/Documents/draft"), b"draft text").unwrap();
    fs::rename(m.p("home/u/Documents/draft"), m.p("home/u/draft")).unwrap();
    // A lower directory moved from personal's domain into home (system).
    fs::rename(m.p("etc/app.d"), m.p("home/u/app.d")).unwrap();
    // A lower document renamed inside data, and a lower file deleted.
    fs::rename(
        m.p("home/u/Documents/old.txt"),
        m.p("home/u/Documents/old2.txt"),
    )
    .unwrap();
    fs::remove_file(m.p("opt/shared")).unwrap();
    // A lower directory replaced by a new one of the same name.
    fs::remove_dir_all(m.p("opt/office")).unwrap();
    fs::create_dir(m.p("opt/office")).unwrap();
    fs::write(m.p("opt/office/new"), b"new office").unwrap();
    // Hard links, metadata changes, a symlink.
    fs::hard_link(m.p("usr/bin/sh"), m.p("usr/bin/bash")).unwrap();
    std::os::unix::fs::symlink("bash", m.p("usr/bin/rbash")).unwrap();
    xattr::set(m.p("etc/motd"), "user.tag", b"t").unwrap();
    assert!(!m.p("etc/app.d").exists());
    assert_eq!(fs::read(m.p("home/u/app.d/one.conf")).unwrap(), b"one\n");
    assert!(
        !m.p("opt/shared").exists(),
        "a whiteout hides both group copies"
    );
    assert!(!m.p("opt/office/bin").exists());
    let seen = env.path("seen");
    let cp = Command::new("cp")
        .arg("-a")
        .arg(&m.dir)
        .arg(&seen)
        .status()
        .unwrap();
    assert!(cp.success());
    m.umount();

    let doc = env.json(&["commit", "desk", "-m", "session"]);
    let committed: Vec<_> = doc["layers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| !l["version"].is_null())
        .map(|l| l["layer"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(committed, ["u-apps", "u-sys", "u-data"]);
    for l in env.status("desk") {
        assert!(
            l.added.is_empty() && l.changed.is_empty() && l.deleted.is_empty(),
            "{l:?}"
        );
    }
    // The mount after the commit (empty uppers) shows the same tree.
    let m = env.mount("desk");
    compare_trees(&seen, &m.dir);
    m.umount();
    // So do the exported versions, stacked by the kernel's overlayfs.
    let mut lowers = Vec::new();
    for l in ["u-data", "u-sys", "u-apps", "g2", "g1", "os"] {
        let dest = env.path(&format!("export-{l}"));
        env.export(l, &dest);
        lowers.push(dest.display().to_string());
    }
    let ovl = env.path("ovl");
    fs::create_dir(&ovl).unwrap();
    let ok = Command::new("mount")
        .args(["-t", "overlay", "overlay", "-o"])
        .arg(format!("lowerdir={}", lowers.join(":")))
        .arg(&ovl)
        .status()
        .unwrap();
    assert!(ok.success());
    let result = std::panic::catch_unwind(|| compare_trees(&seen, &ovl));
    Command::new("umount").arg(&ovl).status().unwrap();
    result.unwrap();
    // The moved document is in the system layer, not in data.
    let sys = env.path("export-u-sys");
    assert_eq!(fs::read(sys.join("home/u/draft")).unwrap(), b"draft text");
    assert!(!env.path("export-u-data/home/u/draft").exists());
}

#[test]
fn revert_mode_drops_writes_at_unmount() {
    let Some(env) = desktop("revert") else { return };
    let m = env.mount("desk");
    fs::write(m.p("home/u/Documents/lost"), b"gone soon").unwrap();
    fs::remove_file(m.p("etc/motd")).unwrap();
    fs::write(m.p("etc/hostname"), b"cafe-3\n").unwrap();
    assert_eq!(fs::read(m.p("etc/hostname")).unwrap(), b"cafe-3\n");
    m.umount();
    for l in env.status("desk") {
        assert!(
            l.added.is_empty() && l.changed.is_empty() && l.deleted.is_empty(),
            "{l:?}"
        );
    }
    let m = env.mount("desk");
    assert!(!m.p("home/u/Documents/lost").exists());
    assert_eq!(fs::read(m.p("etc/motd")).unwrap(), b"welcome\n");
    assert_eq!(fs::read(m.p("etc/hostname")).unwrap(), b"golden\n");
    m.umount();
    // `compose reset` does the same for a persistent composition.
    env.ok(&[
        "compose",
        "create",
        "p",
        "--layer",
        "os=os",
        "--layer",
        "personal=u-apps",
    ]);
    let m = env.mount("p");
    fs::write(m.p("etc/motd"), b"pending").unwrap();
    m.umount();
    assert_eq!(
        layer(&env.status("p"), "u-apps").added,
        ["/etc", "/etc/motd"]
    );
    env.ok(&["compose", "reset", "p"]);
    assert!(layer(&env.status("p"), "u-apps").added.is_empty());
    assert!(layer(&env.status("p"), "u-apps").changed.is_empty());
}

#[test]
fn a_killed_daemon_keeps_fsynced_data_and_remounts_the_same_tree() {
    let Some(env) = desktop("persistent") else {
        return;
    };
    let mut m = env.mount("desk");
    let mut f = File::create(m.p("home/u/Documents/journal")).unwrap();
    f.write_all(&random_bytes(3 << 20, 9)).unwrap();
    f.sync_all().unwrap();
    drop(f);
    fs::rename(m.p("etc/app.d"), m.p("etc/app.old")).unwrap();
    fs::remove_file(m.p("etc/motd")).unwrap();
    let dir = File::open(m.p("etc")).unwrap();
    dir.sync_all().unwrap();
    drop(dir);
    let seen = env.path("seen");
    assert!(Command::new("cp")
        .arg("-a")
        .arg(&m.dir)
        .arg(&seen)
        .status()
        .unwrap()
        .success());
    m.kill9();
    // The dead mount answers ENOTCONN until `lamina umount` clears it.
    let e = fs::metadata(m.p("etc")).unwrap_err();
    assert_eq!(Errno::from_raw(errno(e)), Errno::ENOTCONN);
    let shown = env.json(&["compose", "show", "desk"]);
    assert!(shown["mounted"].is_null(), "{shown}");
    let dir = m.dir.clone();
    m.umount();
    let m = env.mount_at("desk", &dir);
    compare_trees(&seen, &m.dir);
    assert_eq!(
        fs::read(m.p("home/u/Documents/journal")).unwrap(),
        random_bytes(3 << 20, 9)
    );
    m.umount();
}

#[test]
fn a_corrupt_chunk_fails_only_its_file() {
    if !fuse_ok() {
        return;
    }
    let env = Env::new();
    let src = env.path("src");
    write(&src.join("bad.bin"), &random_bytes(1 << 20, 5));
    write(&src.join("good.txt"), b"fine");
    env.tree_layer("os", "os", Some(&src));
    env.ok(&["compose", "create", "c", "--layer", "os=os"]);
    let pack = packs(&env.store).into_iter().next().unwrap();
    let mut bytes = fs::read(&pack).unwrap();
    let (at, id, _) = records(&bytes)
        .into_iter()
        .find(|(_, _, len)| *len > 10_000)
        .unwrap();
    bytes[at + 48 + 100] ^= 0x01;
    fs::write(&pack, &bytes).unwrap();
    let m = env.mount("c");
    let mut buf = Vec::new();
    let e = File::open(m.p("bad.bin")).and_then(|mut f| f.read_to_end(&mut buf));
    assert_eq!(Errno::from_raw(errno(e.unwrap_err())), Errno::EIO);
    assert_eq!(fs::read(m.p("good.txt")).unwrap(), b"fine");
    assert_eq!(fs::read_dir(&m.dir).unwrap().count(), 2);
    m.umount();
    let log = fs::read_dir(env.store.join("compositions"))
        .unwrap()
        .map(|d| fs::read_to_string(d.unwrap().path().join("daemon.log")).unwrap_or_default())
        .collect::<String>();
    assert!(log.contains(&id), "the log names chunk {id}:\n{log}");
}

#[test]
fn bad_input_gets_one_clear_line_and_a_nonzero_exit() {
    let Some(env) = desktop("persistent") else {
        return;
    };
    let one_line = |(code, err): (i32, String), code_want: i32, needle: &str| {
        assert_eq!(code, code_want, "{err}");
        assert!(err.contains(needle), "{needle:?} not in {err:?}");
        assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    };
    let missing = env.path("nowhere");
    one_line(
        env.fail(&["mount".as_ref(), "desk".as_ref(), missing.as_os_str()]),
        2,
        "does not exist",
    );
    let full = env.path("full");
    write(&full.join("x"), b"x");
    one_line(
        env.fail(&["mount".as_ref(), "desk".as_ref(), full.as_os_str()]),
        2,
        "is not empty",
    );
    let empty = env.path("empty");
    fs::create_dir(&empty).unwrap();
    one_line(
        env.fail(&["mount".as_ref(), "nope".as_ref(), empty.as_os_str()]),
        1,
        "nope",
    );
    let m = env.mount("desk");
    one_line(
        env.fail(&["mount".as_ref(), "desk".as_ref(), empty.as_os_str()]),
        1,
        "is mounted at",
    );
    // A mounted composition commits through its daemon and stays mounted.
    env.ok(&["commit", "desk"]);
    assert!(m.p("").exists());
    one_line(env.fail(&["compose", "rm", "desk"]), 1, "is mounted at");
    m.umount();
    one_line(env.fail(&["umount".as_ref(), empty.as_os_str()]), 1, "not");
    // Rules errors name the line.
    let cases: [(&str, &str); 4] = [
        ("rules = [\n  { path = \"/a/[\", layer = \"data\" },\n  { path = \"**\", layer = \"personal\" },\n]\n", "line 2"),
        ("rules = [\n  { path = \"/a\", layer = \"personal\" },\n  { path = \"/b\", layer = \"data\" },\n  { path = \"**\", layer = \"personal\" },\n]\n", "line 3"),
        ("rules = [\n  { path = \"/a\", layer = \"personal\" },\n]\n", "line 2"),
        ("rules = [\n  { path = \"/a\", layer = \"personal\" },\n  { path = \"**\", layer = \"data\" },\n]\n", "line 3"),
    ];
    for (i, (text, line)) in cases.iter().enumerate() {
        let f = env.path(&format!("rules{i}.toml"));
        fs::write(&f, text).unwrap();
        let (code, err) = env.fail(&[
            "compose",
            "create",
            &format!("r{i}"),
            "--layer",
            "os=os",
            "--layer",
            "personal=u-apps",
            "--rules",
            f.to_str().unwrap(),
        ]);
        assert_eq!(code, 2, "{err}");
        assert!(
            err.contains(line) && err.contains(&format!("rules{i}.toml")),
            "{err}"
        );
    }
    // Layers that can't be composed.
    env.create("disk", "os", "disk");
    one_line(
        env.fail(&["compose", "create", "x", "--layer", "os=disk"]),
        2,
        "disk",
    );
    one_line(
        env.fail(&["compose", "create", "x", "--layer", "os=absent"]),
        2,
        "absent",
    );
    one_line(
        env.fail(&["compose", "create", "x", "--layer", "data=os"]),
        2,
        "os",
    );
    one_line(
        env.fail(&["compose", "create", "desk", "--layer", "os=os"]),
        1,
        "desk",
    );
    // A store held by another writer, with --no-wait.
    let lock = OpenOptions::new()
        .write(true)
        .open(env.store.join("lock"))
        .unwrap();
    lock.lock().unwrap();
    one_line(
        env.fail(&["--no-wait", "compose", "create", "y", "--layer", "os=os"]),
        1,
        "locked",
    );
    one_line(env.fail(&["--no-wait", "commit", "desk"]), 1, "locked");
    lock.unlock().unwrap();
    // Nothing above left a composition behind.
    let names: Vec<_> = env
        .json(&["compose", "ls"])
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(names, ["desk"]);
}

/// A real source tarball: the largest `.crate` of cargo's download cache
/// under 20 MB (CI has built the workspace, so the cache is full).
fn real_tarball() -> Option<PathBuf> {
    let home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))?;
    let mut best: Option<(u64, PathBuf)> = None;
    for reg in fs::read_dir(home.join("registry/cache")).ok()? {
        for f in fs::read_dir(reg.ok()?.path()).ok()? {
            let p = f.ok()?.path();
            let len = fs::metadata(&p).ok()?.len();
            if p.extension().is_some_and(|e| e == "crate")
                && len < 20_000_000
                && best.as_ref().is_none_or(|(b, _)| len > *b)
            {
                best = Some((len, p));
            }
        }
    }
    best.map(|(_, p)| p)
}

#[test]
fn unpacking_a_real_source_tarball_matches_ext4() {
    let Some(env) = desktop("persistent") else {
        return;
    };
    let tarball = real_tarball();
    if !require(tarball.is_some(), "a .crate file in cargo's registry cache") {
        return;
    }
    let tarball = tarball.unwrap();
    let m = env.mount("desk");
    let into_mount = m.p("home/u/Documents/src");
    let into_ext4 = env.path("ext4-src");
    for dest in [&into_mount, &into_ext4] {
        fs::create_dir_all(dest).unwrap();
        let ok = Command::new("tar")
            .arg("xzf")
            .arg(&tarball)
            .arg("-C")
            .arg(dest)
            .status()
            .unwrap();
        assert!(ok.success());
    }
    let sums = |dir: &Path| {
        let out = Command::new("sh")
            .arg("-c")
            .arg("find . -type f -print0 | sort -z | xargs -0 sha256sum")
            .current_dir(dir)
            .output()
            .unwrap();
        assert!(out.status.success());
        String::from_utf8(out.stdout).unwrap()
    };
    let (a, b) = (sums(&into_mount), sums(&into_ext4));
    assert!(a.lines().count() > 10, "{a}");
    assert_eq!(a, b);
    // Crate archives hold no directory entries, so directories carry the
    // time of each extraction: set them alike (through the mount, too).
    for dest in [&into_mount, &into_ext4] {
        let ok = Command::new("find")
            .arg(dest)
            .args([
                "-type",
                "d",
                "-exec",
                "touch",
                "-d",
                "@1600000000",
                "{}",
                "+",
            ])
            .status()
            .unwrap();
        assert!(ok.success());
    }
    let top = fs::read_dir(&into_ext4)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .file_name();
    compare_trees(&into_ext4.join(&top), &into_mount.join(&top));
    m.umount();
    // Committed, it is in the data layer, equal again.
    env.ok(&["commit", "desk"]);
    let out = env.path("data-export");
    env.export("u-data", &out);
    compare_trees(
        &into_ext4.join(&top),
        &out.join("home/u/Documents/src").join(&top),
    );
}
