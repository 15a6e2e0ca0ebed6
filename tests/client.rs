//! The client side against a real `lamina server` over TLS: hotelling
//! (switching a composition and a disk between cached OS layers, eviction),
//! portable bundles run from a copy offline and synced back (tampering
//! refused), and batch dissemination and collection over a group.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::process::Command;

use common::fuse::fuse_ok;
use common::net::{Central, Laptop};
use common::Env;
use serde_json::Value;

fn tree(dir: &Path, files: &[(&str, &str)]) {
    for (rel, text) in files {
        let p = dir.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// A central store with two os tree layers and alice's data layer.
fn central_with_two_oses() -> (Central, std::path::PathBuf) {
    let c = Central::new();
    let tok = c.user("alice", &[]);
    for (layer, kind, text) in [
        ("os/a", "os", "A"),
        ("os/b", "os", "B"),
        ("user/alice/data", "data", ""),
    ] {
        let src = c.env.path(&format!("src-{}", layer.replace('/', "-")));
        if kind == "os" {
            tree(&src, &[("etc/os-release", text), ("usr/bin/tool", text)]);
        } else {
            tree(&src, &[("home/readme.txt", "hello")]);
        }
        c.env.tree_layer(layer, kind, Some(&src));
        let perm = if kind == "os" { "read" } else { "write" };
        c.env.ok(&["layer", "grant", layer, "alice", perm]);
    }
    (c, tok)
}

#[test]
fn hotelling_switches_a_composition_between_cached_oses_offline_and_evicts_the_least_recently_used()
{
    let (c, tok) = central_with_two_oses();
    let server = c.start();
    let addr = server.addr;
    let a = Laptop::new("laptop", &server.url(), &tok, &c.certs.ca);
    a.env.ok(&["hotel", "add", "origin:os/a"]);
    a.env.ok(&["hotel", "add", "origin:os/b"]);
    a.sync("pull", &["user/alice/data"]);
    // Only os layers are hotelled.
    let (code, err) = a.env.fail(&["hotel", "add", "origin:user/alice/data"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("os layers"), "{err}");
    let ls = a.env.json(&["hotel", "ls"]);
    let layers = ls["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 2, "{ls}");
    assert!(
        layers.iter().all(|l| l["bytes"].as_u64().unwrap() > 0),
        "{ls}"
    );
    let sum: u64 = layers.iter().map(|l| l["bytes"].as_u64().unwrap()).sum();
    let total = ls["bytes"].as_u64().unwrap();
    assert!(total > 0 && total <= sum, "shared chunks count once: {ls}");

    a.env.ok(&[
        "compose",
        "create",
        "desk",
        "--layer",
        "os=os/a",
        "--layer",
        "data=user/alice/data",
    ]);
    let fuse = fuse_ok();
    if fuse {
        let m = a.env.mount("desk");
        assert_eq!(read(&m.p("etc/os-release")), "A");
        std::fs::write(m.p("home/notes.txt"), "mine").unwrap();
        m.umount();
    }
    // Offline: a switch downloads nothing.
    server.stop();
    let (code, err) = a.env.fail(&["hotel", "switch", "desk", "os/c"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("not cached"), "{err}");
    let (code, err) = a.env.fail(&["hotel", "switch", "desk", "user/alice/data"]);
    assert_eq!(code, 2, "{err}");
    let s = a.env.json(&["hotel", "switch", "desk", "os/b"]);
    assert_eq!(s["from"], "os/a", "{s}");
    let show = a.env.json(&["compose", "show", "desk"]);
    assert!(show.to_string().contains("os/b"), "{show}");
    if fuse {
        let m = a.env.mount("desk");
        assert_eq!(read(&m.p("etc/os-release")), "B", "the new OS shows");
        assert_eq!(
            read(&m.p("home/notes.txt")),
            "mine",
            "the user's changes stay"
        );
        assert_eq!(read(&m.p("home/readme.txt")), "hello");
        m.umount();
    }
    // In use: refused; not in use: removed and its space freed.
    let (code, err) = a.env.fail(&["hotel", "rm", "os/b"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("composition desk"), "{err}");
    a.env.ok(&["hotel", "rm", "os/a"]);
    let ls = a.env.json(&["hotel", "ls"]);
    assert_eq!(ls["layers"].as_array().unwrap().len(), 1, "{ls}");
    let (code, _) = a.env.fail(&["layer", "log", "os/a"]);
    assert_ne!(code, 0, "os/a is gone from the store");
    let fsck = a.env.json(&["fsck"]);
    assert_eq!(fsck["ok"], true, "{fsck}");

    // A limit evicts the least recently used layer that nothing uses.
    let server = c.start_at(addr);
    a.env.ok(&["hotel", "add", "origin:os/a"]);
    let l = a.env.json(&["hotel", "limit", "3"]);
    assert_eq!(l["evicted"], serde_json::json!(["os/a"]), "{l}");
    let ls = a.env.json(&["hotel", "ls"]);
    assert_eq!(ls["layers"][0]["layer"], "os/b", "{ls}");
    assert_eq!(ls["limit"], 3);
    // Adding past the limit keeps what was just added and what is in use.
    let add = a.env.json(&["hotel", "add", "origin:os/a"]);
    assert_eq!(add["evicted"], serde_json::json!([]), "{add}");
    drop(server);
}

/// libnbd's Python binding of Debian's python3 (nbdsh's own interpreter
/// may be another python on PATH).
const PYTHON: &str = "/usr/bin/python3";

fn nbd_tools() -> bool {
    common::require(
        Command::new(PYTHON)
            .args(["-c", "import nbd"])
            .status()
            .is_ok_and(|s| s.success()),
        "libnbd's python3 binding (apt-get install python3-libnbd)",
    )
}

#[test]
fn a_disk_switches_onto_another_cached_os_only_without_changes_unless_they_are_discarded() {
    let env = Env::new();
    for (layer, seed) in [("os/x", 1u64), ("os/y", 2)] {
        let img = env.path(&format!("{seed}.raw"));
        std::fs::write(&img, common::random_bytes(1 << 20, seed)).unwrap();
        env.create(layer, "os", "disk");
        env.import(layer, &img);
    }
    env.ok(&["disk", "create", "d", "--base", "os/x"]);
    let s = env.json(&["hotel", "switch", "d", "os/y"]);
    assert_eq!(s["kind"], "disk", "{s}");
    let show = env.json(&["disk", "show", "d"]);
    assert_eq!(show["base"]["layer"], "os/y", "{show}");
    if !nbd_tools() {
        return;
    }
    // The disk now reads os/y's bytes.
    let mut srv = common::Server::start(&env, &[]);
    let uri = srv.unix_uri("d");
    let out = Command::new(PYTHON)
        .arg("-c")
        .arg("import nbd, sys; h = nbd.NBD(); h.connect_uri(sys.argv[1]); sys.stdout.buffer.write(h.pread(4096, 0)); h.pwrite(b'x' * 4096, 8192); h.flush(); h.shutdown()")
        .arg(&uri)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.stdout, common::random_bytes(1 << 20, 2)[..4096]);
    srv.stop();
    // A changed disk keeps its changes unless told to drop them.
    let (code, err) = env.fail(&["hotel", "switch", "d", "os/x"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("1 changed clusters"), "{err}");
    env.ok(&["hotel", "switch", "d", "os/x", "--discard-changes"]);
    let st = env.json(&["disk", "status", "d"]);
    assert_eq!(st["clusters"], 0, "{st}");
    // A tree layer is no base for a disk.
    env.create("os/t", "os", "tree");
    let (code, err) = env.fail(&["hotel", "switch", "d", "os/t"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("os disk layer"), "{err}");
}

/// Runs `DIR/lamina-run ARGS` without a controlling terminal and without
/// the test's store, as on another computer.
fn run_bundle(dir: &Path, args: &[&str], token: Option<&str>) -> (bool, String, String) {
    let mut c = Command::new("setsid");
    c.arg("-w").arg(dir.join("lamina-run")).args(args);
    c.env_remove("LAMINA_STORE").env_remove("LAMINA_TOKEN");
    if let Some(t) = token {
        c.env("LAMINA_TOKEN", t);
    }
    let out = c.output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn bundle_ok(dir: &Path, args: &[&str], token: Option<&str>) -> String {
    let (ok, out, err) = run_bundle(dir, args, token);
    assert!(ok, "lamina-run {args:?}: {err}");
    out
}

fn contains_bytes(dir: &Path, needle: &[u8]) -> Option<std::path::PathBuf> {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            if let Some(f) = contains_bytes(&p, needle) {
                return Some(f);
            }
        } else if let Ok(b) = std::fs::read(&p) {
            if b.windows(needle.len()).any(|w| w == needle) {
                return Some(p);
            }
        }
    }
    None
}

fn cp_a(from: &Path, to: &Path) {
    let ok = Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .unwrap();
    assert!(ok.success(), "cp -a {} {}", from.display(), to.display());
}

fn flip_a_byte_in_a_pack(store: &Path) {
    let mut packs = Vec::new();
    let mut stack = vec![store.join("packs")];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            if e.path().is_dir() {
                stack.push(e.path());
            } else if e.path().extension().is_some_and(|x| x == "pack") {
                packs.push(e.path());
            }
        }
    }
    let p = packs
        .iter()
        .max_by_key(|p| std::fs::metadata(p).unwrap().len())
        .expect("a pack file");
    let mut b = std::fs::read(p).unwrap();
    let at = b.len() / 2;
    b[at] ^= 0x40;
    std::fs::write(p, b).unwrap();
}

#[test]
fn a_bundle_runs_offline_from_a_copy_and_checks_its_work_in_and_a_tampered_one_is_refused() {
    if !fuse_ok() {
        return;
    }
    let (c, tok) = central_with_two_oses();
    let token = read(&tok);
    let server = c.start();
    let addr = server.addr;
    let a = Laptop::new("laptop", &server.url(), &tok, &c.certs.ca);
    a.sync("pull", &["os/a", "user/alice/data"]);
    let stick = a.env.path("stick");
    let made = a.env.json(&[
        "bundle",
        "create",
        stick.to_str().unwrap(),
        "--remote",
        "origin",
        "--user",
        "alice",
    ]);
    assert_eq!(made["composition"], "desktop", "{made}");
    assert_eq!(made["layers"].as_array().unwrap().len(), 2, "{made}");
    // The token is nowhere on the stick.
    let secret = token.trim().rsplit('_').next().unwrap();
    assert_eq!(contains_bytes(&stick, secret.as_bytes()), None);
    // A second refusal: a non-empty target.
    let (code, err) = a.env.fail(&[
        "bundle",
        "create",
        stick.to_str().unwrap(),
        "--remote",
        "origin",
        "--user",
        "alice",
    ]);
    assert_eq!(code, 2, "{err}");

    // Another computer: a copy of the stick, no server.
    server.stop();
    let other = tempfile::tempdir().unwrap();
    let copy = other.path().join("stick");
    cp_a(&stick, &copy);
    let check = bundle_ok(&copy, &["check"], None);
    assert!(check.contains("intact"), "{check}");
    let mnt = other.path().join("desk");
    std::fs::create_dir(&mnt).unwrap();
    bundle_ok(&copy, &["mount", mnt.to_str().unwrap()], None);
    assert_eq!(read(&mnt.join("etc/os-release")), "A");
    assert_eq!(read(&mnt.join("home/readme.txt")), "hello");
    std::fs::write(mnt.join("home/offline.txt"), "written on the train").unwrap();
    // Copying the stick while the session runs: the copy is usable or
    // refused in one line, never half-read.
    let during = other.path().join("during");
    cp_a(&copy, &during);
    bundle_ok(&copy, &["umount", mnt.to_str().unwrap()], None);
    let (ok, _, err) = run_bundle(&during, &["check"], None);
    assert!(!err.contains("panicked"), "{err}");
    if !ok {
        assert_eq!(err.trim().lines().count(), 1, "{err}");
    }

    // Back online: sync asks for a token, then checks the work in.
    let (ok, _, err) = run_bundle(&copy, &["sync"], None);
    assert!(!ok);
    assert!(err.contains("LAMINA_TOKEN"), "{err}");
    let server = c.start_at(addr);
    let synced = bundle_ok(&copy, &["--json", "sync"], Some(token.trim()));
    assert!(synced.contains("user/alice/data"), "{synced}");
    let out = c.env.path("central-data");
    c.env
        .ok(&["layer", "export", "user/alice/data", out.to_str().unwrap()]);
    assert_eq!(read(&out.join("home/offline.txt")), "written on the train");
    drop(server);

    // Tampering: a flipped byte in the store, a replaced binary.
    let bad = other.path().join("bad");
    cp_a(&copy, &bad);
    flip_a_byte_in_a_pack(&bad.join("store"));
    let (ok, _, err) = run_bundle(&bad, &["mount", mnt.to_str().unwrap()], None);
    assert!(!ok);
    assert!(err.contains("refused"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    let m: Value = serde_json::from_str(&read(&copy.join("bundle.json"))).unwrap();
    assert_eq!(m["user"], "alice");
    std::fs::copy(copy.join("lamina"), bad.join("lamina")).unwrap();
    let out = Command::new(common::bin())
        .args(["bundle", "check"])
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let mut bin = std::fs::OpenOptions::new()
        .append(true)
        .open(copy.join("lamina"))
        .unwrap();
    std::io::Write::write_all(&mut bin, b"\0").unwrap();
    drop(bin);
    let out = Command::new(common::bin())
        .args(["bundle", "check"])
        .arg(&copy)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("binary"), "{err}");
}

#[test]
fn disseminate_reaches_every_member_and_merges_with_offline_work_and_collect_gathers_it() {
    let c = Central::new();
    let mut toks = Vec::new();
    for u in ["s1", "s2"] {
        toks.push(c.user(u, &["--group", "class"]));
        let layer = format!("user/{u}/data");
        let src = c.env.path(&format!("src-{u}"));
        tree(&src, &[("home/name.txt", u)]);
        c.env.tree_layer(&layer, "data", Some(&src));
        c.env.ok(&["layer", "grant", &layer, u, "write"]);
    }
    let server = c.start();
    let s1 = Laptop::new("s1-laptop", &server.url(), &toks[0], &c.certs.ca);
    s1.sync("pull", &["user/s1/data"]);
    // s1 works offline meanwhile.
    let work = s1.env.path("work");
    tree(
        &work,
        &[("home/name.txt", "s1"), ("home/mine.txt", "my own")],
    );
    s1.env.import("user/s1/data", &work);

    let sheet = c.env.path("worksheet.txt");
    std::fs::write(&sheet, "question 1").unwrap();
    let (code, err) = c
        .env
        .fail(&["disseminate", sheet.to_str().unwrap(), "--to", "class"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("@GROUP"), "{err}");
    let (code, err) = c
        .env
        .fail(&["disseminate", sheet.to_str().unwrap(), "--to", "@nobody"]);
    assert_eq!(code, 2, "{err}");
    let d = c.env.json(&[
        "disseminate",
        sheet.to_str().unwrap(),
        "--to",
        "@class",
        "--at",
        "/assignments",
    ]);
    let members = d["members"].as_array().unwrap();
    assert_eq!(members.len(), 2, "{d}");
    assert!(members.iter().all(|m| m["version"].is_string()), "{d}");

    // s1's sync merges it with the offline work.
    s1.sync("sync", &[]);
    let mine = s1.env.path("mine");
    s1.env
        .ok(&["layer", "export", "user/s1/data", mine.to_str().unwrap()]);
    assert_eq!(read(&mine.join("assignments/worksheet.txt")), "question 1");
    assert_eq!(read(&mine.join("home/mine.txt")), "my own");
    // s1 answers and checks in.
    let answer = s1.env.path("answer");
    tree(
        &answer,
        &[
            ("home/name.txt", "s1"),
            ("home/mine.txt", "my own"),
            ("assignments/worksheet.txt", "question 1: 42"),
        ],
    );
    s1.env.import("user/s1/data", &answer);
    s1.sync("sync", &[]);

    let dest = c.env.path("collected");
    let got = c.env.json(&[
        "collect",
        "/assignments/worksheet.txt",
        "--from",
        "@class",
        dest.to_str().unwrap(),
    ]);
    assert_eq!(got["members"].as_array().unwrap().len(), 2, "{got}");
    assert_eq!(read(&dest.join("s1/worksheet.txt")), "question 1: 42");
    assert_eq!(read(&dest.join("s2/worksheet.txt")), "question 1");
    // A path nobody has is reported, not an error.
    let none = c.env.json(&[
        "collect",
        "/nothing",
        "--from",
        "@class",
        c.env.path("none").to_str().unwrap(),
    ]);
    assert!(
        none["members"]
            .as_array()
            .unwrap()
            .iter()
            .all(|m| m["found"] == false),
        "{none}"
    );
    drop(server);
}

#[test]
fn the_admins_network_policy_reaches_the_laptop_and_narrows_its_vms_offline() {
    let c = Central::new();
    let tok = c.user("alice", &[]);
    let img = c.env.path("os.raw");
    std::fs::write(&img, common::random_bytes(1 << 20, 7)).unwrap();
    c.env.create("os/x", "os", "disk");
    c.env.import("os/x", &img);
    c.env.ok(&["layer", "grant", "os/x", "alice", "read"]);
    let (code, err) = c.env.fail(&["layer", "set", "os/x", "--net", "wide"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--net"), "{err}");
    let set = c.env.json(&[
        "layer",
        "set",
        "os/x",
        "--net",
        "allow:127.0.0.1:9,10.9.9.9:443",
    ]);
    assert_eq!(set["net"], "allow:127.0.0.1:9,10.9.9.9:443", "{set}");
    let server = c.start();
    let addr = server.addr;
    let a = Laptop::new("laptop", &server.url(), &tok, &c.certs.ca);
    a.sync("pull", &["os/x"]);
    server.stop();

    // Offline: the laptop's VM over a disk of os/x gets the admin's list.
    a.env.ok(&["disk", "create", "d", "--base", "os/x"]);
    let sock = a.env.path("nbd.sock");
    let uri = format!("nbd+unix:///d?socket={}", sock.display());
    for (t, net) in [("open", "user"), ("narrow", "allow:127.0.0.1:9,1.2.3.4:80")] {
        a.env.ok(&[
            "vm",
            "template",
            "create",
            t,
            "--profile",
            "pc",
            "--net",
            net,
        ]);
        a.env
            .ok(&["vm", "create", t, "--template", t, "--disk", &uri]);
    }
    let show = a.env.json(&["vm", "show", "open"]);
    assert_eq!(show["net"], "allow:127.0.0.1:9,10.9.9.9:443", "{show}");
    assert_eq!(show["net_policy"]["layer"], "os/x", "{show}");
    assert_eq!(show["net_policy"]["source"], "remote origin", "{show}");
    let show = a.env.json(&["vm", "show", "narrow"]);
    assert_eq!(
        show["net"], "allow:127.0.0.1:9",
        "only what both allow: {show}"
    );

    // The admin lifts it; the next sync brings that too.
    c.env.ok(&["layer", "set", "os/x", "--no-net"]);
    let server = c.start_at(addr);
    a.sync("sync", &[]);
    let show = a.env.json(&["vm", "show", "open"]);
    assert_eq!(show["net"], "user", "{show}");
    assert!(show["net_policy"].is_null(), "{show}");
    drop(server);
}

#[test]
fn a_composition_streams_its_os_layer_and_reads_what_is_missing_from_the_server() {
    if !fuse_ok() {
        return;
    }
    let c = Central::new();
    let tok = c.user("alice", &[]);
    let src = c.env.path("os-src");
    for i in 0..40u64 {
        let p = src.join(format!("usr/lib/f{i}.bin"));
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, common::random_bytes(256 << 10, 100 + i)).unwrap();
    }
    tree(&src, &[("etc/os-release", "streamed")]);
    c.env.tree_layer("os/big", "os", Some(&src));
    c.env.ok(&["layer", "grant", "os/big", "alice", "read"]);
    let data = c.env.path("data-src");
    tree(&data, &[("home/readme.txt", "hello")]);
    c.env.tree_layer("user/alice/data", "data", Some(&data));
    c.env
        .ok(&["layer", "grant", "user/alice/data", "alice", "write"]);
    let server = c.start();
    let addr = server.addr;
    let a = Laptop::new("laptop", &server.url(), &tok, &c.certs.ca);
    a.sync("pull", &["user/alice/data"]);
    let (code, err) = a.env.fail(&[
        "compose",
        "create",
        "desk",
        "--layer",
        "os=origin:os/big",
        "--layer",
        "data=user/alice/data",
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--stream"), "{err}");
    let before = common::dir_size(&a.env.store);
    a.env.ok(&[
        "compose",
        "create",
        "desk",
        "--layer",
        "os=origin:os/big",
        "--layer",
        "data=user/alice/data",
        "--stream",
    ]);
    // Nothing of the data came: the layer is not even here.
    let ls = a.env.json(&["layer", "ls"]);
    assert!(!ls.to_string().contains("os/big"), "{ls}");
    assert!(common::dir_size(&a.env.store) < before + (1 << 20));

    let m = a.env.mount("desk");
    assert_eq!(read(&m.p("etc/os-release")), "streamed");
    assert_eq!(
        std::fs::read(m.p("usr/lib/f3.bin")).unwrap(),
        common::random_bytes(256 << 10, 103)
    );
    assert_eq!(std::fs::read_dir(m.p("usr/lib")).unwrap().count(), 40);
    std::fs::write(m.p("home/notes.txt"), "over a streamed os").unwrap();
    // Offline: what was read still reads; what was not fails with EIO.
    server.stop();
    assert_eq!(
        std::fs::read(m.p("usr/lib/f3.bin")).unwrap(),
        common::random_bytes(256 << 10, 103)
    );
    let err = std::fs::read(m.p("usr/lib/f7.bin")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    // Back online: the same read works.
    let server = c.start_at(addr);
    assert_eq!(
        std::fs::read(m.p("usr/lib/f7.bin")).unwrap(),
        common::random_bytes(256 << 10, 107)
    );
    m.umount();
    let cached = common::dir_size(&a.env.store.join("cache/files"));
    assert!(
        cached < 40 * (256 << 10) / 4,
        "only what was read is cached: {cached}"
    );
    // The user's layer commits over the streamed one.
    let done = a.env.json(&["commit", "desk"]);
    assert!(done.to_string().contains("user/alice/data"), "{done}");
    a.sync("sync", &["user/alice/data"]);
    let out = c.env.path("central-data");
    c.env
        .ok(&["layer", "export", "user/alice/data", out.to_str().unwrap()]);
    assert_eq!(read(&out.join("home/notes.txt")), "over a streamed os");
    // Removing the composition removes what was streamed.
    a.env.ok(&["compose", "rm", "desk"]);
    let left: Vec<_> = std::fs::read_dir(a.env.store.join("stream/trees"))
        .map(|d| d.flatten().collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "{left:?}");
    drop(server);
}
