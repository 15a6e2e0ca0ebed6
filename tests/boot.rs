//! QEMU boots a real guest from a Lamina NBD export (issue #3): the fixture
//! guest (fixtures/guest/build.sh) reads its ext4 disk over NBD, writes a
//! file, and powers off on request; the write is then committed to the
//! layer and found in the exported image.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::process::Command;

use common::*;

/// Builds the fixture guest into `out`.
fn build_guest(out: &Path) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/guest/build.sh");
    let st = Command::new("bash").arg(script).arg(out).status().unwrap();
    assert!(st.success(), "fixtures/guest/build.sh failed");
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
    let mut vm = common::guest::Booted::start(&guest, &server.unix_uri("vm"), &qmp_sock);
    vm.wait_for("LAMINA-GUEST-BOOTED", 240);
    vm.wait_for("LAMINA-GUEST-READ lamina fixture disk", 60);
    vm.wait_for("LAMINA-GUEST-WROTE", 60);
    vm.wait_for("LAMINA-GUEST-IDLE", 60);
    let status = vm.power_off();
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
