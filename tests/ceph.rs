//! Stores on Ceph against the real one-node cluster of `scripts/ceph.sh`:
//! several stores (servers) on one pool, concurrent commits to one ref,
//! corrupted objects, an unreachable cluster, migration of an embedded
//! store. (The store tests run on RADOS too: `LAMINA_TEST_BACKEND=rados`.)

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::ceph::{cluster, TestPool};
use common::net::{Certs, Laptop, Server};
use common::{compare_trees, random_bytes, write, Env};

fn tree(dir: &Path, seed: u64) {
    for i in 0..6u64 {
        write(
            &dir.join(format!("d{}/f{i}.bin", i % 2)),
            &random_bytes(40_000 + i as usize * 1000, seed * 100 + i),
        );
    }
    write(&dir.join("notes.txt"), format!("notes {seed}\n").as_bytes());
}

/// Two store directories on one pool, each committing to the same layer at
/// the same time: every commit that succeeded is in the layer's history,
/// each losing one was told the head moved, nothing was overwritten.
#[test]
fn concurrent_commits_through_two_stores_on_one_pool_lose_nothing() {
    let Some(conf) = cluster() else { return };
    let a = Env::on_pool(TestPool::new(&conf, "cas"));
    let b = a.join();
    a.create("shared/data", "data", "tree");
    // The layer made through one directory is there through the other.
    let ls = b.json(&["layer", "ls"]);
    assert_eq!(ls["layers"][0]["name"], "shared/data", "{ls}");

    let rounds = 6;
    let mut won = 0;
    let mut refused = 0;
    for round in 0..rounds {
        let mut children = Vec::new();
        for (i, env) in [&a, &b].into_iter().enumerate() {
            let src = env.path(&format!("src-{round}-{i}"));
            tree(&src, round * 10 + i as u64);
            let child = env
                .cmd()
                .args(["--json", "layer", "import", "shared/data"])
                .arg(&src)
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            children.push(child);
        }
        for c in children {
            let out = c.wait_with_output().unwrap();
            if out.status.success() {
                won += 1;
            } else {
                let err = String::from_utf8_lossy(&out.stderr);
                assert!(
                    err.contains("moved") || err.contains("expected"),
                    "a losing commit must say the head moved: {err}"
                );
                refused += 1;
            }
        }
    }
    assert!(won >= rounds, "at least one commit per round wins");
    assert_eq!(won + refused, 2 * rounds);
    // Every winner is in the history, in one chain; both views agree.
    let log_a = a.json(&["layer", "log", "shared/data"]);
    let log_b = b.json(&["layer", "log", "shared/data"]);
    assert_eq!(log_a, log_b);
    assert_eq!(
        log_a["versions"].as_array().unwrap().len() as u64,
        won,
        "{log_a}"
    );
    assert_eq!(a.json(&["fsck"])["ok"], true);
    assert_eq!(b.json(&["fsck"])["ok"], true);
    eprintln!("{won} commits won, {refused} were told the head moved");
}

/// Two `lamina server` processes on one pool serve the same store: a token
/// made through one works at the other, and two laptops pushing to one
/// layer through different servers end with one push accepted, the other
/// told to merge; its sync then merges, losing nothing.
#[test]
fn two_servers_on_one_pool_serve_one_store() {
    let Some(conf) = cluster() else { return };
    let a = Env::on_pool(TestPool::new(&conf, "srv"));
    let b = a.join();
    let certs = Certs::new(&a.path("certs"));
    a.ok(&["user", "add", "alice"]);
    let tok = a.json(&["token", "create", "alice"]);
    let token = a.path("alice.token");
    fs::write(&token, tok["token"].as_str().unwrap()).unwrap();
    let base = a.path("base");
    tree(&base, 1);
    a.create("user/alice/data", "data", "tree");
    a.import("user/alice/data", &base);

    let sa = Server::start(&a.store, &certs, "127.0.0.1:0");
    let sb = Server::start(&b.store, &certs, "127.0.0.1:0");
    let la = Laptop::new("laptop-a", &sa.url(), &token, &certs.ca);
    let lb = Laptop::new("laptop-b", &sb.url(), &token, &certs.ca);
    la.sync("pull", &["user/alice/data"]);
    lb.sync("pull", &["user/alice/data"]);
    for (l, name) in [(&la, "from-a"), (&lb, "from-b")] {
        let dir = l.env.path("edit");
        l.env.export("user/alice/data", &dir);
        write(&dir.join(name), name.as_bytes());
        l.env.import("user/alice/data", &dir);
    }
    // Both push at once.
    let pushes: Vec<_> = [&la, &lb]
        .into_iter()
        .map(|l| {
            l.env
                .cmd()
                .env("LAMINA_HOST", &l.host)
                .args(["push", "origin", "user/alice/data"])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let outs: Vec<_> = pushes
        .into_iter()
        .map(|c| c.wait_with_output().unwrap())
        .collect();
    let ok: Vec<bool> = outs.iter().map(|o| o.status.success()).collect();
    assert_eq!(
        ok.iter().filter(|&&s| s).count(),
        1,
        "exactly one push wins: {:?}",
        outs.iter()
            .map(|o| String::from_utf8_lossy(&o.stderr).into_owned())
            .collect::<Vec<_>>()
    );
    let loser = if ok[0] { &lb } else { &la };
    let err = String::from_utf8_lossy(&outs[usize::from(ok[0])].stderr).into_owned();
    assert!(
        err.contains("moved") || err.contains("diverged") || err.contains("sync"),
        "the other is told to merge: {err}"
    );
    loser.sync("sync", &["user/alice/data"]);
    // Both edits are on the pool, seen through either server's store.
    for env in [&a, &b] {
        let out = env.path(&format!("out-{}", rand::random::<u32>()));
        env.export("user/alice/data", &out);
        assert!(out.join("from-a").exists() && out.join("from-b").exists());
        assert_eq!(fs::read(out.join("notes.txt")).unwrap(), b"notes 1\n");
    }
    assert_eq!(sa.stop().code(), Some(0));
    assert_eq!(sb.stop().code(), Some(0));
}

fn pack_objects(pool: &TestPool) -> Vec<String> {
    String::from_utf8(pool.rados(&["ls"]))
        .unwrap()
        .lines()
        .filter(|l| l.starts_with("lamina.pack."))
        .map(str::to_owned)
        .collect()
}

/// A flipped byte in a pack object is named by fsck and refused on read;
/// a missing pack object is named too.
#[test]
fn corrupted_objects_are_named_by_fsck_and_refused_on_read() {
    let Some(conf) = cluster() else { return };
    let env = Env::on_pool(TestPool::new(&conf, "bad"));
    let src = env.path("src");
    write(&src.join("big.bin"), &random_bytes(3 << 20, 5));
    env.create("os/a", "os", "tree");
    env.import("os/a", &src);
    let pool = env.pool.as_ref().unwrap();
    let packs = pack_objects(pool);
    assert_eq!(packs.len(), 1, "{packs:?}");
    let file = env.path("pack");
    pool.rados(&["get", &packs[0], file.to_str().unwrap()]);
    let mut bytes = fs::read(&file).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x40;
    fs::write(&file, &bytes).unwrap();
    pool.rados(&["put", &packs[0], file.to_str().unwrap()]);

    let fsck = env.run(&["--json", "fsck"]);
    let report: serde_json::Value = serde_json::from_slice(&fsck.stdout).unwrap();
    assert_eq!(report["ok"], false, "{report}");
    let problems = report["problems"].as_array().unwrap();
    assert!(
        problems.iter().any(|p| {
            p["object"].as_str().unwrap().starts_with("chunk ")
                && p["message"].as_str().unwrap().contains("hashes to")
                && p["used_by"][0].as_str().unwrap().ends_with("/big.bin")
        }),
        "{report}"
    );
    let (_, err) = env.export_fails("os/a", &env.path("out"));
    assert!(err.contains("hashes to") && err.contains("pack "), "{err}");

    // Gone altogether.
    pool.rados(&["rm", &packs[0]]);
    let report: serde_json::Value =
        serde_json::from_slice(&env.run(&["--json", "fsck"]).stdout).unwrap();
    assert_eq!(report["ok"], false);
    assert!(report.to_string().contains("missing"), "{report}");
}

/// A cluster that does not answer: a clear error within the timeout, no
/// store directory left behind; an existing store on it fails the same way.
#[test]
fn an_unreachable_cluster_fails_within_its_timeout() {
    let Some(conf) = cluster() else { return };
    let env = Env::empty();
    let bad = env.path("bad.conf");
    fs::write(&bad, "[global]\nmon host = 127.0.0.1:9\n").unwrap();
    let t = Instant::now();
    let (_, err) = env.fail(&[
        "init".as_ref(),
        "--backend".as_ref(),
        "rados".as_ref(),
        "--pool".as_ref(),
        "x".as_ref(),
        "--ceph-conf".as_ref(),
        bad.as_os_str(),
        "--ceph-timeout".as_ref(),
        "3".as_ref(),
    ]);
    assert!(t.elapsed() < Duration::from_secs(30), "{:?}", t.elapsed());
    assert!(err.contains("timed out"), "{err}");
    assert_eq!(
        err.trim().lines().filter(|l| l.contains("error")).count(),
        1,
        "{err}"
    );
    assert!(!env.store.exists());

    // A store whose cluster goes away.
    let good = Env::on_pool(TestPool::new(&conf, "gone"));
    good.create("os/a", "os", "tree");
    let marker = good.store.join("lamina-store");
    let text = fs::read_to_string(&marker).unwrap();
    let moved: String = text
        .lines()
        .map(|l| {
            if l.starts_with("conf ") {
                format!("conf {}", bad.display())
            } else if l.starts_with("timeout ") {
                "timeout 3".to_owned()
            } else {
                l.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    fs::write(&marker, moved + "\n").unwrap();
    let t = Instant::now();
    let (_, err) = good.fail(&["layer", "ls"]);
    assert!(t.elapsed() < Duration::from_secs(30));
    assert!(
        err.contains("RADOS pool") && err.contains("timed out"),
        "{err}"
    );
    fs::write(&marker, &text).unwrap();
    assert_eq!(good.json(&["layer", "ls"])["layers"][0]["name"], "os/a");

    // A pool with no store in it.
    let empty = TestPool::new(&conf, "nostore");
    Command::new("timeout")
        .args(["60", "ceph", "-c"])
        .arg(&conf)
        .args(["osd", "pool", "create", &empty.name])
        .output()
        .unwrap();
    let pointed: String = text
        .lines()
        .map(|l| {
            if l.starts_with("pool ") {
                format!("pool {}", empty.name)
            } else {
                l.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    fs::write(&marker, pointed + "\n").unwrap();
    let (_, err) = good.fail(&["layer", "ls"]);
    assert!(err.contains("holds no Lamina store"), "{err}");
}

/// `store migrate` copies a populated embedded store onto a pool: layers,
/// history, users and tokens, data; a rerun copies nothing more.
#[test]
fn an_embedded_store_migrates_onto_a_pool() {
    let Some(conf) = cluster() else { return };
    let env = Env::empty();
    env.ok(&["init"]);
    let src = env.path("src");
    tree(&src, 3);
    env.create("os/base", "os", "tree");
    env.import("os/base", &src);
    write(&src.join("second"), b"v2");
    env.import("os/base", &src);
    let img = env.path("disk.raw");
    fs::write(&img, random_bytes(2 << 20, 9)).unwrap();
    env.create("os/disk", "os", "disk");
    env.import("os/disk", &img);
    env.ok(&["user", "add", "alice"]);
    env.ok(&["layer", "grant", "os/base", "alice", "read"]);
    let pool = TestPool::new(&conf, "mig");
    let into = env.path("on-ceph");
    let args = |into: &Path| -> Vec<std::ffi::OsString> {
        vec![
            "--json".into(),
            "store".into(),
            "migrate".into(),
            "--to".into(),
            "rados".into(),
            "--pool".into(),
            pool.name.clone().into(),
            "--ceph-conf".into(),
            conf.clone().into(),
            "--into".into(),
            into.into(),
        ]
    };
    let r: serde_json::Value = serde_json::from_str(&env.ok(&args(&into))).unwrap();
    assert!(r["report"]["chunks_copied"].as_u64().unwrap() > 0, "{r}");
    let moved = Env {
        dir: tempfile::tempdir().unwrap(),
        store: into.clone(),
        pool: None,
    };
    assert_eq!(
        env.json(&["layer", "ls"]),
        moved.json(&["layer", "ls"]),
        "same layers"
    );
    assert_eq!(
        env.json(&["layer", "log", "os/base"]),
        moved.json(&["layer", "log", "os/base"])
    );
    assert_eq!(env.json(&["user", "ls"]), moved.json(&["user", "ls"]));
    let out = moved.path("out");
    moved.export("os/base", &out);
    compare_trees(&src, &out);
    let disk = moved.path("disk.out");
    moved.export("os/disk", &disk);
    assert_eq!(fs::read(&disk).unwrap(), fs::read(&img).unwrap());
    assert_eq!(moved.json(&["fsck"])["ok"], true);
    assert_eq!(moved.json(&["store", "stats"])["backend"]["kind"], "rados");
    // Resumable: a second run finds everything there.
    let r: serde_json::Value = serde_json::from_str(&env.ok(&args(&into))).unwrap();
    assert_eq!(r["report"]["chunks_copied"], 0, "{r}");
    assert_eq!(r["report"]["records_written"], 0, "{r}");
    // Another store may not migrate into that pool.
    let stranger = Env::new();
    let (_, err) = stranger.fail(&args(&stranger.path("x")));
    assert!(err.contains("migration of another store"), "{err}");
}

fn sh(cmd: &str) {
    let out = Command::new("sh").arg("-c").arg(cmd).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Polls `mirror status NAME` until `done` holds (60 s at most).
fn wait_status(env: &Env, name: &str, what: &str, done: impl Fn(&serde_json::Value) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let s = env.json(&["mirror", "status", name]);
        if done(&s) {
            return;
        }
        assert!(Instant::now() < deadline, "mirror {name}: {what}: {s}");
        std::thread::sleep(Duration::from_millis(300));
    }
}

fn lag_zero(s: &serde_json::Value) -> bool {
    let l = &s["lag"];
    l.is_object() && l["versions"] == 0 && l["refs"] == 0 && l["chunks"] == 0
}

/// Mirrors to a directory (a small tmpfs that fills up) and to a second
/// pool (renamed away for a while), kept by `lamina server`: while a target
/// is full or gone the source keeps working and status shows the error;
/// the mirror stays consistent meanwhile, catches up when the target is
/// back, verifies, and opens as a store holding everything.
#[test]
fn mirrors_catch_up_after_an_outage_and_open_as_stores() {
    let Some(conf) = cluster() else { return };
    if !common::require(common::is_root(), "root (a tmpfs that fills up)") {
        return;
    }
    let env = Env::new();
    let certs = Certs::new(&env.path("certs"));
    let src = env.path("src");
    tree(&src, 7);
    env.create("os/base", "os", "tree");
    env.import("os/base", &src);

    let mnt = env.path("nfs");
    fs::create_dir_all(&mnt).unwrap();
    sh(&format!(
        "mount -t tmpfs -o size=16m lamina-test {}",
        mnt.display()
    ));
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(mnt.clone());
    let dir_target = format!("dir:{}", mnt.join("mirror").display());
    env.ok(&["mirror", "add", "nfs", &dir_target]);
    let pool = TestPool::new(&conf, "mirror");
    env.ok(&[
        "mirror".as_ref(),
        "add".as_ref(),
        "ceph".as_ref(),
        format!("rados:{}", pool.name).as_ref(),
        "--ceph-conf".as_ref(),
        conf.as_os_str(),
    ]);
    let ls = env.json(&["mirror", "ls"]);
    assert_eq!(ls["mirrors"].as_array().unwrap().len(), 2, "{ls}");
    for m in ["nfs", "ceph"] {
        assert!(lag_zero(&env.json(&["mirror", "status", m])), "{m}");
    }

    let server = Server::spawn(
        &env.store,
        &certs,
        "127.0.0.1:0",
        &["server", "--mirror-interval", "300ms"],
    );
    // The directory fills up, the pool goes away.
    let renamed = format!("{}-away", pool.name);
    sh(&format!(
        "timeout 60 ceph -c {} osd pool rename {} {renamed}",
        conf.display(),
        pool.name
    ));
    write(&src.join("big.bin"), &random_bytes(24 << 20, 3));
    env.import("os/base", &src);
    wait_status(&env, "nfs", "an error once full", |s| {
        s["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("space"))
    });
    wait_status(&env, "ceph", "an error while the pool is gone", |s| {
        s["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("does not exist"))
    });
    // The source keeps working, and each mirror is consistent, only behind.
    write(&src.join("more"), b"more");
    env.import("os/base", &src);
    let behind = env.json(&["mirror", "status", "nfs"]);
    assert!(behind["lag"]["versions"].as_u64().unwrap() >= 2, "{behind}");
    let nfs = Env {
        dir: tempfile::tempdir().unwrap(),
        store: mnt.join("mirror"),
        pool: None,
    };
    assert_eq!(nfs.json(&["fsck"])["ok"], true);

    // The targets come back; the server's passes catch up.
    sh(&format!("mount -o remount,size=64m {}", mnt.display()));
    sh(&format!(
        "timeout 60 ceph -c {} osd pool rename {renamed} {}",
        conf.display(),
        pool.name
    ));
    for m in ["nfs", "ceph"] {
        wait_status(&env, m, "caught up", lag_zero);
        let v = env.json(&["mirror", "verify", m]);
        assert_eq!(v["ok"], true, "{v}");
        let s = env.json(&["mirror", "status", m]);
        assert!(s["last_error"].is_null(), "{s}");
    }
    assert_eq!(server.stop().code(), Some(0));

    // Each mirror opens as a store of its own, with everything.
    let out = Command::new(common::bin())
        .arg("--json")
        .arg("--store")
        .arg(format!("dir:{}", mnt.join("mirror").display()))
        .args(["layer", "log", "os/base"])
        .env_remove("LAMINA_STORE")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let by_dir: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(by_dir, env.json(&["layer", "log", "os/base"]));
    let on_pool = Env::on_pool(TestPool {
        name: pool.name.clone(),
        conf: conf.clone(),
    });
    for m in [&nfs, &on_pool] {
        let out = m.path(&format!("out-{}", rand::random::<u32>()));
        m.export("os/base", &out);
        compare_trees(&src, &out);
        // Mirror definitions are not copied.
        assert_eq!(m.json(&["mirror", "ls"])["mirrors"], serde_json::json!([]));
    }
    std::mem::forget(on_pool.pool);
    env.ok(&["mirror", "rm", "nfs"]);
    assert_eq!(
        env.json(&["mirror", "ls"])["mirrors"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
}

/// A cluster of its own, for killing its OSD; purged on drop.
struct OwnCluster {
    dir: std::path::PathBuf,
}

impl OwnCluster {
    fn script() -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/ceph.sh")
    }

    fn up(dir: &Path) -> bool {
        Command::new("bash")
            .arg(Self::script())
            .args(["up"])
            .arg(dir)
            .envs([
                ("CEPH_MON_PORT", "6795"),
                ("CEPH_MON_V2_PORT", "3305"),
                ("CEPH_PORT_MIN", "7600"),
                ("CEPH_PORT_MAX", "7900"),
                ("CEPH_BLOCK_GB", "8"),
            ])
            .status()
            .is_ok_and(|s| s.success())
    }

    fn osd_pid(&self) -> i32 {
        fs::read_to_string(self.dir.join("run/osd.0.pid"))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }
}

impl Drop for OwnCluster {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(Self::script())
            .arg("purge")
            .arg(&self.dir)
            .status();
    }
}

/// The OSD killed in the middle of an import: the import fails within the
/// store's timeout, the ref is unchanged; with the OSD back, fsck is clean
/// and the import goes through.
#[test]
fn an_osd_killed_mid_import_fails_it_cleanly_and_loses_nothing() {
    if cluster().is_none() {
        return;
    }
    let dir = tempfile::Builder::new()
        .prefix("lamina-own-ceph-")
        .tempdir()
        .unwrap();
    let own = OwnCluster {
        dir: dir.path().join("cluster"),
    };
    assert!(OwnCluster::up(&own.dir), "a second cluster starts");
    let conf = own.dir.join("ceph.conf");
    let env = Env::empty();
    env.ok(&[
        "init".as_ref(),
        "--backend".as_ref(),
        "rados".as_ref(),
        "--pool".as_ref(),
        "faults".as_ref(),
        "--ceph-conf".as_ref(),
        conf.as_os_str(),
        "--ceph-timeout".as_ref(),
        "5".as_ref(),
    ]);
    let src = env.path("src");
    tree(&src, 1);
    env.create("os/a", "os", "tree");
    let v1 = env.import("os/a", &src);
    write(&src.join("big.bin"), &random_bytes(384 << 20, 11));
    let child = env
        .cmd()
        .args(["layer", "import", "os/a"])
        .arg(&src)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(400));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(own.osd_pid()),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let t = Instant::now();
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "the import cannot finish without its OSD"
    );
    assert!(t.elapsed() < Duration::from_secs(120), "{:?}", t.elapsed());
    assert!(err.contains("RADOS pool faults"), "{err}");
    assert!(OwnCluster::up(&own.dir), "the OSD comes back");
    let log = env.json(&["layer", "log", "os/a"]);
    assert_eq!(log["versions"].as_array().unwrap().len(), 1, "{log}");
    assert_eq!(log["versions"][0]["id"], v1.as_str());
    assert_eq!(env.json(&["fsck"])["ok"], true);
    env.import("os/a", &src);
    let out = env.path("out");
    env.export("os/a", &out);
    compare_trees(&src, &out);
    assert_eq!(env.json(&["fsck"])["ok"], true);
}

/// gc through one directory while another imports into the same pool: gc
/// waits for the import's hold (or the import for gc), nothing the import
/// wrote is swept, and what the removed layer held is.
#[test]
fn gc_on_one_server_is_safe_while_another_imports() {
    let Some(conf) = cluster() else { return };
    let a = Env::on_pool(TestPool::new(&conf, "gc"));
    let b = a.join();
    let old = a.path("old");
    write(&old.join("old.bin"), &random_bytes(8 << 20, 21));
    a.create("old", "data", "tree");
    a.import("old", &old);
    a.ok(&["layer", "rm", "old"]);
    let src = b.path("src");
    write(&src.join("new.bin"), &random_bytes(192 << 20, 22));
    b.create("new", "data", "tree");
    let import = b
        .cmd()
        .args(["--json", "layer", "import", "new"])
        .arg(&src)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let gc = a.json(&["gc", "--expire-reflog", "0"]);
    let out = import.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        gc["chunks_removed"].as_u64().unwrap() >= 100,
        "the old layer went: {gc}"
    );
    assert_eq!(a.json(&["fsck"])["ok"], true);
    let back = a.path("back");
    a.export("new", &back);
    compare_trees(&src, &back);
    // A second gc finds nothing of the new layer to remove.
    let gc = b.json(&["gc"]);
    assert_eq!(gc["chunks_removed"], 0, "{gc}");
}
