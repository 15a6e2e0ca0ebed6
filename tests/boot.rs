//! QEMU boots a real guest from a Lamina NBD export (issue #3): the fixture
//! guest (fixtures/guest/build.sh) reads its ext4 disk over NBD, writes a
//! file, and powers off on request; the write is then committed to the
//! layer and found in the exported image.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;

/// Builds the fixture guest into `out`.
fn build_guest(out: &Path) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/guest/build.sh");
    let st = Command::new("bash").arg(script).arg(out).status().unwrap();
    assert!(st.success(), "fixtures/guest/build.sh failed");
}

/// Sends QMP commands on `sock`; false if QEMU could not be reached (it may
/// have just exited).
fn qmp(sock: &Path, commands: &[&str]) -> bool {
    let attempt = || -> std::io::Result<()> {
        let s = UnixStream::connect(sock)?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        let mut w = s.try_clone()?;
        let mut r = BufReader::new(s);
        let mut line = String::new();
        r.read_line(&mut line)?; // greeting
        for c in ["{\"execute\":\"qmp_capabilities\"}"]
            .iter()
            .chain(commands)
        {
            w.write_all(c.as_bytes())?;
            w.write_all(b"\n")?;
            loop {
                line.clear();
                if r.read_line(&mut line)? == 0 {
                    return Err(std::io::ErrorKind::UnexpectedEof.into());
                }
                // Skip asynchronous events until the command's answer.
                if line.contains("\"return\"") || line.contains("\"error\"") {
                    break;
                }
            }
        }
        Ok(())
    };
    attempt().is_ok()
}

#[test]
fn qemu_boots_the_fixture_guest_from_a_lamina_export() {
    let qemu = Command::new("qemu-system-x86_64").arg("--version").output();
    if !require(
        qemu.is_ok(),
        "qemu-system-x86_64 (apt-get install qemu-system-x86 qemu-utils)",
    ) {
        return;
    }
    let env = Env::new();
    let guest = env.path("guest");
    build_guest(&guest);
    env.create("os/guest", "os", "disk");
    env.import("os/guest", &guest.join("disk.raw"));
    env.ok(&["disk", "create", "vm", "--base", "os/guest"]);
    let mut server = Server::start(&env, &[]);
    let qmp_sock = env.path("qmp.sock");
    let mut child = Command::new("qemu-system-x86_64")
        .args([
            "-accel",
            "tcg",
            "-m",
            "256",
            "-display",
            "none",
            "-serial",
            "stdio",
            "-no-reboot",
        ])
        .arg("-kernel")
        .arg(guest.join("vmlinuz"))
        .arg("-initrd")
        .arg(guest.join("initrd.img"))
        .args(["-append", "console=ttyS0 quiet panic=-1"])
        .arg("-drive")
        .arg(format!(
            "file={},format=raw,if=virtio",
            server.unix_uri("vm")
        ))
        .arg("-qmp")
        .arg(format!("unix:{},server,nowait", qmp_sock.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Serial console lines, read on a thread so waits have a deadline.
    let (tx, rx) = mpsc::channel::<String>();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut console = Vec::new();
    let mut wait_for = |marker: &str, secs: u64| {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    let hit = line.contains(marker);
                    console.push(line);
                    assert!(
                        !console.last().unwrap().contains("LAMINA-GUEST-FAIL"),
                        "guest failed: {console:#?}"
                    );
                    if hit {
                        return;
                    }
                }
                Err(_) => panic!("no `{marker}` within {secs} s; console: {console:#?}"),
            }
        }
    };
    wait_for("LAMINA-GUEST-BOOTED", 240);
    wait_for("LAMINA-GUEST-READ lamina fixture disk", 60);
    wait_for("LAMINA-GUEST-WROTE", 60);
    wait_for("LAMINA-GUEST-IDLE", 60);
    // Press the power button, again every few seconds: a press the guest
    // is not yet listening for is lost.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut next_press = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() >= next_press {
            // Best effort: QEMU may be exiting already.
            qmp(&qmp_sock, &["{\"execute\":\"system_powerdown\"}"]);
            next_press = Instant::now() + Duration::from_secs(3);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let mut err = String::new();
            let _ = child.stderr.take().unwrap().read_to_string(&mut err);
            panic!("QEMU did not power off: {err}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "QEMU exited with {status}");
    assert!(server.stop().success());
    // The guest's write is in the disk: commit it and look inside the image.
    let c = env.json(&["disk", "commit", "vm", "-m", "guest run"]);
    assert!(c["clusters"].as_u64().unwrap() > 0, "{c}");
    let image = env.path("after.raw");
    env.export("os/guest", &image);
    let out = run_ok(
        "debugfs",
        &["-R", "cat /guest-wrote.txt", image.to_str().unwrap()],
    );
    assert!(out.contains("written by the lamina fixture guest"), "{out}");
    assert_eq!(env.json(&["fsck"])["ok"], true);
}
