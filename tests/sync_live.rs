//! The laptop side running: `lamina sync --watch` checking in a mounted
//! composition and a served disk while they are written to, working
//! offline while the server is down, and a pulled `os` layer reaching the
//! next mount.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::fs;
use std::io::Write;
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::fuse::fuse_ok;
use common::net::{Central, Laptop};
use common::{require, write, Env};
use serde_json::Value;

/// A running `lamina sync origin --watch`.
struct Watch(Child);

impl Watch {
    fn start(l: &Laptop) -> Watch {
        Watch(
            l.env
                .cmd()
                .env("LAMINA_HOST", &l.host)
                .args(["--json", "sync", "origin", "--watch", "--interval", "1s"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        )
    }

    /// SIGTERM; the daemon ends its round and exits 0.
    fn stop(mut self) {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.0.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(s) = self.0.try_wait().unwrap() {
                assert!(s.success(), "watch exited with {s}");
                return;
            }
            assert!(Instant::now() < deadline, "watch did not stop on SIGTERM");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Polls `cond` until it holds (deadline: 90 s).
fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(90);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The files of `spec` in `env` (exported to a scratch directory).
fn files(env: &Env, spec: &str) -> Option<std::collections::BTreeMap<String, Vec<u8>>> {
    let out = env.path(&format!("x-{}", rand::random::<u32>()));
    if !env
        .run(&[
            "layer".as_ref(),
            "export".as_ref(),
            spec.as_ref(),
            out.as_os_str(),
        ])
        .status
        .success()
    {
        return None;
    }
    let mut map = std::collections::BTreeMap::new();
    for e in fs::read_dir(&out).unwrap() {
        let p = e.unwrap().path();
        if p.is_file() {
            map.insert(
                p.file_name().unwrap().to_string_lossy().into_owned(),
                fs::read(&p).unwrap(),
            );
        }
    }
    fs::remove_dir_all(&out).unwrap();
    Some(map)
}

fn status(l: &Laptop) -> Value {
    l.env.json(&["sync", "--status", "origin"])["remotes"][0].clone()
}

#[test]
fn watch_checks_in_a_mounted_composition_while_it_is_written() {
    if !fuse_ok() {
        return;
    }
    let c = Central::new();
    let tok = c.user("alice", &[]);
    let src = c.env.path("data");
    write(&src.join("start.txt"), b"start\n");
    c.env.create("user/alice/data", "data", "tree");
    c.env.import("user/alice/data", &src);
    let server = c.start();
    let l = Laptop::new("laptop", &server.url(), &tok, &c.certs.ca);
    l.sync("pull", &["user/alice/data"]);
    l.env.ok(&[
        "compose",
        "create",
        "desk",
        "--layer",
        "data=user/alice/data",
    ]);
    let m = l.env.mount("desk");
    let watch = Watch::start(&l);

    // A writer keeps writing: a log it appends to and new files.
    let stop = Arc::new(AtomicBool::new(false));
    let dir = m.dir.clone();
    let s2 = stop.clone();
    let writer = std::thread::spawn(move || {
        let mut log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("log.txt"))
            .unwrap();
        let mut n = 0u32;
        while !s2.load(Ordering::SeqCst) {
            writeln!(log, "line {n}").unwrap();
            log.flush().unwrap();
            if n.is_multiple_of(10) {
                fs::write(dir.join(format!("f-{n}.txt")), format!("file {n}\n")).unwrap();
            }
            n += 1;
            std::thread::sleep(Duration::from_millis(20));
        }
        n
    });
    // Check-ins reach the server while the writer goes on.
    eventually("a check-in with the writer's files", || {
        files(&c.env, "user/alice/data").is_some_and(|f| f.contains_key("f-50.txt"))
    });
    assert!(!writer.is_finished(), "the writer stopped");
    stop.store(true, Ordering::SeqCst);
    let lines = writer.join().unwrap();
    // Once quiet, the server ends with exactly what the mount shows.
    let want: std::collections::BTreeMap<String, Vec<u8>> = fs::read_dir(&m.dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .map(|p| {
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                fs::read(&p).unwrap(),
            )
        })
        .collect();
    assert!(want["log.txt"].ends_with(format!("line {}\n", lines - 1).as_bytes()));
    eventually("the server to hold what the mount shows", || {
        files(&c.env, "user/alice/data").as_ref() == Some(&want)
    });
    watch.stop();
    let st = status(&l);
    assert_eq!(st["watch"]["state"], "online", "{st}");
    assert!(
        st["queued"]
            .as_array()
            .unwrap()
            .iter()
            .all(|q| q["versions"] == 0),
        "{st}"
    );
    // The mount still shows the same; after unmounting, a commit finds
    // nothing new and the uppers go.
    m.umount();
    l.env.ok(&["commit", "desk"]);
    assert_eq!(files(&l.env, "user/alice/data").unwrap(), want);
    for e in [&l.env, &c.env] {
        assert_eq!(e.json(&["fsck"])["ok"], true);
    }
    drop(server);
}

#[test]
fn watch_works_offline_then_catches_up() {
    let c = Central::new();
    let tok = c.user("alice", &[]);
    let src = c.env.path("data");
    write(&src.join("a"), b"a\n");
    c.env.create("user/alice/notes", "data", "tree");
    c.env.import("user/alice/notes", &src);
    let server = c.start();
    let addr = server.addr;
    let l = Laptop::new("laptop", &server.url(), &tok, &c.certs.ca);
    l.sync("pull", &["user/alice/notes"]);
    let watch = Watch::start(&l);
    eventually("a first round", || status(&l)["watch"]["state"] == "online");
    assert_eq!(server.stop().code(), Some(0));

    // Offline: two local versions queue up; the daemon says so.
    for (i, text) in ["b\n", "c\n"].iter().enumerate() {
        write(&src.join(format!("offline-{i}")), text.as_bytes());
        l.env.import("user/alice/notes", &src);
    }
    eventually(
        "the daemon to report offline with 2 queued versions",
        || {
            let s = status(&l);
            s["watch"]["state"] == "offline"
                && s["queued"][0]["versions"] == 2
                && s["watch"]["last_error"]
                    .as_str()
                    .is_some_and(|e| e.contains("cannot connect"))
        },
    );
    let text = l.env.ok(&["sync", "--status"]);
    assert!(
        text.contains("offline") && text.contains("2 versions queued"),
        "{text}"
    );

    // Back online: the queue drains by itself.
    let server = c.start_at(addr);
    eventually("the queued versions on the server", || {
        files(&c.env, "user/alice/notes").is_some_and(|f| f.contains_key("offline-1"))
    });
    eventually("the daemon back online", || {
        let s = status(&l);
        s["watch"]["state"] == "online" && s["queued"][0]["versions"] == 0
    });
    watch.stop();
    drop(server);
}

#[test]
fn a_pulled_os_layer_reaches_the_next_mount() {
    if !fuse_ok() {
        return;
    }
    let c = Central::new();
    let tok = c.user("alice", &[]);
    let os = c.env.path("os");
    write(&os.join("etc/os-release"), b"v1\n");
    c.env.create("os/base", "os", "tree");
    c.env.import("os/base", &os);
    c.env.ok(&["layer", "grant", "os/base", "alice", "read"]);
    let server = c.start();
    let l = Laptop::new("laptop", &server.url(), &tok, &c.certs.ca);
    l.sync("pull", &["os/base"]);
    l.env.create("user/alice/data", "data", "tree");
    l.env.ok(&[
        "compose",
        "create",
        "desk",
        "--layer",
        "os=os/base",
        "--layer",
        "data=user/alice/data",
    ]);
    let m = l.env.mount("desk");
    write(&m.p("home/alice/doc.txt"), b"mine\n");
    m.umount();
    // The admin pushes a new OS; the laptop's next pull and mount show it,
    // with the user's own (uncommitted and committed) work unchanged.
    write(&os.join("etc/os-release"), b"v2\n");
    write(&os.join("usr/bin/new-tool"), b"tool\n");
    c.env.import("os/base", &os);
    let r = l.sync("pull", &["os/base"]);
    assert_eq!(r["layers"][0]["action"], "fast-forward", "{r}");
    let m = l.env.mount("desk");
    assert_eq!(fs::read(m.p("etc/os-release")).unwrap(), b"v2\n");
    assert_eq!(fs::read(m.p("usr/bin/new-tool")).unwrap(), b"tool\n");
    assert_eq!(fs::read(m.p("home/alice/doc.txt")).unwrap(), b"mine\n");
    m.umount();
    l.env.ok(&["commit", "desk"]);
    let data = l.env.path("data-out");
    l.env.export("user/alice/data", &data);
    assert_eq!(
        fs::read(data.join("home/alice/doc.txt")).unwrap(),
        b"mine\n"
    );
    assert!(
        !data.join("etc/os-release").exists(),
        "os files leaked into the data layer"
    );
    drop(server);
}

#[test]
fn watch_checks_in_a_served_disk_while_a_client_writes() {
    if !require(
        std::process::Command::new("qemu-io")
            .arg("--version")
            .output()
            .is_ok(),
        "qemu-io (qemu-utils)",
    ) {
        return;
    }
    let c = Central::new();
    let tok = c.user("alice", &[]);
    let img = c.env.path("disk.raw");
    write(&img, &common::random_bytes(8 << 20, 5));
    c.env.create("user/alice/disk", "data", "disk");
    c.env.import("user/alice/disk", &img);
    let server = c.start();
    let l = Laptop::new("laptop", &server.url(), &tok, &c.certs.ca);
    l.sync("pull", &["user/alice/disk"]);
    l.env
        .ok(&["disk", "create", "vm", "--base", "user/alice/disk"]);
    let sock = l.env.path("nbd.sock");
    let mut serve = l
        .env
        .cmd()
        .args(["serve", "--socket"])
        .arg(&sock)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(serve.stdout.as_mut().unwrap()),
        &mut line,
    )
    .unwrap();
    let uri = format!("nbd+unix:///vm?socket={}", sock.display());
    let qemu_io = |cmd: &str| {
        let out = std::process::Command::new("qemu-io")
            .args(["-f", "raw", "-c", cmd, &uri])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "qemu-io {cmd}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let watch = Watch::start(&l);
    // Writes keep coming while check-ins happen.
    for (i, pattern) in (0..12).zip([0x11u8, 0x22, 0x33].iter().cycle()) {
        qemu_io(&format!("write -P {pattern} {}M 256k", i % 8));
        std::thread::sleep(Duration::from_millis(150));
    }
    qemu_io("write -P 0x77 7M 64k");
    let final_img = l.env.path("final.raw");
    let out = std::process::Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw", &uri])
        .arg(&final_img)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let want = fs::read(&final_img).unwrap();
    let got = c.env.path("got.raw");
    eventually("the server to hold the served disk's content", || {
        let _ = fs::remove_file(&got);
        c.env.run(&[
            "layer".as_ref(),
            "export".as_ref(),
            "user/alice/disk".as_ref(),
            got.as_os_str(),
        ]);
        fs::read(&got).is_ok_and(|g| g == want)
    });
    watch.stop();
    serve.kill().unwrap();
    serve.wait().unwrap();
    for e in [&l.env, &c.env] {
        assert_eq!(e.json(&["fsck"])["ok"], true);
    }
    drop(server);
}
