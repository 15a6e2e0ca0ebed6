//! Two-way differential sync end to end: a `lamina server` process over TLS
//! with generated certificates, laptop stores as separate processes.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::fs;
use std::path::Path;

use common::net::{Central, Laptop};
use common::{compare_trees, random_bytes, write, Env};
use serde_json::Value;

/// A tree of `files` files of 16 KiB in a few directories.
fn make_tree(dir: &Path, files: usize, seed: u64) {
    for i in 0..files {
        write(
            &dir.join(format!("d{}/f{i}.bin", i % 7)),
            &random_bytes(16 * 1024, seed + i as u64),
        );
    }
    write(&dir.join("etc/motd"), b"welcome\n");
}

/// A raw image of `clusters` 64 KiB clusters, every one distinct.
fn make_image(path: &Path, clusters: usize, seed: u64) {
    write(path, &random_bytes(clusters * 65536, seed));
}

fn layer<'a>(r: &'a Value, name: &str) -> &'a Value {
    r["layers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["layer"] == name)
        .unwrap_or_else(|| panic!("no report for {name}: {r}"))
}

fn fsck_ok(env: &Env) {
    let r = env.json(&["fsck"]);
    assert_eq!(r["ok"], true, "fsck: {r}");
}

#[test]
fn check_out_and_in_trees_and_disks_moving_only_differences() {
    let c = Central::new();
    let tok = c.user("alice", &[]);
    let src = c.env.path("os-src");
    make_tree(&src, 200, 1);
    c.env.create("os/base", "os", "tree");
    c.env.import("os/base", &src);
    let img = c.env.path("disk.raw");
    make_image(&img, 256, 7);
    c.env.create("os/disk", "os", "disk");
    c.env.import("os/disk", &img);
    for l in ["os/base", "os/disk"] {
        c.env.ok(&["layer", "grant", l, "alice", "write"]);
    }
    let server = c.start();
    let a = Laptop::new("laptop-a", &server.url(), &tok, &c.certs.ca);

    // Check-out creates both layers here, complete.
    let r = a.sync("pull", &["os/base", "os/disk"]);
    for l in ["os/base", "os/disk"] {
        assert_eq!(layer(&r, l)["action"], "checked-out", "{r}");
    }
    let out = a.env.path("out-tree");
    a.env.export("os/base", &out);
    compare_trees(&src, &out);
    let out_img = a.env.path("out.raw");
    a.env.export("os/disk", &out_img);
    assert_eq!(fs::read(&out_img).unwrap(), fs::read(&img).unwrap());
    fsck_ok(&a.env);

    // Change one file (an insert in its middle) and three clusters; check in.
    let work = a.env.path("work");
    a.env.export("os/base", &work);
    let f = work.join("d3/f10.bin");
    let mut data = fs::read(&f).unwrap();
    data.splice(8000..8000, b"inserted by alice".iter().copied());
    fs::write(&f, &data).unwrap();
    a.env.import("os/base", &work);
    let mut disk = fs::read(&out_img).unwrap();
    for cl in [3usize, 100, 255] {
        disk[cl * 65536..(cl + 1) * 65536].copy_from_slice(&random_bytes(65536, 1000 + cl as u64));
    }
    fs::write(&out_img, &disk).unwrap();
    a.env.import("os/disk", &out_img);
    let r = a.sync("push", &["os/base", "os/disk"]);
    let t = layer(&r, "os/base");
    assert_eq!(t["action"], "pushed", "{r}");
    // One 16 KiB file changed: its chunk and the nodes above it, not the
    // 3.2 MiB tree.
    let tree_sent = t["sent"]["bytes"].as_u64().unwrap();
    assert!(
        tree_sent < 64 * 1024,
        "tree check-in sent {tree_sent} bytes"
    );
    let d = layer(&r, "os/disk");
    assert_eq!(d["action"], "pushed", "{r}");
    let disk_sent = d["sent"]["bytes"].as_u64().unwrap();
    assert!(
        (3 * 65536..3 * 65536 + 48 * 1024).contains(&disk_sent),
        "disk check-in sent {disk_sent} bytes for 3 clusters"
    );
    assert_eq!(d["versions_sent"], 1);

    // The server has exactly the laptop's versions.
    let back = c.env.path("back");
    c.env.export("os/base", &back);
    compare_trees(&work, &back);
    let back_img = c.env.path("back.raw");
    c.env.export("os/disk", &back_img);
    assert_eq!(fs::read(&back_img).unwrap(), disk);

    // A sync right after moves nothing.
    let r = a.sync("sync", &[]);
    for l in ["os/base", "os/disk"] {
        let x = layer(&r, l);
        assert_eq!(x["action"], "up-to-date", "{r}");
        assert_eq!(x["sent"]["records"], 0);
        assert_eq!(x["received"]["records"], 0);
    }
    fsck_ok(&a.env);
    drop(server);
    fsck_ok(&c.env);
    // Every request was logged with its user.
    let remotes = a.env.json(&["remote", "ls"]);
    assert_eq!(remotes["remotes"][0]["user"], "alice");
}

/// `curl` against the server: (HTTP status, body).
fn curl(
    c: &Central,
    token: Option<&str>,
    method: &str,
    url: &str,
    body: Option<&Path>,
) -> (u16, String) {
    common::net::curl(&c.certs.ca, token, method, url, body)
}

fn token(path: &Path) -> String {
    fs::read_to_string(path).unwrap().trim().to_owned()
}

#[test]
fn tokens_grants_and_certificates_are_checked() {
    let c = Central::new();
    let alice = c.user("alice", &["--group", "staff"]);
    let bob = c.user("bob", &[]);
    let small = c.env.path("small");
    write(&small.join("hello"), b"hello\n");
    for (l, k) in [("os/base", "os"), ("user/bob/data", "data")] {
        c.env.create(l, k, "tree");
        c.env.import(l, &small);
    }
    c.env.ok(&["layer", "grant", "os/base", "@staff", "read"]);
    let server = c.start();
    let api = |p: &str| format!("{}/api/v1/{p}", server.url());

    // No token, a forged token, a bad header: 401 before anything else.
    let (code, body) = curl(&c, None, "GET", &api("layers"), None);
    assert_eq!(code, 401, "{body}");
    assert!(body.contains("unauthenticated"), "{body}");
    let forged = format!("lamina_{}_{}", "0".repeat(16), "1".repeat(64));
    assert_eq!(curl(&c, Some(&forged), "GET", &api("layers"), None).0, 401);
    assert_eq!(
        curl(&c, Some("garbage"), "GET", &api("whoami"), None).0,
        401
    );

    // Listings show only what the caller may read.
    let (code, body) = curl(&c, Some(&token(&alice)), "GET", &api("layers"), None);
    assert_eq!(code, 200);
    let names: Vec<String> = serde_json::from_str::<Vec<Value>>(&body)
        .unwrap()
        .iter()
        .map(|l| l["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(names, vec!["os/base"]);

    // alice cannot pull bob's data; bob can; alice cannot push a read-only layer.
    let a = Laptop::new("a", &server.url(), &alice, &c.certs.ca);
    let (code, err) = a.sync_fails("pull", &["user/bob/data"]);
    assert_eq!(code, 1);
    assert!(err.contains("may not read layer `user/bob/data`"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    a.sync("pull", &["os/base"]);
    let work = a.env.path("w");
    a.env.export("os/base", &work);
    write(&work.join("mine"), b"alice\n");
    a.env.import("os/base", &work);
    let (_, err) = a.sync_fails("push", &["os/base"]);
    assert!(err.contains("may not write layer `os/base`"), "{err}");
    let b = Laptop::new("b", &server.url(), &bob, &c.certs.ca);
    b.sync("pull", &["user/bob/data"]);
    let (_, err) = b.sync_fails("pull", &["os/base"]);
    assert!(err.contains("may not read layer `os/base`"), "{err}");

    // An expired token and a revoked one.
    let exp = c
        .env
        .json(&["token", "create", "alice", "--expires", "1ns"]);
    assert_eq!(
        curl(&c, exp["token"].as_str(), "GET", &api("whoami"), None).0,
        401
    );
    let t = c.env.json(&["token", "create", "bob"]);
    assert_eq!(
        curl(&c, t["token"].as_str(), "GET", &api("whoami"), None).0,
        200
    );
    c.env.ok(&["token", "revoke", t["id"].as_str().unwrap()]);
    assert_eq!(
        curl(&c, t["token"].as_str(), "GET", &api("whoami"), None).0,
        401
    );

    // A certificate from another CA, a plain-HTTP URL, plain HTTP to TLS.
    let e = Env::new();
    let add = |url: &str, extra: &[&str]| {
        let mut args: Vec<std::ffi::OsString> = vec![
            "remote".into(),
            "add".into(),
            "r".into(),
            url.into(),
            "--token-file".into(),
            alice.clone().into(),
        ];
        args.extend(extra.iter().map(|x| x.into()));
        e.fail(&args)
    };
    let (code, err) = add(&server.url(), &["--ca", c.certs.other_ca.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(err.contains("is not trusted"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    let plain = server.url().replace("https://", "http://");
    let (code, err) = add(&plain, &[]);
    assert_eq!(code, 2);
    assert!(err.contains("plain-HTTP URL"), "{err}");
    let (code, err) = add(&plain, &["--insecure"]);
    assert_eq!(code, 1);
    assert!(err.contains("speaks TLS: use an https:// URL"), "{err}");
    assert!(e.json(&["remote", "ls"])["remotes"]
        .as_array()
        .unwrap()
        .is_empty());

    // Malformed and oversized bodies: 400 and 413, in the JSON envelope.
    let bad = c.env.path("bad.json");
    fs::write(&bad, b"{not json").unwrap();
    let tok = token(&alice);
    let (code, body) = curl(&c, Some(&tok), "POST", &api("versions/os/base"), Some(&bad));
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("malformed JSON"), "{body}");
    let big = c.env.path("big.json");
    fs::write(&big, vec![b' '; 17 * 1024 * 1024]).unwrap();
    // (HTTP/1.1: curl 7.88 reports an HTTP/2 stream the server ends early as
    // an error; with 1.1 and `Expect: 100-continue` it reads the answer.)
    let (code, body) = curl(
        &c,
        Some(&tok),
        "POST --http1.1",
        &api("versions/os/base"),
        Some(&big),
    );
    assert_eq!(code, 413, "{body}");
    assert!(body.contains("too-large"), "{body}");
    let ids = c.env.path("ids.bin");
    fs::write(&ids, [7u8; 33]).unwrap();
    assert_eq!(
        curl(&c, Some(&tok), "POST", &api("fetch/os/base"), Some(&ids)).0,
        400
    );

    // A chunk whose bytes do not match its id is refused and not stored.
    let btok = token(&bob);
    let id = [0x5au8; 32];
    let mut rec = b"LMCK\0\0\0\0".to_vec();
    rec.extend_from_slice(&5u32.to_le_bytes());
    rec.extend_from_slice(&5u32.to_le_bytes());
    rec.extend_from_slice(&id);
    rec.extend_from_slice(b"hello");
    let recf = c.env.path("rec.bin");
    fs::write(&recf, &rec).unwrap();
    let (code, body) = curl(
        &c,
        Some(&btok),
        "POST",
        &api("upload/user/bob/data"),
        Some(&recf),
    );
    assert_eq!(code, 400, "{body}");
    assert!(
        body.contains(&"5a".repeat(32)) && body.contains("hashes to"),
        "{body}"
    );
    let idf = c.env.path("id.bin");
    fs::write(&idf, id).unwrap();
    let (code, body) = curl(
        &c,
        Some(&btok),
        "POST",
        &api("missing/user/bob/data"),
        Some(&idf),
    );
    assert_eq!(
        (code, body.as_bytes()),
        (200, &[1u8][..]),
        "the bad chunk was stored"
    );
    drop(server);
    fsck_ok(&c.env);
}

/// Path → content of every regular file under `dir`.
fn files_of(dir: &Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    fn walk(root: &Path, d: &Path, out: &mut std::collections::BTreeMap<String, Vec<u8>>) {
        for e in fs::read_dir(d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(root, &p, out);
            } else {
                let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
                out.insert(rel, fs::read(&p).unwrap());
            }
        }
    }
    let mut out = std::collections::BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

/// A layer's files at `spec` in `env`.
fn tree_at(env: &Env, spec: &str) -> std::collections::BTreeMap<String, Vec<u8>> {
    let out = env.path(&format!("x-{}", rand::random::<u32>()));
    env.export(spec, &out);
    let f = files_of(&out);
    fs::remove_dir_all(&out).unwrap();
    f
}

/// Exports the head of `layer`, lets `edit` change it, imports it back.
fn edit_tree(env: &Env, layer: &str, edit: impl FnOnce(&Path)) {
    let dir = env.path(&format!("edit-{}", rand::random::<u32>()));
    env.export(layer, &dir);
    edit(&dir);
    env.import(layer, &dir);
    fs::remove_dir_all(&dir).unwrap();
}

const CL: usize = 65536;

/// Rewrites clusters of a disk layer's head with bytes of `seed`.
fn edit_disk(env: &Env, layer: &str, clusters: &[usize], seed: u64) {
    let img = env.path(&format!("edit-{}.raw", rand::random::<u32>()));
    env.export(layer, &img);
    let mut d = fs::read(&img).unwrap();
    for &c in clusters {
        d[c * CL..(c + 1) * CL].copy_from_slice(&random_bytes(CL, seed * 1000 + c as u64));
    }
    fs::write(&img, &d).unwrap();
    env.import(layer, &img);
    fs::remove_file(&img).unwrap();
}

/// Which seed each cluster of a disk layer's version holds (0: the original).
fn disk_at(env: &Env, spec: &str, seeds: &[u64]) -> Vec<u64> {
    let img = env.path(&format!("x-{}.raw", rand::random::<u32>()));
    env.export(spec, &img);
    let d = fs::read(&img).unwrap();
    fs::remove_file(&img).unwrap();
    (0..d.len() / CL)
        .map(|c| {
            let got = &d[c * CL..(c + 1) * CL];
            *seeds
                .iter()
                .find(|s| got == random_bytes(CL, **s * 1000 + c as u64).as_slice())
                .unwrap_or(&u64::MAX)
        })
        .collect()
}

fn conflict_of(r: &Value, l: &str) -> Value {
    layer(r, l)["conflict"].clone()
}

#[test]
fn offline_changes_on_two_laptops_and_the_server_merge_by_policy() {
    let c = Central::new();
    let tok = c.user("alice", &[]);
    let base = c.env.path("base");
    write(&base.join("etc/motd"), b"welcome\n");
    write(&base.join("report.txt"), b"report v1\n");
    write(&base.join("notes.txt"), b"one\ntwo\nthree\n");
    write(&base.join("x"), b"x0\n");
    let trees = [
        ("os/base", "os", None),
        ("user/alice/data", "data", None),
        ("user/alice/notes", "data", Some("manual")),
        ("user/alice/cw", "data", Some("client-wins")),
    ];
    for (l, k, policy) in trees {
        c.env.create(l, k, "tree");
        c.env.import(l, &base);
        if let Some(p) = policy {
            c.env.ok(&["layer", "set", l, "--conflict", p]);
        }
    }
    let img = c.env.path("disk.raw");
    let seeds = [0u64, 1, 2, 3];
    let mut d = Vec::new();
    for cl in 0..16 {
        d.extend(random_bytes(CL, cl as u64));
    }
    fs::write(&img, &d).unwrap();
    for (l, k) in [("os/disk", "os"), ("user/alice/disk", "data")] {
        c.env.create(l, k, "disk");
        c.env.import(l, &img);
    }
    c.env.ok(&["layer", "grant", "os/base", "alice", "write"]);
    c.env.ok(&["layer", "grant", "os/disk", "alice", "write"]);
    let all = [
        "os/base",
        "user/alice/data",
        "user/alice/notes",
        "user/alice/cw",
        "os/disk",
        "user/alice/disk",
    ];
    let server = c.start();
    let addr = server.addr;
    let a = Laptop::new("laptop-a", &server.url(), &tok, &c.certs.ca);
    let b = Laptop::new("laptop-b", &server.url(), &tok, &c.certs.ca);
    a.sync("pull", &all);
    b.sync("pull", &all);
    assert_eq!(server.stop().code(), Some(0));

    // Offline: a sync fails in one line and changes nothing.
    let (code, err) = a.sync_fails("sync", &[]);
    assert_eq!(code, 1);
    assert!(err.contains("cannot connect"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");

    // Everybody works while the server is down.
    edit_tree(&c.env, "os/base", |d| {
        fs::write(d.join("etc/motd"), "admin's motd\n").unwrap();
        fs::write(d.join("admin-tool"), "tool\n").unwrap();
    });
    edit_tree(&a.env, "os/base", |d| {
        fs::write(d.join("etc/motd"), "alice's motd\n").unwrap();
        fs::write(d.join("a-file"), "a\n").unwrap();
    });
    edit_tree(&a.env, "user/alice/data", |d| {
        fs::write(d.join("report.txt"), "report by a\n").unwrap();
        fs::write(d.join("from-a"), "a\n").unwrap();
    });
    edit_tree(&b.env, "user/alice/data", |d| {
        fs::write(d.join("report.txt"), "report by b\n").unwrap();
        fs::write(d.join("from-b"), "b\n").unwrap();
    });
    edit_tree(&a.env, "user/alice/notes", |d| {
        fs::write(d.join("notes.txt"), "one\ntwo by a\nthree\n").unwrap();
    });
    edit_tree(&b.env, "user/alice/notes", |d| {
        fs::write(d.join("notes.txt"), "one\ntwo by b\nthree\n").unwrap();
    });
    edit_tree(&c.env, "user/alice/cw", |d| {
        fs::write(d.join("x"), "x by admin\n").unwrap()
    });
    edit_tree(&a.env, "user/alice/cw", |d| {
        fs::write(d.join("x"), "x by a\n").unwrap()
    });
    edit_disk(&c.env, "os/disk", &[1, 2], 1);
    edit_disk(&a.env, "os/disk", &[2, 3], 2);
    edit_disk(&a.env, "user/alice/disk", &[5, 6], 2);
    edit_disk(&b.env, "user/alice/disk", &[6, 7], 3);
    let a_disk = disk_at(&a.env, "user/alice/disk", &seeds);
    let b_disk = disk_at(&b.env, "user/alice/disk", &seeds);
    let a_os = tree_at(&a.env, "os/base");

    // Back online: A first, then B, then A again.
    let server = c.start_at(addr);
    let ra = a.sync("sync", &[]);
    let rb = b.sync("sync", &[]);
    let ra2 = a.sync("sync", &[]);

    // os/base, server-wins: the admin's motd, both new files; alice's motd
    // is kept on the conflict ref.
    assert_eq!(layer(&ra, "os/base")["action"], "merged");
    let conflict = conflict_of(&ra, "os/base");
    assert_eq!(conflict["policy"], "server-wins");
    assert_eq!(conflict["items"][0]["path"], "/etc/motd");
    let os = tree_at(&c.env, "os/base");
    assert_eq!(os["etc/motd"], b"admin's motd\n");
    assert_eq!(os["admin-tool"], b"tool\n");
    assert_eq!(os["a-file"], b"a\n");
    let kept = c.env.ok(&["layer", "log", "os/base"]);
    assert!(kept.contains("merge of laptop-a's changes"), "{kept}");
    let lost = conflict["client"].as_str().unwrap();
    assert_eq!(
        tree_at(&c.env, &format!("os/base@{lost}")),
        a_os,
        "alice's side is not kept"
    );
    let refs = c.env.json(&["conflicts", "ls", "--all"]);
    assert!(refs["conflicts"]
        .as_array()
        .unwrap()
        .iter()
        .any(|x| x["id"] == conflict["id"]));

    // user/alice/data, keep-both: A pushed first; B's report is kept beside.
    assert_eq!(layer(&ra, "user/alice/data")["action"], "pushed");
    assert_eq!(layer(&rb, "user/alice/data")["action"], "merged");
    let data = tree_at(&c.env, "user/alice/data");
    assert_eq!(data["report.txt"], b"report by a\n");
    let copies: Vec<&String> = data
        .keys()
        .filter(|k| k.starts_with("report.conflict-laptop-b-"))
        .collect();
    assert_eq!(copies.len(), 1, "{:?}", data.keys());
    assert!(copies[0].ends_with(".txt"));
    assert_eq!(data[copies[0]], b"report by b\n");
    assert_eq!(data["from-a"], b"a\n");
    assert_eq!(data["from-b"], b"b\n");

    // user/alice/cw, client-wins: alice's x; the admin's is on the ref.
    let cw = conflict_of(&ra, "user/alice/cw");
    assert_eq!(cw["policy"], "client-wins");
    assert_eq!(tree_at(&c.env, "user/alice/cw")["x"], b"x by a\n");
    let srv = cw["server"].as_str().unwrap();
    assert_eq!(
        tree_at(&c.env, &format!("user/alice/cw@{srv}"))["x"],
        b"x by admin\n"
    );

    // os/disk, server-wins per cluster: 1 and 2 the admin's, 3 alice's.
    let got = disk_at(&c.env, "os/disk", &seeds);
    assert_eq!(&got[..5], &[0, 1, 1, 2, 0]);
    assert_eq!(
        conflict_of(&ra, "os/disk")["items"][0]["path"],
        "clusters 2-3"
    );

    // user/alice/disk, keep-both: A's clusters win where both wrote; B's
    // whole disk is kept as a version on the conflict ref.
    let got = disk_at(&c.env, "user/alice/disk", &seeds);
    assert_eq!(&got[4..9], &[0, 2, 2, 3, 0]);
    let kc = conflict_of(&rb, "user/alice/disk");
    assert_eq!(kc["policy"], "keep-both");
    let bv = kc["client"].as_str().unwrap();
    assert_eq!(
        disk_at(&c.env, &format!("user/alice/disk@{bv}"), &seeds),
        b_disk
    );
    assert_ne!(a_disk, b_disk);

    // user/alice/notes, manual: B's change waits on the server; no ref moved.
    assert_eq!(layer(&rb, "user/alice/notes")["action"], "pending");
    let pending = c.env.json(&["conflicts", "ls"]);
    let list = pending["conflicts"].as_array().unwrap();
    assert_eq!(list.len(), 1, "{pending}");
    let id = list[0]["id"].as_str().unwrap().to_owned();
    // The laptop sees it too, locally and on the server.
    for args in [
        vec!["conflicts", "ls"],
        vec!["conflicts", "ls", "--remote", "origin"],
    ] {
        let seen = b.env.json(&args);
        assert_eq!(seen["conflicts"][0]["id"], id.as_str(), "{args:?}: {seen}");
    }
    assert_eq!(
        tree_at(&c.env, "user/alice/notes")["notes.txt"],
        b"one\ntwo by a\nthree\n"
    );
    let shown = c.env.json(&["conflicts", "show", &id]);
    let pre = shown["items"][0]["premerged"].as_str().unwrap();
    assert!(
        pre.contains(
            "<<<<<<< ours\ntwo by a\n||||||| original\ntwo\n=======\ntwo by b\n>>>>>>> theirs"
        ),
        "{pre}"
    );
    let text = c.env.ok(&["conflicts", "show", &id]);
    assert!(text.contains("/notes.txt"), "{text}");
    let fixed = c.env.path("notes-fixed.txt");
    fs::write(&fixed, "one\ntwo by a and b\nthree\n").unwrap();
    c.env.ok(&[
        "conflicts".as_ref(),
        "resolve".as_ref(),
        id.as_str().as_ref(),
        "--take".as_ref(),
        fixed.as_os_str(),
    ]);
    assert!(c.env.json(&["conflicts", "ls"])["conflicts"]
        .as_array()
        .unwrap()
        .is_empty());
    let rb2 = b.sync("sync", &[]);
    assert_eq!(
        layer(&rb2, "user/alice/notes")["action"],
        "fast-forward",
        "{rb2}"
    );
    a.sync("sync", &[]);

    // Both laptops end with the server's trees, and a sync moves nothing.
    for l in all {
        if l.contains("disk") {
            assert_eq!(
                disk_at(&a.env, l, &seeds),
                disk_at(&c.env, l, &seeds),
                "{l}"
            );
            assert_eq!(
                disk_at(&b.env, l, &seeds),
                disk_at(&c.env, l, &seeds),
                "{l}"
            );
        } else {
            assert_eq!(tree_at(&a.env, l), tree_at(&c.env, l), "{l} on a");
            assert_eq!(tree_at(&b.env, l), tree_at(&c.env, l), "{l} on b");
        }
    }
    assert_eq!(
        tree_at(&a.env, "user/alice/notes")["notes.txt"],
        b"one\ntwo by a and b\nthree\n"
    );
    assert_eq!(
        layer(&ra2, "user/alice/data")["action"],
        "fast-forward",
        "{ra2}"
    );
    for lap in [&a, &b] {
        let r = lap.sync("sync", &[]);
        for l in all {
            assert_eq!(layer(&r, l)["action"], "up-to-date", "{r}");
        }
        fsck_ok(&lap.env);
    }
    drop(server);
    fsck_ok(&c.env);
}

#[test]
fn golden_layers_are_signed_and_unsigned_or_foreign_versions_refused() {
    let c = Central::new();
    let tok = c.user("alice", &[]);
    let img = c.env.path("os.raw");
    make_image(&img, 16, 1);
    c.env.create("os/gold", "os", "disk");
    c.env.import("os/gold", &img);
    let apps = c.env.path("apps");
    make_tree(&apps, 20, 2);
    c.env.create("group/apps", "group", "tree");
    c.env.import("group/apps", &apps);
    for l in ["os/gold", "group/apps"] {
        c.env.ok(&["layer", "grant", l, "alice", "read"]);
    }
    let k1 = c.env.json(&["key", "generate"])["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let server = c.start();
    let addr = server.addr;
    let a = Laptop::new("laptop", &server.url(), &tok, &c.certs.ca);
    let v1 = a.sync("pull", &["os/gold", "group/apps"]);
    assert_eq!(layer(&v1, "os/gold")["action"], "checked-out", "{v1}");
    a.env.ok(&["disk", "create", "d1", "--base", "os/gold"]);
    let first = a.env.json(&["layer", "log", "os/gold"]);
    let first = first["versions"][0]["id"].as_str().unwrap().to_owned();

    // A new admin version while the server runs, signed by the active key.
    let bump = |server: common::net::Server, seed: u64| {
        make_image(&img, 16, seed);
        server.stop();
        c.env.import("os/gold", &img);
        c.start_at(addr)
    };

    // Rotation: k2 is endorsed by k1, so the laptop moves to it by itself.
    let k2 = c.env.json(&["key", "generate"]);
    assert_eq!(k2["endorsed_by"], k1.as_str(), "{k2}");
    let k2 = k2["id"].as_str().unwrap().to_owned();
    let server = bump(server, 3);
    let r = a.sync("pull", &["os/gold"]);
    assert_eq!(layer(&r, "os/gold")["action"], "fast-forward", "{r}");
    a.env.ok(&["disk", "create", "d2", "--base", "os/gold"]);

    // k1 revoked: what only k1 signed is refused here, naming the key.
    c.env.ok(&["key", "revoke", &k1]);
    a.sync("pull", &["os/gold"]);
    let (code, err) = a.env.fail(&[
        "disk",
        "create",
        "d3",
        "--base",
        &format!("os/gold@{first}"),
    ]);
    assert_ne!(code, 0);
    assert!(
        err.contains("os/gold") && err.contains(&k1) && err.contains("revoked"),
        "{err}"
    );

    // No active key: the next version comes unsigned and is refused.
    c.env.ok(&["key", "revoke", &k2]);
    let server = bump(server, 4);
    let (_, err) = a.sync_fails("pull", &["os/gold"]);
    assert!(
        err.contains("os/gold") && err.contains("not signed"),
        "{err}"
    );

    // A key no trusted key endorsed: refused, naming it.
    let k3 = c.env.json(&["key", "generate"])["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let (_, err) = a.sync_fails("pull", &["os/gold"]);
    assert!(err.contains(&k3) && err.contains("not trusted"), "{err}");
    // Trusting the server's keys again takes it.
    let t = a.env.json(&["remote", "trust", "origin"]);
    assert_eq!(t["keys"], serde_json::json!([k3]), "{t}");
    let r = a.sync("pull", &["os/gold", "group/apps"]);
    assert_eq!(layer(&r, "os/gold")["action"], "fast-forward", "{r}");
    a.env.ok(&["disk", "create", "d4", "--base", "os/gold"]);

    // Layers of this store alone are not checked.
    a.env.create("os/mine", "os", "disk");
    a.env.import("os/mine", &img);
    a.env.ok(&["disk", "create", "d5", "--base", "os/mine"]);
    let keys = c.env.json(&["key", "ls"]);
    assert_eq!(keys["keys"].as_array().unwrap().len(), 3, "{keys}");
    drop(server);
}

#[test]
fn subscriptions_end_on_the_server_and_offline_after_their_grace() {
    let c = Central::new();
    let tok = c.user("alice", &[]);
    let img = c.env.path("os.raw");
    make_image(&img, 4, 5);
    for l in ["os/a", "os/b"] {
        c.env.create(l, "os", "disk");
        c.env.import(l, &img);
    }
    // os/a: ended at the start of 2026; os/b: ends in 20 s, no grace.
    c.env.ok(&[
        "layer",
        "grant",
        "os/a",
        "alice",
        "read",
        "--until",
        "2026-01-01",
    ]);
    let granted = std::time::Instant::now();
    let g = c
        .env
        .json(&["layer", "grant", "os/b", "alice", "read", "--until", "20s"]);
    assert!(g["until"].is_string(), "{g}");
    let (code, err) = c.env.fail(&[
        "layer", "grant", "os/b", "alice", "read", "--until", "someday",
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--until"), "{err}");
    let server = c.start();
    let addr = server.addr;
    let a = Laptop::new("laptop", &server.url(), &tok, &c.certs.ca);

    // The server refuses the ended one, saying why.
    let (_, err) = a.sync_fails("pull", &["os/a"]);
    assert!(
        err.contains("os/a") && err.contains("ended on 2026-01-01"),
        "{err}"
    );
    a.sync("pull", &["os/b"]);
    a.env.ok(&["disk", "create", "d1", "--base", "os/b"]);

    // Offline past the end: the laptop refuses desktops of it.
    server.stop();
    let end = granted + std::time::Duration::from_secs(21);
    std::thread::sleep(end.saturating_duration_since(std::time::Instant::now()));
    let (_, err) = a.env.fail(&["disk", "create", "d2", "--base", "os/b"]);
    assert!(
        err.contains("subscription to layer `os/b`") && err.contains("renew"),
        "{err}"
    );

    // Renewed on the server (with a grace this time): the next sync brings
    // the laptop the new end, and it works again.
    c.env.ok(&[
        "layer", "grant", "os/b", "alice", "read", "--until", "30d", "--grace", "2d",
    ]);
    let server = c.start_at(addr);
    a.sync("pull", &["os/b"]);
    a.env.ok(&["disk", "create", "d2", "--base", "os/b"]);
    let grants = c.env.json(&["layer", "grants", "os/b"]);
    assert_eq!(grants["grants"][0]["grace_secs"], 172_800, "{grants}");
    drop(server);
}

#[test]
fn a_new_os_version_reaches_the_laptop_on_sync_unless_it_is_pinned() {
    let c = Central::new();
    let tok = c.user("alice", &[]);
    let img = c.env.path("os.raw");
    make_image(&img, 4, 21);
    c.env.create("os/x", "os", "disk");
    c.env.import("os/x", &img);
    c.env.ok(&["layer", "grant", "os/x", "alice", "read"]);
    let server = c.start();
    let addr = server.addr;
    let a = Laptop::new("laptop", &server.url(), &tok, &c.certs.ca);
    a.sync("pull", &["os/x"]);
    let head = |env: &Env| {
        env.json(&["layer", "log", "os/x"])["versions"][0]["id"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let v1 = head(&a.env);
    a.env.ok(&["layer", "pin", "os/x", &v1[..12]]);
    let pins = a.env.json(&["layer", "pins"]);
    assert_eq!(pins["pins"][0]["version"], v1.as_str(), "{pins}");

    // The admin's new version arrives with the next sync...
    server.stop();
    make_image(&img, 4, 22);
    c.env.import("os/x", &img);
    let server = c.start_at(addr);
    a.sync("sync", &[]);
    let v2 = head(&a.env);
    assert_ne!(v1, v2, "the new version was fetched");
    assert_eq!(v2, head(&c.env));
    // ...but the pinned laptop's new desktops stay on the old one,
    let base = |disk: &str| {
        a.env.json(&["disk", "show", disk])["base"]["version"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    a.env.ok(&["disk", "create", "held", "--base", "os/x"]);
    assert_eq!(base("held"), v1);
    // until it lets go.
    let u = a.env.json(&["layer", "unpin", "os/x"]);
    assert_eq!(u["was"], v1.as_str(), "{u}");
    a.env.ok(&["disk", "create", "new", "--base", "os/x"]);
    assert_eq!(base("new"), v2);
    let (code, err) = a.env.fail(&["layer", "pin", "os/x", "ffffffffffff"]);
    assert_ne!(code, 0);
    assert!(err.contains("ffffffffffff"), "{err}");
    drop(server);
}
