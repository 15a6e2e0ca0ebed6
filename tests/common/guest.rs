//! The fixture guest (fixtures/guest/build.sh), built once per test run.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use super::require;

/// The fixture guest, built once per test run.
pub fn guest() -> Option<&'static Path> {
    static GUEST: OnceLock<PathBuf> = OnceLock::new();
    let qemu = Command::new("qemu-system-x86_64").arg("--version").output();
    if !require(
        qemu.is_ok(),
        "qemu-system-x86_64 (apt-get install qemu-system-x86 qemu-utils)",
    ) {
        return None;
    }
    Some(GUEST.get_or_init(|| {
        let dir = tempfile::Builder::new()
            .prefix("lamina-guest-")
            .tempdir()
            .unwrap()
            .keep();
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/guest/build.sh");
        let st = Command::new("bash").arg(script).arg(&dir).status().unwrap();
        assert!(st.success(), "fixtures/guest/build.sh failed");
        dir
    }))
}
