//! Streamed base disks (issue "client side", cache acceleration), with real
//! processes: a `lamina server` over TLS holding the fixture guest's disk
//! grown with 192 MiB of data no boot reads, and a laptop store that
//! creates a disk over it with `--stream` — nothing of the data pulled —
//! and serves it over NBD to QEMU (TCG).
//!
//! Checks that the guest boots from the streamed disk fetching far less
//! than the disk; that with the server gone a read of a cluster not cached
//! fails with an I/O error (it does not hang) while cached ones still read,
//! and that the same read works once the server is back; that a cached
//! cluster damaged on disk is detected and fetched again; that the
//! prefetcher fills the rest in the background; and that the fully cached
//! disk boots again with the server gone.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::guest::{guest, Booted};
use common::net::{Central, Laptop};
use common::{random_bytes, Server};
use serde_json::Value;

const MIB: u64 = 1 << 20;
/// The fixture's ext4 image is 64 MiB; the disk is 256 MiB.
const FS_END: u64 = 64 * MIB;
const DISK: u64 = 256 * MIB;

/// Reads `len` bytes at `offset` of an NBD export with libnbd; Err holds
/// libnbd's error.
fn nbd_read(uri: &str, offset: u64, len: u64) -> Result<Vec<u8>, String> {
    let script = r#"
import nbd, sys
h = nbd.NBD()
h.connect_uri(sys.argv[1])
try:
    sys.stdout.buffer.write(h.pread(int(sys.argv[3]), int(sys.argv[2])))
except nbd.Error as e:
    print("NBD-ERROR errno=%s %s" % (e.errno, e.string), file=sys.stderr)
    sys.exit(3)
"#;
    let out = Command::new("/usr/bin/python3")
        .args(["-c", script, uri, &offset.to_string(), &len.to_string()])
        .output()
        .expect("/usr/bin/python3 with python3-libnbd is needed");
    if out.status.success() {
        Ok(out.stdout)
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

fn stream_of(env: &common::Env) -> Value {
    env.json(&["disk", "show", "vm"])["stream"].clone()
}

/// Waits for a guest that printed LAMINA-GUEST-BOOTED (and is about to
/// mount its disk) to read its disk and go idle, and powers it off;
/// returns its console.
fn finish(mut vm: Booted) -> Vec<String> {
    vm.wait_for("LAMINA-GUEST-READ lamina fixture disk", 240);
    vm.wait_for("LAMINA-GUEST-IDLE", 60);
    let console = vm.console.clone();
    let status = vm.power_off();
    assert!(status.success(), "QEMU exited with {status}");
    console
}

fn boot(guest: &Path, server: &Server, qmp: &Path) {
    let mut vm = Booted::start(guest, &server.unix_uri("vm"), qmp);
    vm.wait_for("LAMINA-GUEST-BOOTED", 240);
    finish(vm);
}

/// The two sides of a streamed disk: a running `lamina server` holding
/// layer os/guest (the fixture guest's file system, then data no boot
/// reads), which alice may read, and alice's laptop with disk `vm` created
/// over it with `--stream`.
struct Streamed {
    c: Central,
    central: common::net::Server,
    laptop: Laptop,
    /// The layer's bytes.
    bytes: Vec<u8>,
    /// What `disk create` answered.
    made: Value,
}

fn streamed(guest: &Path) -> Streamed {
    let c = Central::new();
    let tok = c.user("alice", &[]);
    // The guest's file system, then data no boot reads.
    let image = c.env.path("os.raw");
    let mut bytes = std::fs::read(guest.join("disk.raw")).unwrap();
    assert_eq!(bytes.len() as u64, FS_END);
    bytes.extend(random_bytes((DISK - FS_END) as usize, 11));
    std::fs::write(&image, &bytes).unwrap();
    c.env.create("os/guest", "os", "disk");
    c.env.import("os/guest", &image);
    c.env.ok(&["layer", "grant", "os/guest", "alice", "read"]);
    let central = c.start();
    let laptop = Laptop::new("laptop", &central.url(), &tok, &c.certs.ca);
    // Manifests only: the layer is not in the laptop's store.
    let made = laptop.env.json(&[
        "disk",
        "create",
        "vm",
        "--base",
        "origin:os/guest",
        "--stream",
    ]);
    Streamed {
        c,
        central,
        laptop,
        bytes,
        made,
    }
}

/// Checks every cluster the cache of `vm`'s base holds against the layer's
/// `bytes`; returns how many it holds.
fn check_cache(l: &common::Env, bytes: &[u8]) -> u64 {
    let version = l.json(&["disk", "show", "vm"])["base"]["version"]
        .as_str()
        .unwrap()
        .to_owned();
    let present = std::fs::read(l.store.join(format!("cache/{version}.present"))).unwrap();
    let data = std::fs::File::open(l.store.join(format!("cache/{version}.raw"))).unwrap();
    let cluster = 64 * 1024;
    let mut buf = vec![0u8; cluster];
    let mut held = 0;
    for (w, word) in present.chunks_exact(8).enumerate() {
        let word = u64::from_le_bytes(word.try_into().unwrap());
        for b in (0..64).filter(|b| word & (1 << b) != 0) {
            let at = (w * 64 + b) * cluster;
            data.read_exact_at(&mut buf, at as u64).unwrap();
            assert!(
                buf == bytes[at..at + cluster],
                "cached cluster {} differs from the layer",
                w * 64 + b
            );
            held += 1;
        }
    }
    held
}

#[test]
fn a_guest_boots_from_a_streamed_disk_and_again_offline_once_cached() {
    let Some(guest) = guest() else { return };
    let Streamed {
        c,
        central,
        laptop,
        bytes,
        made,
    } = streamed(guest);
    let addr = central.addr;
    let l = &laptop.env;

    // Only the manifests were fetched.
    assert_eq!(made["size"], DISK, "{made}");
    assert_eq!(made["stream"]["local_clusters"], 0, "{made}");
    let total = made["stream"]["total_clusters"].as_u64().unwrap();
    assert!(total >= (DISK - FS_END) / (64 * 1024), "{made}");
    let (code, err) = l.fail(&["layer", "log", "os/guest"]);
    assert_ne!(code, 0, "the layer was not pulled: {err}");
    let (code, err) = l.fail(&[
        "disk",
        "create",
        "bad",
        "--base",
        "origin:os/nothing",
        "--stream",
    ]);
    assert_ne!(code, 0);
    assert!(err.contains("os/nothing"), "{err}");

    // Boot, fetching only what the guest reads.
    let mut nbd = Server::start(l, &["--no-prefetch"]);
    boot(guest, &nbd, &l.path("qmp.sock"));
    let after_boot = stream_of(l);
    let local = after_boot["local_clusters"].as_u64().unwrap();
    assert!(local > 0, "{after_boot}");
    assert!(
        local * 4 < total,
        "the boot fetched {local} of {total} clusters: {after_boot}"
    );
    eprintln!(
        "boot fetched {local} of {total} clusters ({} KiB of {} KiB)",
        local * 64,
        total * 64
    );

    // The server goes away: cached clusters read, others fail with an I/O
    // error instead of hanging; back again, they read.
    let uri = nbd.unix_uri("vm");
    let near = 100 * MIB;
    let want = |at: u64, len: u64| &bytes[at as usize..(at + len) as usize];
    let got = nbd_read(&uri, near, 64 * 1024).unwrap();
    assert!(got == want(near, 64 * 1024), "streamed data differs");
    central.stop();
    let again = nbd_read(&uri, near, 64 * 1024).expect("a cached cluster reads offline");
    assert!(again == want(near, 64 * 1024), "cached data differs");
    let far = 200 * MIB;
    let t = Instant::now();
    let err = nbd_read(&uri, far, 64 * 1024).expect_err("an uncached read offline fails");
    assert!(err.contains("NBD-ERROR errno=EIO"), "{err}");
    eprintln!("offline miss answered in {:?}: {}", t.elapsed(), err.trim());
    let central = c.start_at(addr);
    let got = nbd_read(&uri, far, 64 * 1024).expect("the server is back");
    assert!(
        got == want(far, 64 * 1024),
        "data after reconnecting differs"
    );
    nbd.stop();

    // A cached cluster damaged on disk is detected and fetched again.
    let version = l.json(&["disk", "show", "vm"])["base"]["version"]
        .as_str()
        .unwrap()
        .to_owned();
    let cache = l.store.join(format!("cache/{version}.raw"));
    std::fs::OpenOptions::new()
        .write(true)
        .open(&cache)
        .unwrap()
        .write_all_at(b"damaged!", far + 100)
        .unwrap();
    let mut nbd = Server::start(l, &[]);
    let uri = nbd.unix_uri("vm");
    let got = nbd_read(&uri, far, 64 * 1024).unwrap();
    assert!(
        got == want(far, 64 * 1024),
        "a damaged cached cluster was served"
    );

    // The prefetcher fills the rest while the disk is served.
    let deadline = Instant::now() + Duration::from_secs(180);
    let filled = loop {
        let s = stream_of(l);
        if s["done"] == true {
            break s;
        }
        assert!(Instant::now() < deadline, "not filled in 180 s: {s}");
        std::thread::sleep(Duration::from_millis(500));
    };
    assert_eq!(filled["local_clusters"], total, "{filled}");
    nbd.stop();

    // Offline again, the cached disk boots and reads whole.
    central.stop();
    let nbd = Server::start(l, &[]);
    boot(guest, &nbd, &l.path("qmp2.sock"));
    let tail = nbd_read(&nbd.unix_uri("vm"), DISK - 4 * MIB, 4 * MIB).unwrap();
    assert!(tail == want(DISK - 4 * MIB, 4 * MIB), "cached tail differs");
}

/// The `lamina server` is killed (SIGKILL) once the booting guest has
/// fetched its first clusters (its partition scan, while its modules load)
/// and printed LAMINA-GUEST-BOOTED, just before it mounts its disk; it is
/// started again on the same address 3 s later. The guest still mounts
/// its disk and reads its file; afterwards the store is sound (fsck),
/// every cached cluster holds the layer's bytes, and `disk show` adds up.
///
/// Observed (TCG, `RUST_LOG=info`): the mount's first fetch fails on the
/// dead connection and is retried by the fetcher after 1, 2 and 4 s (the
/// first two connections refused); the third retry, ~7 s after the first
/// try, reaches the restarted server, so the guest's read waits instead
/// of failing: no I/O error on the guest's console, 5 clusters cached at
/// the kill, 7 after the boot. `disk show` reports `failures: 0` and
/// `fetched_bytes: 0`: only the prefetcher (off here) writes those, and a
/// request that succeeded on a retry is not counted as a failure anyway.
/// An outage longer than the ~7 s of retries would fail the read with EIO
/// instead (what the first test checks with the server gone).
#[test]
fn the_server_killed_mid_boot_and_brought_back_the_guest_still_boots_and_the_cache_is_sound() {
    let Some(guest) = guest() else { return };
    let Streamed {
        c,
        central,
        laptop,
        bytes,
        made,
    } = streamed(guest);
    let addr = central.addr;
    let l = &laptop.env;
    let total = made["stream"]["total_clusters"].as_u64().unwrap();

    // No prefetcher: only the guest's reads fetch, so the outage hits them.
    let mut nbd = Server::start(l, &["--no-prefetch"]);
    // The guest's partition scan fetched the first clusters while its
    // modules loaded; right after BOOTED it mounts the disk.
    let mut vm = Booted::start(guest, &nbd.unix_uri("vm"), &l.path("qmp.sock"));
    vm.wait_for("LAMINA-GUEST-BOOTED", 240);
    central.kill9();
    let away = Instant::now();
    // Nothing arrives while the server is away: what is cached now came
    // before the kill.
    let first = stream_of(l);
    let at_kill = first["local_clusters"].as_u64().unwrap();
    assert!(at_kill > 0, "nothing fetched before BOOTED: {first}");
    eprintln!("killed the server after the first fetch: {first}");
    std::thread::sleep(Duration::from_secs(3));
    let central = c.start_at(addr);
    eprintln!("the server was away {:?}", away.elapsed());

    let console = finish(vm);
    let errors: Vec<&String> = console.iter().filter(|l| l.contains("I/O error")).collect();
    assert!(errors.is_empty(), "reads failed in the outage: {errors:#?}");
    let status = nbd.stop();
    assert!(status.success(), "lamina serve exited with {status}");

    let fsck = l.json(&["fsck"]);
    assert_eq!(fsck["ok"], true, "{fsck}");
    let s = stream_of(l);
    eprintln!("after the boot: {s}");
    let local = s["local_clusters"].as_u64().unwrap();
    assert_eq!(s["total_clusters"], total, "{s}");
    assert!(local <= total, "{s}");
    assert!(
        local > at_kill,
        "the mount fetched nothing after the kill: {s}"
    );
    assert!(s["failures"].is_u64(), "{s}");
    assert_eq!(check_cache(l, &bytes), local, "{s}");
    drop(central);
}
