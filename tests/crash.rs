//! Faults and concurrency (issue #2): imports killed with SIGKILL at random
//! points, gc and readers while an import runs.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::fs;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// About 160 MiB over 40 files, half random, half text-like.
fn big_tree(env: &Env) -> std::path::PathBuf {
    let src = env.path("src");
    for i in 0..40u64 {
        let data = if i % 2 == 0 {
            random_bytes(4 << 20, i)
        } else {
            format!("line {i} of a text file\n")
                .repeat(170_000)
                .into_bytes()
        };
        write(&src.join(format!("d{}/f{i}", i % 5)), &data);
    }
    src
}

fn spawn_import(env: &Env, layer: &str, src: &std::path::Path) -> Child {
    env.cmd()
        .args(["layer", "import", layer])
        .arg(src)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Milliseconds from the clock, to vary kill points between runs.
fn jitter(max: u64) -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as u64;
    nanos % max.max(1)
}

/// Kills `child` once the store's packs hold `target` bytes; returns false
/// if the import finished first.
fn kill_at_pack_bytes(env: &Env, child: &mut Child, target: u64) -> bool {
    let packs = env.store.join("packs");
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        if child.try_wait().unwrap().is_some() {
            return false;
        }
        if dir_size(&packs) >= target {
            let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL);
            return !child.wait().unwrap().success();
        }
        assert!(Instant::now() < deadline, "import made no progress");
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn import_killed_at_random_points_leaves_a_consistent_store() {
    // What a whole import writes, to spread the kill points over it.
    let calibrate = Env::new();
    let src = big_tree(&calibrate);
    calibrate.create("x", "os", "tree");
    calibrate.import("x", &src);
    let total = dir_size(&calibrate.store.join("packs"));
    let mut killed = 0;
    // 0.999: after the last data is written, while the manifest and the
    // commit are being written.
    for fraction in [0.1, 0.35, 0.6, 0.85, 0.999] {
        // A fresh store each time, so every run does the whole work.
        let env = Env::new();
        env.create("l", "os", "tree");
        let mut child = spawn_import(&env, "l", &src);
        let target = (total as f64 * fraction) as u64 + jitter(1 << 20);
        let was_killed = kill_at_pack_bytes(&env, &mut child, target.min(total));
        let versions = env.json(&["layer", "log", "l"])["versions"]
            .as_array()
            .unwrap()
            .len();
        if !was_killed {
            assert_eq!(versions, 1, "a finished import must have moved the ref");
            continue;
        }
        killed += 1;
        assert_eq!(
            versions, 0,
            "killed at {target} of {total} pack bytes: the ref moved"
        );
        let fsck = env.json(&["fsck"]);
        assert_eq!(
            fsck["ok"], true,
            "after a kill at {target} of {total} pack bytes: {fsck}"
        );
        // A re-run completes, reusing what the killed run stored.
        let r = env.import_report("l", &src);
        let (chunks, new) = (
            r["stats"]["chunks"].as_u64().unwrap(),
            r["stats"]["chunks_new"].as_u64().unwrap(),
        );
        if fraction >= 0.35 {
            assert!(
                new < chunks,
                "killed at {target} of {total} pack bytes: nothing reused: {r}"
            );
        }
        let out = env.path("out");
        env.export("l", &out);
        compare_trees(&src, &out);
        // gc clears whatever the killed run left unreferenced.
        let g = env.json(&["gc"]);
        let (all, removed) = (
            g["chunks_total"].as_u64().unwrap(),
            g["chunks_removed"].as_u64().unwrap(),
        );
        assert_eq!(
            all - removed,
            g["chunks_reachable"].as_u64().unwrap(),
            "{g}"
        );
        assert_eq!(env.json(&["fsck"])["ok"], true);
    }
    assert!(
        killed >= 4,
        "only {killed} of 5 imports were killed before finishing"
    );
}

/// Waits until the store's writer lock names an import.
fn wait_for_writer(env: &Env, child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let holder = fs::read_to_string(env.store.join("lock")).unwrap_or_default();
        if holder.contains("layer import") {
            return;
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "import ended before it was observed"
        );
        assert!(
            Instant::now() < deadline,
            "import never took the store lock"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn gc_and_readers_while_an_import_runs() {
    let env = Env::new();
    let src = big_tree(&env);
    let small = env.path("small");
    write(&small.join("a"), b"already here");
    env.create("base", "os", "tree");
    env.import("base", &small);
    env.create("big", "os", "tree");
    let mut child = spawn_import(&env, "big", &src);
    wait_for_writer(&env, &mut child);
    // Readers don't wait for the writer.
    let ls = env.json(&["layer", "ls"]);
    assert_eq!(ls["layers"].as_array().unwrap().len(), 2);
    let out = env.path("base-out");
    env.export("base", &out);
    assert_eq!(fs::read(out.join("a")).unwrap(), b"already here");
    // gc either refuses at once (--no-wait)...
    let o = env.run(&["--no-wait", "gc"]);
    if !o.status.success() {
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1));
        assert!(
            err.contains("locked by pid") && err.contains("layer import"),
            "{err}"
        );
    }
    // ...or waits for the import and then runs.
    let g = env.run(&["gc"]);
    assert!(g.status.success(), "{}", String::from_utf8_lossy(&g.stderr));
    let status = child.wait().unwrap();
    assert!(status.success());
    assert_eq!(
        env.json(&["layer", "log", "big"])["versions"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    assert_eq!(env.json(&["fsck"])["ok"], true);
    let out = env.path("big-out");
    env.export("big", &out);
    compare_trees(&src, &out);
}

#[test]
fn gc_killed_at_random_points_loses_nothing_kept() {
    // A store with much to collect: layer `gone` is removed, `kept` shares
    // half of its files, so packs are partly dead and must be rewritten.
    let base = Env::new();
    let src = big_tree(&base);
    let kept = base.path("kept");
    for i in (0..40u64).step_by(2) {
        let from = src.join(format!("d{}/f{i}", i % 5));
        write(&kept.join(format!("f{i}")), &fs::read(from).unwrap());
    }
    base.create("gone", "os", "tree");
    base.create("kept", "os", "tree");
    base.import("gone", &src);
    base.import("kept", &kept);
    base.ok(&["layer", "rm", "gone"]);
    let copy_store = |to: &std::path::Path| {
        let st = std::process::Command::new("cp")
            .arg("-a")
            .arg(&base.store)
            .arg(to)
            .status()
            .unwrap();
        assert!(st.success());
    };
    // How long a whole gc takes here.
    let calibrate = base.path("calibrate");
    copy_store(&calibrate);
    let t0 = Instant::now();
    let st = std::process::Command::new(bin())
        .arg("--store")
        .arg(&calibrate)
        .args(["gc", "--expire-reflog", "0"])
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(st.success());
    let full = t0.elapsed().as_millis() as u64;
    let mut killed = 0;
    for (i, fraction) in [0.1, 0.3, 0.5, 0.7, 0.9].iter().enumerate() {
        let store = base.path(&format!("s{i}"));
        copy_store(&store);
        let run = |args: &[&str]| {
            std::process::Command::new(bin())
                .arg("--store")
                .arg(&store)
                .args(args)
                .output()
                .unwrap()
        };
        let mut child = std::process::Command::new(bin())
            .arg("--store")
            .arg(&store)
            .args(["gc", "--expire-reflog", "0"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // The kill must land inside the gc: waiting is the point here.
        std::thread::sleep(Duration::from_millis(
            (full as f64 * fraction) as u64 + jitter(20),
        ));
        let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL);
        if !child.wait().unwrap().success() {
            killed += 1;
        }
        let fsck = run(&["--json", "fsck"]);
        assert!(
            fsck.status.success(),
            "after a gc kill at {fraction}: {}",
            String::from_utf8_lossy(&fsck.stdout)
        );
        let out = base.path(&format!("out{i}"));
        let exp = std::process::Command::new(bin())
            .arg("--store")
            .arg(&store)
            .args(["layer", "export", "kept"])
            .arg(&out)
            .output()
            .unwrap();
        assert!(
            exp.status.success(),
            "{}",
            String::from_utf8_lossy(&exp.stderr)
        );
        compare_trees(&kept, &out);
        // A second gc finishes the job.
        assert!(run(&["gc", "--expire-reflog", "0"]).status.success());
        assert!(run(&["fsck"]).status.success());
    }
    assert!(
        killed >= 2,
        "only {killed} of 5 gc runs were killed before finishing (a gc takes {full} ms)"
    );
}
