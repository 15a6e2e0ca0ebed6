//! The VM runner (issue #5) against real QEMU under TCG, with the fixture
//! guest (fixtures/guest/build.sh): boots from a qcow2 file and from a
//! Lamina NBD export, screenshots of both profiles, the states after stop,
//! kill, a QEMU dying by itself and a restart of Lamina's side, two VMs at
//! once with the allow-list network policy, the serial console, and bad
//! input.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::guest::{guest, guest_arm};
use common::vms::*;
use common::*;
use serde_json::Value;

/// The file the guest wrote, read from a disk image (any format qemu-img reads).
fn guest_wrote(image: &Path, work: &Path) -> String {
    let raw = work.join("check.raw");
    run_ok(
        "qemu-img",
        &[
            "convert",
            "-O",
            "raw",
            image.to_str().unwrap(),
            raw.to_str().unwrap(),
        ],
    );
    let out = run_ok(
        "debugfs",
        &["-R", "cat /guest-wrote.txt", raw.to_str().unwrap()],
    );
    std::fs::remove_file(raw).unwrap();
    out
}

#[test]
fn boots_from_qcow2_and_from_a_lamina_export() {
    let Some(env) = Vms::new() else { return };
    env.template("pc", "pc", "none", "");
    // 1. A qcow2 file.
    let disk = env.vm_on_overlay("a", "pc");
    let s = env.json(&["vm", "start", "a"]);
    assert_eq!(s["state"], "running", "{s}");
    // The serial console: attach, see the guest's lines, detach with Ctrl-].
    let mut console = env
        .cmd()
        .args(["vm", "console", "a"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let text = env.wait_console("a", "LAMINA-GUEST-IDLE", 300);
    assert!(
        text.contains("LAMINA-GUEST-READ lamina fixture disk"),
        "{text}"
    );
    assert!(text.contains("LAMINA-GUEST-WROTE"), "{text}");
    console.stdin.as_mut().unwrap().write_all(&[0x1d]).unwrap();
    let st = console.wait().unwrap();
    assert!(st.success(), "vm console: {st}");
    let mut seen = String::new();
    console
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut seen)
        .unwrap();
    assert!(
        seen.contains("LAMINA-GUEST-IDLE"),
        "console showed {seen:?}"
    );
    let row = env.state("a");
    assert_eq!(row["state"], "running");
    assert_eq!(row["profile"], "pc");
    assert!(row["rss_bytes"].as_u64().unwrap() > 10 << 20, "{row}");
    assert!(row["cpu_percent"].as_f64().is_some(), "{row}");
    let shot = env.path("pc.png");
    let r = env.json(&["vm", "screenshot", "a", shot.to_str().unwrap()]);
    assert_eq!(
        (r["width"].as_u64(), r["height"].as_u64()),
        (Some(1280), Some(800))
    );
    assert_screenshot(&shot, 1280, 800);
    let st = env.json(&["vm", "stats", "a"]);
    assert!(st["disks"][0]["write_bytes"].as_u64().unwrap() > 0, "{st}");
    assert!(st["host"]["mem_available"].as_u64().unwrap() > 0, "{st}");
    assert!(st["host"]["load"].as_array().unwrap().len() == 3, "{st}");
    stop_ok(&env, "a");
    assert!(guest_wrote(&disk, env.dir.path()).contains("written by the lamina fixture guest"));

    // 2. A Lamina NBD export.
    env.create("os/guest", "os", "disk");
    env.import("os/guest", &guest().unwrap().join("disk.raw"));
    env.ok(&["disk", "create", "vmdisk", "--base", "os/guest"]);
    let mut server = Server::start(&env, &[]);
    env.ok(&[
        "vm",
        "create",
        "b",
        "--template",
        "pc",
        "--disk",
        &server.unix_uri("vmdisk"),
    ]);
    env.ok(&["vm", "start", "b"]);
    env.wait_console("b", "LAMINA-GUEST-IDLE", 300);
    stop_ok(&env, "b");
    assert!(server.stop().success());
    env.ok(&["disk", "commit", "vmdisk", "-m", "guest run"]);
    let image = env.path("after.raw");
    env.export("os/guest", &image);
    assert!(guest_wrote(&image, env.dir.path()).contains("written by the lamina fixture guest"));
    assert_eq!(env.json(&["fsck"])["ok"], true);
}

#[test]
fn a_phone_boots_on_aarch64_from_a_lamina_export() {
    let Some(env) = Vms::new() else { return };
    let Some(g) = guest_arm() else { return };
    env.phone_template("phone", g, "");
    env.create("os/phone", "os", "disk");
    env.import("os/phone", &g.join("disk.raw"));
    env.ok(&["disk", "create", "phonedisk", "--base", "os/phone"]);
    let mut server = Server::start(&env, &[]);
    env.ok(&[
        "vm",
        "create",
        "p",
        "--template",
        "phone",
        "--disk",
        &server.unix_uri("phonedisk"),
    ]);
    let s = env.json(&["vm", "start", "p"]);
    assert_eq!(
        (&s["state"], &s["accel"]),
        (&"running".into(), &"tcg".into()),
        "{s}"
    );
    let text = env.wait_console("p", "LAMINA-GUEST-IDLE", 300);
    assert!(
        text.contains("LAMINA-GUEST-READ lamina fixture disk"),
        "{text}"
    );
    assert!(text.contains("LAMINA-GUEST-WROTE"), "{text}");

    // The phone's screen: 720x1280, the guest's drawing on it.
    let shot = env.path("phone.png");
    let r = env.json(&["vm", "screenshot", "p", shot.to_str().unwrap()]);
    assert_eq!(
        (r["width"].as_u64(), r["height"].as_u64()),
        (Some(720), Some(1280))
    );
    assert_eq!(bar_colours(&shot), BARS, "{}", shot.display());
    let row = env.state("p");
    assert_eq!(row["profile"], "phone", "{row}");
    let st = env.json(&["vm", "stats", "p"]);
    assert!(st["rss_bytes"].as_u64().unwrap() > 10 << 20, "{st}");
    assert!(st["disks"][0]["write_bytes"].as_u64().unwrap() > 0, "{st}");
    stop_ok(&env, "p");

    // Again, killed this time.
    env.ok(&["vm", "start", "p"]);
    env.wait_console("p", "LAMINA-GUEST-BOOTED", 300);
    let k = env.json(&["vm", "kill", "p"]);
    assert_eq!(k["state"], "powered-off", "{k}");
    assert!(
        k["exit"]["reason"]
            .as_str()
            .unwrap()
            .contains("killed by `vm kill`"),
        "{k}"
    );
    assert!(server.stop().success());
    env.ok(&["disk", "commit", "phonedisk", "-m", "phone run"]);
    let image = env.path("phone-after.raw");
    env.export("os/phone", &image);
    assert!(guest_wrote(&image, env.dir.path()).contains("written by the lamina fixture guest"));
}

/// A TCP listener that sends `hello-PORT` to every connection.
fn greeter() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for c in l.incoming().flatten() {
            let mut c = c;
            let _ = writeln!(c, "hello-{port}");
        }
    });
    port
}

#[test]
fn two_vms_differ_and_the_allow_list_holds() {
    let Some(env) = Vms::new() else { return };
    let (allowed, other) = (greeter(), greeter());
    // The guest tries: the allowed destination (at its guest address), the
    // other port on the host, and the other port at the relay address.
    let probes = format!("lamina.probe=10.0.2.100:{allowed},10.0.2.2:{other},10.0.2.100:{other}");
    env.template(
        "phone",
        "phone",
        &format!("allow:127.0.0.1:{allowed}"),
        &probes,
    );
    // The second VM has user networking: the same probe of the other port works there.
    env.template(
        "open",
        "pc",
        "user",
        &format!("lamina.probe=10.0.2.2:{other}"),
    );
    env.vm_on_overlay("p", "phone");
    env.vm_on_overlay("q", "open");
    env.ok(&["vm", "start", "p"]);
    env.ok(&["vm", "start", "q"]);
    let text = env.wait_console("p", "LAMINA-GUEST-IDLE", 400);
    assert!(
        text.contains(&format!(
            "LAMINA-GUEST-NET 10.0.2.100:{allowed} ok hello-{allowed}"
        )),
        "{text}"
    );
    assert!(
        text.contains(&format!("LAMINA-GUEST-NET 10.0.2.2:{other} failed")),
        "{text}"
    );
    assert!(
        text.contains(&format!("LAMINA-GUEST-NET 10.0.2.100:{other} failed")),
        "{text}"
    );
    let text = env.wait_console("q", "LAMINA-GUEST-IDLE", 400);
    assert!(
        text.contains(&format!(
            "LAMINA-GUEST-NET 10.0.2.2:{other} ok hello-{other}"
        )),
        "{text}"
    );
    // Both run at once with different identities.
    let list = env.json(&["vm", "ls"]);
    let rows = list.as_array().unwrap();
    assert_eq!(rows.len(), 2);
    assert!(
        rows.iter()
            .all(|r| r["state"] == "running" && r["pid"].is_number()),
        "{list}"
    );
    assert_ne!(rows[0]["uuid"], rows[1]["uuid"]);
    assert_ne!(rows[0]["mac"], rows[1]["mac"]);
    assert_ne!(rows[0]["pid"], rows[1]["pid"]);
    for r in rows {
        let mac = r["mac"].as_str().unwrap();
        let first = u8::from_str_radix(&mac[..2], 16).unwrap();
        assert_eq!(
            first & 3,
            2,
            "not a locally administered unicast MAC: {mac}"
        );
    }
    // The relay counted the allowed connection.
    let st = env.json(&["vm", "stats", "p"]);
    assert!(st["net"]["rx_bytes"].as_u64().unwrap() >= 11, "{st}");
    let shot = env.path("phone.png");
    env.ok(&["vm", "screenshot", "p", shot.to_str().unwrap()]);
    assert_screenshot(&shot, 720, 1280);
    stop_ok(&env, "p");
    stop_ok(&env, "q");
}

fn pid_of(env: &Vms, vm: &str) -> i32 {
    env.show(vm)["vm"]["run"]["pid"].as_i64().unwrap() as i32
}

fn signal(pid: i32, sig: nix::sys::signal::Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig).unwrap();
}

/// Waits until `vm ls` shows `state` for `vm`.
fn wait_state(env: &Vms, vm: &str, state: &str, secs: u64) -> Value {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let row = env.show(vm)["vm"].clone();
        if env.state(vm)["state"] == state {
            return env.show(vm)["vm"].clone();
        }
        assert!(
            Instant::now() < deadline,
            "{vm} not {state} within {secs} s: {row}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn stop_kill_crash_and_restart_states() {
    let Some(env) = Vms::new() else { return };
    env.template("pc", "pc", "none", "");
    env.vm_on_overlay("k", "pc");

    // kill: at once, recorded as asked for.
    env.ok(&["vm", "start", "k"]);
    let r = env.json(&["vm", "kill", "k"]);
    assert_eq!(r["state"], "powered-off");
    assert_eq!(r["exit"]["requested"], "kill", "{r}");
    assert_eq!(r["exit"]["signal"], 9, "{r}");

    // stop of a guest that does not answer the power button (still booting):
    // killed after the timeout.
    env.ok(&["vm", "start", "k"]);
    let r = env.json(&["vm", "stop", "k", "--timeout", "1"]);
    assert_eq!(r["exit"]["requested"], "stop-timeout", "{r}");
    assert!(
        r["exit"]["reason"]
            .as_str()
            .unwrap()
            .contains("did not power off in time"),
        "{r}"
    );

    // QEMU dies by itself: the monitor notices and records why.
    env.ok(&["vm", "start", "k"]);
    let pid = pid_of(&env, "k");
    signal(pid, nix::sys::signal::Signal::SIGKILL);
    let vm = wait_state(&env, "k", "powered-off", 30);
    assert_eq!(vm["last_exit"]["signal"], 9, "{vm}");
    assert!(vm["last_exit"]["requested"].is_null(), "{vm}");
    assert!(
        vm["last_exit"]["reason"]
            .as_str()
            .unwrap()
            .contains("QEMU died of signal 9"),
        "{vm}"
    );

    // Lamina's side restarts (its monitor is killed): QEMU runs on, `vm ls`
    // re-attaches (pid + QMP) and a new monitor watches it to the end.
    env.ok(&["vm", "start", "k"]);
    env.wait_console("k", "LAMINA-GUEST-IDLE", 300);
    let run = env.show("k")["vm"]["run"].clone();
    signal(
        run["monitor_pid"].as_i64().unwrap() as i32,
        nix::sys::signal::Signal::SIGKILL,
    );
    std::thread::sleep(Duration::from_millis(300));
    let row = env.state("k");
    assert_eq!(row["state"], "running", "{row}");
    assert_eq!(row["pid"], run["pid"], "{row}");
    // The re-attached monitor hears QEMU's SHUTDOWN event for a SIGTERM.
    std::thread::sleep(Duration::from_secs(1));
    signal(
        run["pid"].as_i64().unwrap() as i32,
        nix::sys::signal::Signal::SIGTERM,
    );
    let vm = wait_state(&env, "k", "powered-off", 30);
    assert_eq!(vm["last_exit"]["shutdown"], "host-signal", "{vm}");

    // And a normal start/stop still works afterwards.
    env.ok(&["vm", "start", "k"]);
    env.wait_console("k", "LAMINA-GUEST-IDLE", 300);
    stop_ok(&env, "k");
}

#[test]
fn bad_input_gets_one_line_and_leaves_nothing() {
    let Some(env) = Vms::new() else { return };
    let g = guest().unwrap();
    let one_line = |(code, err): (i32, String), code_want: i32, needle: &str| {
        assert_eq!(code, code_want, "{err}");
        assert_eq!(err.trim_end().lines().count(), 1, "not one line: {err}");
        assert!(err.contains(needle), "{needle:?} not in {err}");
    };
    let kernel = g.join("vmlinuz");
    let k = kernel.to_str().unwrap();
    // Rejected templates: the extra arguments after `--profile`, and what the error names.
    let rejected: [(&[&str], &str); 4] = [
        (
            &["pc", "--kernel", "/nonexistent/vmlinuz"],
            "kernel /nonexistent/vmlinuz",
        ),
        (&["pc", "--memory", "0", "--kernel", k], "memory"),
        (&["tablet"], "unknown profile \"tablet\""),
        (&["pc", "--net", "allow:host"], "allow-list"),
    ];
    for (extra, needle) in rejected {
        let mut args = vec!["vm", "template", "create", "t", "--profile"];
        args.extend_from_slice(extra);
        one_line(env.fail(&args), 2, needle);
    }
    assert_eq!(env.json(&["vm", "template", "ls"]), serde_json::json!([]));

    env.template("pc", "pc", "none", "");
    one_line(
        env.fail(&[
            "vm",
            "create",
            "x",
            "--template",
            "pc",
            "--disk",
            "/nonexistent/disk.qcow2",
        ]),
        2,
        "/nonexistent/disk.qcow2",
    );
    one_line(
        env.fail(&[
            "vm",
            "create",
            "x",
            "--template",
            "nope",
            "--disk",
            "nbd+unix:///d?socket=/x",
        ]),
        1,
        "no template named \"nope\"",
    );
    assert_eq!(env.json(&["vm", "ls"]), serde_json::json!([]));

    // An NBD server that is not there; then a socket that does not speak NBD.
    let sock = env.path("fake.sock");
    env.ok(&[
        "vm",
        "create",
        "n",
        "--template",
        "pc",
        "--disk",
        &format!("nbd+unix:///d?socket={}", sock.display()),
    ]);
    one_line(env.fail(&["vm", "start", "n"]), 2, "cannot connect");
    let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    std::thread::spawn(move || {
        for c in listener.incoming().flatten() {
            drop(c);
        }
    });
    let (code, err) = env.fail(&["vm", "start", "n"]);
    one_line(
        (code, err.clone()),
        1,
        "QEMU did not start: QEMU failed with exit status 1",
    );
    assert!(
        err.contains("qemu-system-x86_64"),
        "QEMU's own message missing: {err}"
    );
    let n = env.show("n")["vm"].clone();
    assert_eq!(n["state"], "powered-off", "{n}");
    assert_eq!(n["last_exit"]["code"], 1, "{n}");

    // QEMU not installed.
    let disk = env.vm_on_overlay("v", "pc");
    let out = env
        .cmd()
        .env("PATH", "/nonexistent")
        .args(["vm", "start", "v"])
        .output()
        .unwrap();
    one_line(
        (
            out.status.code().unwrap(),
            String::from_utf8_lossy(&out.stderr).into(),
        ),
        2,
        "qemu-system-x86_64 not found",
    );
    assert_eq!(env.state("v")["state"], "powered-off");

    // In use, running, unknown.
    one_line(
        env.fail(&["vm", "template", "rm", "pc"]),
        2,
        "in use by VM(s) n, v",
    );
    env.ok(&["vm", "template", "show", "pc"]);
    env.ok(&["vm", "start", "v"]);
    one_line(
        env.fail(&["vm", "start", "v"]),
        2,
        "VM v is running: stop or kill it first",
    );
    one_line(
        env.fail(&["vm", "destroy", "v"]),
        2,
        "stop or kill it first",
    );
    one_line(
        env.fail(&["vm", "stop", "ghost"]),
        1,
        "no VM named \"ghost\"",
    );
    one_line(
        env.fail(&[
            "vm",
            "create",
            "v",
            "--template",
            "pc",
            "--disk",
            disk.to_str().unwrap(),
        ]),
        2,
        "exists already",
    );
    let dir = PathBuf::from(env.show("v")["paths"]["dir"].as_str().unwrap());
    env.ok(&["vm", "destroy", "v", "--force"]);
    assert!(!dir.exists(), "{} left behind", dir.display());
    env.ok(&["vm", "destroy", "n"]);
    env.ok(&["vm", "template", "rm", "pc"]);
    assert_eq!(env.json(&["vm", "ls"]), serde_json::json!([]));
}
