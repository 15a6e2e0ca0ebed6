//! Sync under faults: connections cut at 30/60/90 % of a transfer, a byte
//! flipped on the wire, the server killed mid-push, the client killed
//! mid-pull, a stale head, a corrupt chunk in the sender's store. Nothing
//! acknowledged is lost, refs never move half-way, fsck stays clean, and a
//! re-run sends only what is still missing.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::fs;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::net::{Central, Faults, Laptop, Proxy};
use common::{random_bytes, write, Env};
use serde_json::Value;

const CL: usize = 65536;
/// Clusters of the test disk (64 MiB).
const CLUSTERS: usize = 1024;
/// Bytes of one fetch batch (the most a cut can cost a pull).
const FETCH_BATCH: u64 = 256 * CL as u64;
/// Bytes of one upload batch (the most a cut can cost a push).
const UPLOAD_BATCH: u64 = 8 << 20;

fn fsck_ok(env: &Env) -> Value {
    let r = env.json(&["fsck"]);
    assert_eq!(r["ok"], true, "fsck: {r}");
    r
}

fn report<'a>(r: &'a Value, l: &str) -> &'a Value {
    r["layers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["layer"] == l)
        .unwrap()
}

/// A central store with a 64 MiB disk layer `vm/disk` alice may write, and
/// a proxy in front of its server.
fn setup() -> (
    Central,
    std::path::PathBuf,
    common::net::Server,
    Proxy,
    Vec<u8>,
) {
    let c = Central::new();
    let tok = c.user("alice", &[]);
    let img = c.env.path("disk.raw");
    let data = random_bytes(CLUSTERS * CL, 42);
    write(&img, &data);
    c.env.create("vm/disk", "data", "disk");
    c.env.import("vm/disk", &img);
    c.env.ok(&["layer", "grant", "vm/disk", "alice", "write"]);
    let server = c.start();
    let proxy = Proxy::new(server.addr);
    (c, tok, server, proxy, data)
}

fn head(env: &Env, layer: &str) -> Option<String> {
    let log = env.run(&["--json", "layer", "log", layer]);
    if !log.status.success() {
        return None;
    }
    let v: Value = serde_json::from_slice(&log.stdout).unwrap();
    v["versions"][0]["id"].as_str().map(str::to_owned)
}

fn exported(env: &Env, layer: &str) -> Vec<u8> {
    let p = env.path(&format!("e-{}.raw", rand::random::<u32>()));
    env.export(layer, &p);
    let d = fs::read(&p).unwrap();
    fs::remove_file(&p).unwrap();
    d
}

#[test]
fn pulls_survive_cuts_flips_and_a_killed_client() {
    let (c, tok, _server, proxy, data) = setup();
    let laptop = || Laptop::new("l", &proxy.url(), &tok, &c.certs.ca);

    // A clean check-out: what a whole transfer costs.
    let clean = laptop();
    clean.sync("pull", &["vm/disk"]);
    let total = proxy.down.load(Ordering::SeqCst);
    assert!(total > (CLUSTERS * CL) as u64, "{total}");
    assert_eq!(exported(&clean.env, "vm/disk"), data);

    // Cut at 30, 60 and 90 %: the retry resumes; at most the batch in
    // flight travels twice.
    for pct in [30u64, 60, 90] {
        let l = laptop();
        proxy.set_faults(Faults {
            cut_downstream_at: Some(total * pct / 100),
            ..Faults::default()
        });
        l.sync("pull", &["vm/disk"]);
        assert!(proxy.fired.load(Ordering::SeqCst), "no cut at {pct} %");
        let moved = proxy.down.load(Ordering::SeqCst);
        assert!(
            moved <= total + FETCH_BATCH + (1 << 20),
            "cut at {pct} %: {moved} bytes for a {total}-byte transfer"
        );
        assert_eq!(exported(&l.env, "vm/disk"), data, "cut at {pct} %");
        fsck_ok(&l.env);
    }

    // Without retries the cut fails the pull in one line; nothing is
    // checked out, what arrived stays, and the re-run fetches the rest.
    let l = laptop();
    proxy.set_faults(Faults {
        cut_downstream_at: Some(total * 60 / 100),
        ..Faults::default()
    });
    let (code, err) = l.sync_fails("pull", &["vm/disk", "--retries", "0"]);
    assert_eq!(code, 1);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("remote origin"), "{err}");
    assert!(
        head(&l.env, "vm/disk").is_none(),
        "a ref moved on a failed pull"
    );
    let stored = fsck_ok(&l.env)["chunks_checked"].as_u64().unwrap();
    assert!(stored > 0, "no batch was kept");
    proxy.set_faults(Faults::default());
    l.sync("pull", &["vm/disk"]);
    let rest = proxy.down.load(Ordering::SeqCst);
    assert!(
        rest < total * 55 / 100 + FETCH_BATCH,
        "re-run moved {rest} of {total}"
    );
    assert_eq!(exported(&l.env, "vm/disk"), data);

    // A byte flipped on the wire breaks TLS, not the data: retried.
    let l = laptop();
    proxy.set_faults(Faults {
        flip_downstream_at: Some(total / 2),
        ..Faults::default()
    });
    l.sync("pull", &["vm/disk"]);
    assert!(proxy.fired.load(Ordering::SeqCst));
    assert_eq!(exported(&l.env, "vm/disk"), data);
    fsck_ok(&l.env);

    // The client killed mid-pull (slowed so it can be caught).
    let l = laptop();
    proxy.set_faults(Faults {
        delay: Some(Duration::from_millis(3)),
        ..Faults::default()
    });
    let mut child = l
        .env
        .cmd()
        .args(["pull", "origin", "vm/disk"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while proxy.down.load(Ordering::SeqCst) < total / 2 {
        assert!(Instant::now() < deadline, "the pull did not get half-way");
        assert!(child.try_wait().unwrap().is_none(), "the pull ended early");
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(head(&l.env, "vm/disk").is_none());
    fsck_ok(&l.env);
    proxy.set_faults(Faults::default());
    l.sync("pull", &["vm/disk"]);
    let rest = proxy.down.load(Ordering::SeqCst);
    assert!(
        rest < total * 50 / 100 + 2 * FETCH_BATCH,
        "re-run moved {rest} of {total}"
    );
    assert_eq!(exported(&l.env, "vm/disk"), data);
    fsck_ok(&l.env);
}

/// Rewrites `n` clusters from `first` with bytes of `seed`; returns the
/// image.
fn change(l: &Laptop, first: usize, n: usize, seed: u64) -> Vec<u8> {
    let img = l.env.path(&format!("c-{seed}.raw"));
    l.env.export("vm/disk", &img);
    let mut d = fs::read(&img).unwrap();
    for c in first..first + n {
        d[c * CL..(c + 1) * CL].copy_from_slice(&random_bytes(CL, seed * 10_000 + c as u64));
    }
    fs::write(&img, &d).unwrap();
    l.env.import("vm/disk", &img);
    fs::remove_file(&img).unwrap();
    d
}

#[test]
fn pushes_survive_cuts_a_killed_server_stale_heads_and_bad_chunks() {
    let (c, tok, server, proxy, _) = setup();
    let l = Laptop::new("l", &proxy.url(), &tok, &c.certs.ca);
    l.sync("pull", &["vm/disk"]);
    // 256 changed clusters: 16 MiB to push.
    let changed = 256usize;
    let want = (changed * CL) as u64;

    for (i, pct) in [30u64, 60, 90].into_iter().enumerate() {
        let d = change(&l, i * changed, changed, i as u64 + 1);
        proxy.set_faults(Faults {
            cut_upstream_at: Some(want * pct / 100),
            ..Faults::default()
        });
        let r = l.sync("push", &["vm/disk"]);
        assert_eq!(report(&r, "vm/disk")["action"], "pushed");
        assert!(proxy.fired.load(Ordering::SeqCst), "no cut at {pct} %");
        let moved = proxy.up.load(Ordering::SeqCst);
        assert!(
            moved <= want + UPLOAD_BATCH + (1 << 20),
            "cut at {pct} %: {moved} bytes sent for {want} changed"
        );
        assert_eq!(exported(&c.env, "vm/disk"), d, "cut at {pct} %");
    }

    // The server killed with -9 mid-push: its head does not move, fsck is
    // clean, and the re-run sends only what did not arrive.
    let before = head(&c.env, "vm/disk");
    let d = change(&l, 768, changed, 9);
    proxy.set_faults(Faults {
        delay: Some(Duration::from_millis(3)),
        ..Faults::default()
    });
    let child = l
        .env
        .cmd()
        .args(["push", "origin", "vm/disk", "--retries", "0"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while proxy.up.load(Ordering::SeqCst) < want / 2 {
        assert!(Instant::now() < deadline, "the push did not get half-way");
        std::thread::sleep(Duration::from_millis(5));
    }
    let addr = server.addr;
    server.kill9();
    let sent_before = proxy.up.load(Ordering::SeqCst);
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert_eq!(head(&c.env, "vm/disk"), before, "the server's head moved");
    fsck_ok(&c.env);
    fsck_ok(&l.env);
    let server = c.start_at(addr);
    proxy.set_faults(Faults::default());
    l.sync("push", &["vm/disk"]);
    let rest = proxy.up.load(Ordering::SeqCst);
    assert!(
        rest + sent_before <= want + 2 * UPLOAD_BATCH + (2 << 20),
        "{sent_before} sent before the kill, {rest} after, for {want}"
    );
    assert_eq!(exported(&c.env, "vm/disk"), d);

    // A stale head: the admin moved it meanwhile; push refuses, sync merges.
    let admin_img = c.env.path("admin.raw");
    c.env.export("vm/disk", &admin_img);
    let mut ad = fs::read(&admin_img).unwrap();
    ad[1000 * CL..1001 * CL].fill(0xab);
    fs::write(&admin_img, &ad).unwrap();
    c.env.import("vm/disk", &admin_img);
    let mine = change(&l, 10, 2, 77);
    let (code, err) = l.sync_fails("push", &["vm/disk"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("moved") || err.contains("diverged") || err.contains("expected"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    let r = l.sync("sync", &["vm/disk"]);
    assert_eq!(report(&r, "vm/disk")["action"], "merged", "{r}");
    let merged = exported(&c.env, "vm/disk");
    assert_eq!(&merged[1000 * CL..1001 * CL], &ad[1000 * CL..1001 * CL]);
    assert_eq!(&merged[10 * CL..12 * CL], &mine[10 * CL..12 * CL]);

    // A chunk that rotted in the laptop's store is refused by the server,
    // named, and nothing of it is stored there.
    change(&l, 500, 1, 123);
    let bad = common::packs(&l.env.store)
        .into_iter()
        .max_by_key(|p| fs::metadata(p).unwrap().modified().unwrap())
        .unwrap();
    let mut bytes = fs::read(&bad).unwrap();
    let recs = common::records(&bytes);
    let (off, _, len) = *recs.iter().find(|r| r.2 >= CL).unwrap();
    bytes[off + 48 + len / 2] ^= 0x55;
    fs::write(&bad, &bytes).unwrap();
    let before = head(&c.env, "vm/disk");
    let (code, err) = l.sync_fails("push", &["vm/disk"]);
    assert_eq!(code, 1);
    assert!(err.contains("hashes to"), "{err}");
    assert_eq!(head(&c.env, "vm/disk"), before);
    drop(server);
    fsck_ok(&c.env);
}

#[test]
fn sigterm_lets_requests_in_flight_finish_and_moves_no_ref() {
    let (c, tok, server, proxy, _) = setup();
    let l = Laptop::new("l", &proxy.url(), &tok, &c.certs.ca);
    l.sync("pull", &["vm/disk"]);
    let want = (256 * CL) as u64;
    change(&l, 0, 256, 5);
    let before = head(&c.env, "vm/disk");
    proxy.set_faults(Faults {
        delay: Some(Duration::from_millis(3)),
        ..Faults::default()
    });
    let child = l
        .env
        .cmd()
        .args(["push", "origin", "vm/disk", "--retries", "0"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while proxy.up.load(Ordering::SeqCst) < want / 4 {
        assert!(Instant::now() < deadline, "the push did not get going");
        std::thread::sleep(Duration::from_millis(5));
    }
    let log = server.log.clone();
    // SIGTERM mid-upload: the server stops accepting, finishes what is in
    // flight, and exits 0.
    assert_eq!(server.stop().code(), Some(0));
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success(), "the push cannot have finished");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    let text = fs::read_to_string(&log).unwrap();
    let (_, after) = text
        .split_once("shutting down: waiting for open requests")
        .unwrap_or_else(|| panic!("no shutdown line in the server log:\n{text}"));
    assert!(
        after.contains("/api/v1/upload/vm/disk") && after.contains("status=200"),
        "the upload in flight did not finish:\n{after}"
    );
    assert_eq!(head(&c.env, "vm/disk"), before, "a ref moved");
    fsck_ok(&c.env);
}
