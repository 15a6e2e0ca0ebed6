//! End-to-end tests of the disk view (issue #3) against real NBD clients:
//! qemu-img, qemu-io, nbdinfo, nbdcopy and libnbd's Python bindings.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::fs;
use std::path::Path;

use common::*;

const MIB: u64 = 1 << 20;

/// A 64 MiB raw image with data, holes and zeros at known places.
fn base_image(path: &Path) {
    let f = fs::File::create(path).unwrap();
    f.set_len(64 * MIB).unwrap();
    drop(f);
    overwrite(path, 0, &random_bytes(MIB as usize, 1));
    overwrite(path, 10 * MIB, &b"lamina base ".repeat(40_000));
    overwrite(path, 40 * MIB, &random_bytes(3 * 65536 + 4096, 2));
}

/// A store with layer `os/base` (the image above) and disk `vm` over it.
fn disk_env() -> (Env, std::path::PathBuf) {
    let env = Env::new();
    let base = env.path("base.raw");
    base_image(&base);
    env.create("os/base", "os", "disk");
    env.import("os/base", &base);
    env.ok(&["disk", "create", "vm", "--base", "os/base"]);
    (env, base)
}

#[test]
fn qemu_img_reads_and_writes_exports_over_tcp_and_unix() {
    let (env, base) = disk_env();
    let server = Server::start(&env, &[]);
    let b = base.to_str().unwrap();
    for uri in [
        server.unix_uri("vm"),
        server.tcp_uri("vm"),
        server.unix_uri("os/base@head"),
    ] {
        let out = run_ok("qemu-img", &["compare", "-f", "raw", "-F", "raw", b, &uri]);
        assert!(out.contains("identical"), "{uri}: {out}");
    }
    // convert from the export, and a whole new image into it.
    let copy = env.path("copy.raw");
    run_ok(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            &server.tcp_uri("vm"),
            copy.to_str().unwrap(),
        ],
    );
    assert_eq!(fs::read(&copy).unwrap(), fs::read(&base).unwrap());
    let other = env.path("other.raw");
    fs::write(&other, random_bytes(64 * MIB as usize, 9)).unwrap();
    run_ok(
        "qemu-img",
        &[
            "convert",
            "-n",
            "-f",
            "raw",
            "-O",
            "raw",
            other.to_str().unwrap(),
            &server.unix_uri("vm"),
        ],
    );
    let out = run_ok(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            other.to_str().unwrap(),
            &server.tcp_uri("vm"),
        ],
    );
    assert!(out.contains("identical"), "{out}");
    // A layer version is read-only.
    let out = std::process::Command::new("qemu-io")
        .args([
            "-f",
            "raw",
            "-c",
            "write 0 4096",
            &server.unix_uri("os/base@head"),
        ])
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    // qemu refuses to open a read-only export for writing.
    assert!(
        text.contains("read-only")
            || text.contains("Operation not permitted")
            || text.contains("Permission denied"),
        "{text}"
    );
}

#[test]
fn qemu_io_patterns_block_status_and_the_dirty_map() {
    let (env, _base) = disk_env();
    let server = Server::start(&env, &[]);
    let uri = server.unix_uri("vm");
    qemu_io(
        "raw",
        &uri,
        &[
            "write -P 0xa1 4096 8192",
            "write -P 0xb2 20M 1M",
            "write -z 10M 65536",
            "discard 40M 131072",
            "flush",
        ],
    );
    let out = qemu_io(
        "raw",
        &uri,
        &[
            "read -P 0xa1 4096 8192",
            "read -P 0xb2 20M 1M",
            "read -P 0 10M 65536",
            "read -P 0 40M 131072",
        ],
    );
    assert!(!out.contains("failed"), "{out}");
    // Allocation: the base's data and holes show through the overlay.
    let map = run_ok("nbdinfo", &["--map", "--json", &uri]);
    let map: serde_json::Value = serde_json::from_str(&map).unwrap();
    let at = |off: u64| {
        map.as_array()
            .unwrap()
            .iter()
            .find(|e| {
                e["offset"].as_u64().unwrap() <= off
                    && off < e["offset"].as_u64().unwrap() + e["length"].as_u64().unwrap()
            })
            .map(|e| e["type"].as_u64().unwrap())
            .unwrap()
    };
    assert_eq!(at(0), 0, "base data");
    assert_eq!(at(5 * MIB), 3, "base hole");
    assert_eq!(at(20 * MIB), 0, "written");
    assert_eq!(at(10 * MIB) & 2, 2, "zeroed");
    assert_eq!(at(40 * MIB) & 2, 2, "discarded");
    // The dirty map lists exactly the written sectors.
    let dirty = run_ok(
        "nbdinfo",
        &["--map=qemu:dirty-bitmap:lamina", "--json", &uri],
    );
    let dirty: serde_json::Value = serde_json::from_str(&dirty).unwrap();
    let ranges: Vec<(u64, u64)> = dirty
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["type"].as_u64() == Some(1))
        .map(|e| (e["offset"].as_u64().unwrap(), e["length"].as_u64().unwrap()))
        .collect();
    assert_eq!(
        ranges,
        vec![
            (4096, 8192),
            (10 * MIB, 65536),
            (20 * MIB, MIB),
            (40 * MIB, 131072)
        ]
    );
    let status = env.json(&["disk", "status", "vm"]);
    assert_eq!(status["clusters"], 1 + 1 + 16 + 2);
    assert_eq!(status["sector_bytes"], 8192 + 65536 + MIB + 131072);
}

#[test]
fn nbdcopy_copies_both_ways() {
    let (env, _base) = disk_env();
    let server = Server::start(&env, &[]);
    let src = env.path("src.raw");
    let data = random_bytes(64 * MIB as usize, 4);
    fs::write(&src, &data).unwrap();
    run_ok("nbdcopy", &[src.to_str().unwrap(), &server.unix_uri("vm")]);
    let back = env.path("back.raw");
    run_ok("nbdcopy", &[&server.tcp_uri("vm"), back.to_str().unwrap()]);
    assert!(fs::read(&back).unwrap() == data);
    // Many connections at once.
    let back4 = env.path("back4.raw");
    run_ok(
        "nbdcopy",
        &[
            "--connections=4",
            "--requests=16",
            &server.unix_uri("vm"),
            back4.to_str().unwrap(),
        ],
    );
    assert!(fs::read(&back4).unwrap() == data);
}

/// Protocol details through libnbd (Python), run with Debian's python3.
const PROTOCOL_SCRIPT: &str = r#"
import errno, sys, nbd
uri_rw, uri_ro = sys.argv[1], sys.argv[2]

def expect_error(fn, code, what):
    # libnbd reports errno by name ("ENOTSUP"); accept the number's aliases.
    names = {n for n, v in vars(errno).items() if n.startswith("E") and v == code}
    try:
        fn()
    except nbd.Error as e:
        assert e.errno == code or e.errno in names, f"{what}: errno {e.errno} ({e}), expected {names}"
        return
    raise AssertionError(f"{what}: no error")

h = nbd.NBD()
h.set_strict_mode(0)          # send what the server must refuse
h.add_meta_context("base:allocation")
h.add_meta_context("qemu:dirty-bitmap:lamina")
h.connect_uri(uri_rw)
size = h.get_size()
assert h.can_meta_context("base:allocation") and h.can_meta_context("qemu:dirty-bitmap:lamina")
assert h.can_multi_conn() and h.can_fua() and h.can_trim() and h.can_zero() and h.can_fast_zero() and h.can_df()
assert h.get_block_size(nbd.SIZE_MINIMUM) == 512 and h.get_block_size(nbd.SIZE_MAXIMUM) == 64 << 20

# FUA write, then read back.
h.pwrite(b"\x5a" * 65536, 1 << 20, nbd.CMD_FLAG_FUA)
assert h.pread(65536, 1 << 20) == b"\x5a" * 65536

# Trim and write-zeroes (with NO_HOLE and FAST_ZERO) read back as zeros.
h.pwrite(b"\x11" * (1 << 20), 8 << 20)
h.trim(1 << 20, 8 << 20)
h.zero(65536, (8 << 20) + 65536, nbd.CMD_FLAG_NO_HOLE)
h.zero(65536, (8 << 20) + 3 * 65536, nbd.CMD_FLAG_FAST_ZERO)
assert h.pread(1 << 20, 8 << 20) == bytes(1 << 20)
expect_error(lambda: h.zero(4096, 512, nbd.CMD_FLAG_FAST_ZERO), errno.ENOTSUP, "unaligned fast zero")

# Structured reads: a hole comes back as a hole chunk.
kinds = []
def chunk(buf, offset, status, err):
    kinds.append(status)
    return 0
h.pread_structured(1 << 20, 9 << 20, chunk)
assert nbd.READ_HOLE in kinds, kinds

# Block status, also with REQ_ONE.
seen = {}
def extents(meta, offset, ents, err):
    seen.setdefault(meta, []).append(list(ents))
    return 0
h.block_status(4 << 20, 0, extents)
assert "base:allocation" in seen and "qemu:dirty-bitmap:lamina" in seen
seen.clear()
h.block_status(4 << 20, 0, extents, nbd.CMD_FLAG_REQ_ONE)
for meta, lists in seen.items():
    assert len(lists[0]) == 2, (meta, lists)   # exactly one (length, flags) pair

# Bad requests: errors, and the connection stays usable.
expect_error(lambda: h.pread(512, size), errno.EINVAL, "read past the end")
expect_error(lambda: h.pwrite(b"x" * 512, size), errno.ENOSPC, "write past the end")
expect_error(lambda: h.pread(512, 100), errno.EINVAL, "unaligned read")
# (Requests over the maximum: libnbd will not send them; see
# `requests_over_the_maximum_get_an_error_and_the_connection_goes_on`.)
expect_error(lambda: h.trim(512, size), errno.EINVAL, "trim past the end")
assert h.pread(512, 0) is not None

# Many requests in flight on one connection, completed out of order.
bufs = [nbd.Buffer(4096) for _ in range(64)]
cookies = [h.aio_pread(bufs[i], (i * 7919 % 4096) * 4096) for i in range(64)]
while h.aio_in_flight() > 0:
    h.poll(-1)
for c in cookies:
    assert h.aio_command_completed(c)
h.shutdown()

# A read-only export refuses writes with EPERM.
r = nbd.NBD()
r.set_strict_mode(0)
r.connect_uri(uri_ro)
assert r.is_read_only()
expect_error(lambda: r.pwrite(b"x" * 512, 0), errno.EPERM, "write to a read-only export")
expect_error(lambda: r.trim(512, 0), errno.EPERM, "trim of a read-only export")
r.shutdown()

# Option negotiation: list exports, info without going.
l = nbd.NBD()
l.set_opt_mode(True)
l.connect_uri(uri_rw)
names = []
l.opt_list(lambda name, desc: names.append(name) or 0)
assert "vm" in names and any(n.startswith("os/base@") for n in names), names
l.set_export_name("no-such-export")
try:
    l.opt_info()
    raise AssertionError("info on a missing export succeeded")
except nbd.Error:
    pass
l.set_export_name("vm")
l.opt_info()
assert l.get_size() == size
contexts = []
l.opt_list_meta_context(lambda name: contexts.append(name) or 0)
assert set(contexts) == {"base:allocation", "qemu:dirty-bitmap:lamina"}, contexts
l.opt_abort()
print("ok")
"#;

#[test]
fn libnbd_sees_the_protocol_as_specified() {
    let (env, _base) = disk_env();
    let server = Server::start(&env, &[]);
    let out = python_nbd(
        PROTOCOL_SCRIPT,
        &[&server.unix_uri("vm"), &server.unix_uri("os/base@head")],
    );
    assert_eq!(out.trim(), "ok");
}

/// Raw socket: an unknown option gets ERR_UNSUP and the session goes on;
/// a client vanishing mid-write leaves the disk consistent.
const RAW_SCRIPT: &str = r#"
import socket, struct, sys
path = sys.argv[1]
s = socket.socket(socket.AF_UNIX)
s.connect(path)
def recv(n):
    b = b""
    while len(b) < n:
        c = s.recv(n - len(b))
        assert c, "server closed"
        b += c
    return b
magic, opt, flags = struct.unpack(">QQH", recv(18))
assert magic == 0x4e42444d41474943 and opt == 0x49484156454F5054 and flags & 1
s.sendall(struct.pack(">I", 1 | 2))
IHAVEOPT = 0x49484156454F5054
def option(o, data=b""):
    s.sendall(struct.pack(">QII", IHAVEOPT, o, len(data)) + data)
    m, ro, rt, rl = struct.unpack(">QIII", recv(20))
    assert m == 0x3e889045565a9 and ro == o, (hex(m), ro)
    return rt, recv(rl)
rt, msg = option(999, b"junk")
assert rt == (1 << 31) + 1, rt           # ERR_UNSUP
rt, _ = option(8)                        # STRUCTURED_REPLY still works
assert rt == 1
rt, _ = option(5)                        # STARTTLS without TLS configured
assert rt in ((1 << 31) + 1, (1 << 31) + 2), rt
name = b"vm"
rt, _ = option(7, struct.pack(">I", len(name)) + name + struct.pack(">H", 0))
while rt == 3:                           # REP_INFO ... then ACK
    m, ro, rt, rl = struct.unpack(">QIII", recv(20)); recv(rl)
assert rt == 1, rt
# A write of 1 MiB whose payload stops half-way, then the client vanishes.
s.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 1, 1, 16 << 20, 1 << 20) + b"\xee" * (512 << 10))
s.close()
print("ok")
"#;

#[test]
fn unknown_options_and_vanishing_clients_are_handled() {
    let (env, _base) = disk_env();
    let mut server = Server::start(&env, &[]);
    let out = python_nbd(RAW_SCRIPT, &[server.socket.to_str().unwrap()]);
    assert_eq!(out.trim(), "ok");
    // The server is still up and the half-sent write was never applied.
    let out = qemu_io("raw", &server.unix_uri("vm"), &["read -P 0 16M 1M"]);
    assert!(!out.contains("failed"), "{out}");
    assert!(server.stop().success());
    let disk = env.json(&["disk", "show", "vm"]);
    let overlay = env.store.join("disks");
    let overlay = fs::read_dir(&overlay)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path()
        .join("overlay.qcow2");
    run_ok("qemu-img", &["check", overlay.to_str().unwrap()]);
    assert_eq!(disk["name"], "vm");
}

#[test]
fn flushed_writes_survive_kill_9_across_connections() {
    let (env, _base) = disk_env();
    let mut server = Server::start(&env, &[]);
    // Write on one connection, flush on another (CAN_MULTI_CONN), kill -9.
    let script = r#"
import sys, nbd
a, b = nbd.NBD(), nbd.NBD()
a.connect_uri(sys.argv[1]); b.connect_uri(sys.argv[1])
a.pwrite(b"\xc3" * (3 << 20), 30 << 20)
a.pwrite(b"\x3c" * 4096, 5 << 20)
b.flush()
print("ok")
"#;
    assert_eq!(python_nbd(script, &[&server.unix_uri("vm")]).trim(), "ok");
    server.kill9();
    // The block map covers the writes, and they read back after a restart.
    let status = env.json(&["disk", "status", "vm"]);
    assert!(status["clusters"].as_u64().unwrap() >= 49, "{status}");
    let mut server = Server::start(&env, &[]);
    let out = qemu_io(
        "raw",
        &server.unix_uri("vm"),
        &["read -P 0xc3 30M 3M", "read -P 0x3c 5M 4096"],
    );
    assert!(!out.contains("failed"), "{out}");
    assert!(server.stop().success());
    // The restart repaired the overlay and the clean stop closed it.
    let overlay = fs::read_dir(env.store.join("disks"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path()
        .join("overlay.qcow2");
    run_ok("qemu-img", &["check", overlay.to_str().unwrap()]);
}

#[test]
fn disk_commit_reset_and_remove() {
    let (env, _base) = disk_env();
    let mut server = Server::start(&env, &[]);
    let uri = server.unix_uri("vm");
    qemu_io("raw", &uri, &["write -P 0x77 1M 2M", "write -z 0 65536"]);
    // Serving holds the disk: reset and rm refuse, naming the holder.
    for args in [vec!["disk", "reset", "vm"], vec!["disk", "rm", "vm"]] {
        let (code, err) = env.fail(&args);
        assert_eq!(code, 1);
        assert!(
            err.contains("in use by") && err.contains("lamina serve"),
            "{err}"
        );
    }
    let seen = env.path("seen.raw");
    run_ok(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            &uri,
            seen.to_str().unwrap(),
        ],
    );
    // A commit while served is made by the server; the overlay stays.
    let c = env.json(&["disk", "commit", "vm", "-m", "changes"]);
    assert_eq!(c["clusters"], 33);
    assert_eq!(c["live"], true);
    let version = c["version"].as_str().unwrap().to_owned();
    // The new version holds exactly what the client last saw.
    let out = env.path("out.raw");
    env.export(&format!("os/base@{}", &version[..12]), &out);
    assert!(fs::read(&out).unwrap() == fs::read(&seen).unwrap());
    assert_eq!(env.json(&["disk", "status", "vm"])["clusters"], 0);
    assert!(server.stop().success());
    // A reset would drop committed changes from the disk: refused.
    let (code, err) = env.fail(&["disk", "reset", "vm"]);
    assert_eq!(code, 2);
    assert!(err.contains("committed while served"), "{err}");
    // Unserved, a commit settles the disk onto that version.
    let c = env.json(&["disk", "commit", "vm", "-m", "settle"]);
    assert_eq!(
        (c["clusters"].as_u64(), c["live"].as_bool()),
        (Some(0), Some(false))
    );
    assert_eq!(c["version"], version.as_str());
    let show = env.json(&["disk", "show", "vm"]);
    assert_eq!(show["base"]["version"], version.as_str());
    // And as qcow2: qemu-img check clean, same bytes.
    let q = env.path("out.qcow2");
    env.export("os/base", &q);
    run_ok("qemu-img", &["check", q.to_str().unwrap()]);
    assert!(run_ok(
        "qemu-img",
        &[
            "compare",
            "-f",
            "qcow2",
            "-F",
            "raw",
            q.to_str().unwrap(),
            out.to_str().unwrap()
        ]
    )
    .contains("identical"));
    // Reset drops new changes.
    let mut server = Server::start(&env, &[]);
    qemu_io("raw", &server.unix_uri("vm"), &["write -P 0x99 0 1M"]);
    assert!(server.stop().success());
    env.ok(&["disk", "reset", "vm"]);
    let server = Server::start(&env, &[]);
    let back = env.path("back.raw");
    run_ok(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            &server.unix_uri("vm"),
            back.to_str().unwrap(),
        ],
    );
    drop(server);
    assert!(fs::read(&back).unwrap() == fs::read(&seen).unwrap());
    // A second disk cannot be based on a tree layer; a smaller size fails.
    env.create("t", "data", "tree");
    let (code, err) = env.fail(&["disk", "create", "x", "--base", "t", "--size", "1M"]);
    assert_ne!(code, 0);
    assert!(err.contains("tree") || err.contains("no version"), "{err}");
    let (_, err) = env.fail(&["disk", "create", "y", "--base", "os/base", "--size", "1M"]);
    assert!(err.contains("smaller than the base"), "{err}");
    let (_, err) = env.fail(&["disk", "create", "vm", "--base", "os/base"]);
    assert!(err.contains("already exists"), "{err}");
    env.ok(&["disk", "rm", "vm"]);
    assert!(env.json(&["disk", "ls"])["disks"]
        .as_array()
        .unwrap()
        .is_empty());
    assert_eq!(env.json(&["fsck"])["ok"], true);
}

/// `disk commit` prunes the cluster cache in `STORE/cache` and must leave
/// what other parts keep there alone: the file view materialises lower
/// files in `STORE/cache/files` (a directory). It once tried to remove that
/// directory and failed every commit in a store that had mounted a
/// composition.
#[test]
fn disk_commit_leaves_other_caches_alone() {
    let (env, _base) = disk_env();
    let files = env.store.join("cache/files");
    fs::create_dir_all(&files).unwrap();
    fs::write(files.join("kept"), b"a materialised lower file").unwrap();
    let mut server = Server::start(&env, &[]);
    qemu_io("raw", &server.unix_uri("vm"), &["write -P 0x55 0 1M"]);
    assert!(server.stop().success());
    // Serving cached clusters of the disk's base version.
    let cluster_caches = || -> Vec<String> {
        fs::read_dir(env.store.join("cache"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".raw") || n.ends_with(".present"))
            .collect()
    };
    assert_eq!(cluster_caches().len(), 2, "{:?}", cluster_caches());
    let c = env.json(&["disk", "commit", "vm", "-m", "changes"]);
    assert!(c["clusters"].as_u64().unwrap() > 0, "{c}");
    // The base moved to the new version: the old version's cache went, the
    // file view's stayed.
    assert_eq!(cluster_caches(), Vec::<String>::new());
    assert_eq!(
        fs::read(files.join("kept")).unwrap(),
        b"a materialised lower file"
    );
    env.ok(&["disk", "rm", "vm"]);
    assert!(files.join("kept").exists());
}

#[test]
fn serve_file_like_qemu_nbd_with_chains_and_refuse_bad_images() {
    let env = Env::new();
    let dir = env.dir.path();
    let raw = env.path("base.raw");
    base_image(&raw);
    let top = env.path("top.qcow2");
    run_ok(
        "qemu-img",
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            "base.raw",
            "-F",
            "raw",
            top.to_str().unwrap(),
        ],
    );
    qemu_io("qcow2", top.to_str().unwrap(), &["write -P 0x42 2M 1M"]);
    let mut server = Server::start(&env, &["--file", top.to_str().unwrap()]);
    let uri = format!("nbd+unix:///?socket={}", server.socket.display());
    let out = run_ok(
        "qemu-img",
        &[
            "compare",
            "-f",
            "qcow2",
            "-F",
            "raw",
            top.to_str().unwrap(),
            &uri,
        ],
    );
    assert!(out.contains("identical"), "{out}");
    qemu_io("raw", &uri, &["write -P 0x43 8M 64k"]);
    assert!(server.stop().success());
    run_ok("qemu-img", &["check", top.to_str().unwrap()]);
    let out = qemu_io(
        "qcow2",
        top.to_str().unwrap(),
        &["read -P 0x43 8M 64k", "read -P 0x42 2M 1M"],
    );
    assert!(!out.contains("failed"), "{out}");
    // Import the chain as a layer; export it back as qcow2.
    env.create("imported", "os", "disk");
    env.import("imported", &top);
    let q = env.path("re.qcow2");
    env.export("imported", &q);
    run_ok("qemu-img", &["check", q.to_str().unwrap()]);
    assert!(run_ok(
        "qemu-img",
        &["compare", q.to_str().unwrap(), top.to_str().unwrap()]
    )
    .contains("identical"));
    // Bad images are refused at open with the reason.
    let snap = dir.join("snap.qcow2");
    run_ok(
        "qemu-img",
        &["create", "-f", "qcow2", snap.to_str().unwrap(), "16M"],
    );
    run_ok(
        "qemu-img",
        &["snapshot", "-c", "s1", snap.to_str().unwrap()],
    );
    let corrupt = dir.join("corrupt.qcow2");
    let mut bytes = fs::read(&q).unwrap();
    bytes[40..48].copy_from_slice(&(1u64 << 50).to_be_bytes());
    fs::write(&corrupt, &bytes).unwrap();
    for (img, reason) in [(&snap, "snapshot"), (&corrupt, "L1 table")] {
        let out = env
            .cmd()
            .args(["serve", "--socket"])
            .arg(dir.join("bad.sock"))
            .arg("--file")
            .arg(img)
            .output()
            .unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(reason), "{err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    }
}

#[test]
fn tls_is_required_when_configured() {
    let (env, _base) = disk_env();
    let dir = env.dir.path();
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    run_ok(
        "openssl",
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-keyout",
            key.to_str().unwrap(),
            "-out",
            cert.to_str().unwrap(),
        ],
    );
    let server = Server::start(
        &env,
        &[
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ],
    );
    let plain = std::process::Command::new("nbdinfo")
        .arg(server.unix_uri("vm"))
        .output()
        .unwrap();
    assert!(!plain.status.success(), "plain connection accepted");
    let tls_uri = format!(
        "nbds+unix:///vm?socket={}&tls-verify-peer=false",
        server.socket.display()
    );
    let out = run_ok("nbdinfo", &["--json", &tls_uri]);
    assert!(out.contains("\"export-size\": 67108864"), "{out}");
}

#[test]
fn blank_disks_and_commits_to_another_layer() {
    let env = Env::new();
    env.ok(&["disk", "create", "blank", "--size", "8M"]);
    let (code, err) = env.fail(&["disk", "create", "odd", "--size", "1000"]);
    assert_eq!(code, 2, "{err}");
    let mut server = Server::start(&env, &[]);
    qemu_io("raw", &server.unix_uri("blank"), &["write -P 0x5c 1M 64k"]);
    assert!(server.stop().success());
    // A disk without a base needs to be told where its commit goes.
    let (code, err) = env.fail(&["disk", "commit", "blank"]);
    assert_eq!(code, 2);
    assert!(err.contains("--to"), "{err}");
    env.create("golden", "os", "disk");
    let c = env.json(&[
        "disk",
        "commit",
        "blank",
        "--to",
        "golden",
        "-m",
        "from a blank disk",
    ]);
    assert_eq!(c["layer"], "golden");
    let out = env.path("golden.raw");
    env.export("golden", &out);
    let mut want = vec![0u8; 8 << 20];
    want[1 << 20..(1 << 20) + 65536].fill(0x5c);
    assert!(fs::read(&out).unwrap() == want);
    // The disk now sits on the new version, and a tree layer cannot take it.
    assert_eq!(
        env.json(&["disk", "show", "blank"])["base"]["layer"],
        "golden"
    );
    env.create("tree", "data", "tree");
    let (_, err) = env.fail(&["disk", "commit", "blank", "--to", "tree"]);
    assert!(err.contains("not a disk layer"), "{err}");
}

/// One write and one read of 48 MiB each (more than the 2^25 bytes every
/// server must take), read back over structured and simple replies.
const HUGE_SCRIPT: &str = r#"
import random, sys, nbd
uri, keep = sys.argv[1], sys.argv[2]
n = 48 << 20
data = random.Random(15).randbytes(n)
open(keep, "wb").write(data)
h = nbd.NBD()
h.connect_uri(uri)
h.pwrite(data, 8 << 20)
assert h.pread(n, 8 << 20) == data, "structured read back"
h.flush()
assert h.get_block_size(nbd.SIZE_MAXIMUM) >= n, h.get_block_size(nbd.SIZE_MAXIMUM)
h.shutdown()
s = nbd.NBD()
s.set_request_structured_replies(False)
s.connect_uri(uri)
assert not s.get_structured_replies_negotiated()
assert s.pread(n, 8 << 20) == data, "simple read back"
s.shutdown()
print("ok")
"#;

/// Issue 15, point 8: nbd-tester-client's `integrityhuge` sends requests
/// up to 47.6 MiB, which the server refused (its cap was 32 MiB).
#[test]
fn requests_of_48_mib_write_and_read_back_in_one_call() {
    let (env, _base) = disk_env();
    let mut server = Server::start(&env, &[]);
    let want = env.path("want.raw");
    let out = python_nbd(
        HUGE_SCRIPT,
        &[&server.unix_uri("vm"), want.to_str().unwrap()],
    );
    assert_eq!(out.trim(), "ok");
    // The data landed where it was written, for another client too.
    let got = env.path("got.raw");
    run_ok("nbdcopy", &[&server.unix_uri("vm"), got.to_str().unwrap()]);
    let got = fs::read(&got).unwrap();
    assert!(got[8 * MIB as usize..56 * MIB as usize] == fs::read(&want).unwrap()[..]);
    assert!(server.stop().success());
}

/// Raw socket: a read and a write over the advertised maximum payload get
/// errors (EOVERFLOW for the read, EINVAL for the write, whose payload the
/// server skips), and the connection goes on serving requests.
const OVER_MAX_SCRIPT: &str = r#"
import socket, struct, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
def recv(n):
    b = b""
    while len(b) < n:
        c = s.recv(n - len(b))
        assert c, "server closed"
        b += c
    return b
recv(18)
s.sendall(struct.pack(">I", 1 | 2))
def option(o, data=b""):
    s.sendall(struct.pack(">QII", 0x49484156454F5054, o, len(data)) + data)
def reply():
    m, ro, rt, rl = struct.unpack(">QIII", recv(20))
    assert m == 0x3e889045565a9, hex(m)
    return rt, recv(rl)
option(8)                                # STRUCTURED_REPLY
assert reply()[0] == 1
name = b"big"                            # GO, asking for INFO_BLOCK_SIZE
option(7, struct.pack(">I", len(name)) + name + struct.pack(">HH", 1, 3))
maximum = None
while True:
    rt, d = reply()
    if rt != 3:
        break
    if struct.unpack(">H", d[:2])[0] == 3:
        _, _, maximum = struct.unpack(">III", d[2:14])
assert rt == 1, rt
assert maximum and maximum >= 48 << 20, maximum
def request(kind, offset, length, payload=b"", cookie=7):
    s.sendall(struct.pack(">IHHQQI", 0x25609513, 0, kind, cookie, offset, length) + payload)
def answer():
    # (error, data) of one reply, simple or structured.
    data, error = b"", 0
    while True:
        magic = struct.unpack(">I", recv(4))[0]
        if magic == 0x67446698:
            error, _ = struct.unpack(">IQ", recv(12))
            return error, data
        assert magic == 0x668e33ef, hex(magic)
        flags, kind, _, length = struct.unpack(">HHQI", recv(16))
        body = recv(length)
        if kind == 1:                    # OFFSET_DATA
            data += body[8:]
        elif kind == (1 << 15) + 1:      # ERROR
            error = struct.unpack(">I", body[:4])[0]
        if flags & 1:
            return error, data
over = maximum + 512
request(0, 0, over)
assert answer()[0] == 75, "read over the maximum: EOVERFLOW"
request(1, 0, over, b"\xee" * over)
assert answer()[0] == 22, "write over the maximum: EINVAL"
request(1, 0, 4096, b"\xab" * 4096)
assert answer() == (0, b""), "a write after them"
request(0, 0, 8192)
assert answer() == (0, b"\xab" * 4096 + bytes(4096)), "a read after them"
request(2, 0, 0)                         # DISC
print("ok")
"#;

#[test]
fn requests_over_the_maximum_get_an_error_and_the_connection_goes_on() {
    let env = Env::new();
    env.ok(&["disk", "create", "big", "--size", "256M"]);
    let mut server = Server::start(&env, &[]);
    let out = python_nbd(OVER_MAX_SCRIPT, &[server.socket.to_str().unwrap()]);
    assert_eq!(out.trim(), "ok");
    // Nothing of the refused write reached the disk.
    let out = qemu_io("raw", &server.unix_uri("big"), &["read -P 0 8192 1M"]);
    assert!(!out.contains("failed"), "{out}");
    assert!(server.stop().success());
}
