//! Which accelerator works on this host: KVM when it runs guest code at
//! native speed, TCG otherwise.
//!
//! `/dev/kvm` may open and still fail or hang (nested virtualisation on
//! these machines: a guest kernel spins for minutes). So the probe runs
//! QEMU's firmware (SeaBIOS, with no boot device) under KVM and waits, at
//! most [`PROBE_TIMEOUT`], for it to report "No bootable device" on its
//! debug port. With working KVM that takes a fraction of a second; here it
//! takes about 5 s. The answer is kept per boot of the host ([`cache_path`]).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::fsutil::{read_json, write_json};

/// Longest a probe may take.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// The outcome of a probe.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Probe {
    /// The host boot it applies to (/proc/sys/kernel/random/boot_id).
    pub boot_id: String,
    /// The QEMU binary probed.
    pub qemu: String,
    /// KVM works.
    pub kvm: bool,
    /// Why not, or how long the firmware took.
    pub detail: String,
}

fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Where the probe's answer is kept for the host: `/run/lamina` (a tmpfs,
/// emptied at boot) when it can be written, else `$XDG_RUNTIME_DIR/lamina`,
/// else `fallback` (a file in the store).
pub fn cache_path(fallback: &Path) -> PathBuf {
    let mut dirs = vec![PathBuf::from("/run/lamina")];
    if let Some(x) = std::env::var_os("XDG_RUNTIME_DIR").filter(|x| !x.is_empty()) {
        dirs.push(PathBuf::from(x).join("lamina"));
    }
    for d in dirs {
        if std::fs::create_dir_all(&d).is_ok()
            && nix::unistd::access(&d, nix::unistd::AccessFlags::W_OK).is_ok()
        {
            return d.join("kvm-probe.json");
        }
    }
    fallback.to_path_buf()
}

/// The cached probe in `cache` if it is of this boot and this QEMU, else a
/// new probe (written to `cache`, best effort). The flag says whether the
/// answer came from the cache.
pub fn cached_or_probe(cache: &Path, qemu: &Path, reprobe: bool) -> (Probe, bool) {
    let id = boot_id();
    let q = qemu.to_string_lossy().into_owned();
    if let Some(p) =
        read_json::<Probe>(cache).filter(|p| p.boot_id == id && p.qemu == q && !reprobe)
    {
        return (p, true);
    }
    let p = probe(qemu, PROBE_TIMEOUT);
    if let Err(e) = write_json(cache, &p) {
        tracing::warn!("cannot keep the KVM probe result: {e}");
    }
    (p, false)
}

/// Runs the probe (x86_64 QEMU only; other binaries get `kvm: false`).
pub fn probe(qemu: &Path, timeout: Duration) -> Probe {
    let (kvm, detail) = run_probe(qemu, timeout);
    tracing::info!(kvm, %detail, "KVM probe");
    Probe {
        boot_id: boot_id(),
        qemu: qemu.to_string_lossy().into_owned(),
        kvm,
        detail,
    }
}

fn run_probe(qemu: &Path, timeout: Duration) -> (bool, String) {
    if !qemu.to_string_lossy().ends_with("x86_64") {
        return (false, "KVM is probed for x86_64 only".into());
    }
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        return (false, format!("/dev/kvm: {e}"));
    }
    let dir = match tempfile_dir() {
        Ok(d) => d,
        Err(e) => return (false, format!("probe directory: {e}")),
    };
    let log = dir.join("debugcon.log");
    let child = Command::new(qemu)
        .args([
            "-accel",
            "kvm",
            "-machine",
            "q35",
            "-nodefaults",
            "-no-user-config",
        ])
        .args([
            "-display",
            "none",
            "-m",
            "32",
            "-no-reboot",
            "-serial",
            "none",
        ])
        .arg("-chardev")
        .arg(format!("file,id=dbg,path={}", log.display()))
        .args(["-device", "isa-debugcon,chardev=dbg,iobase=0x402"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => return (false, format!("{}: {e}", qemu.display())),
    };
    let t0 = Instant::now();
    let result = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("No bootable device") {
            break (
                true,
                format!("firmware ran in {} ms", t0.elapsed().as_millis()),
            );
        }
        if let Ok(Some(st)) = child.try_wait() {
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                use std::io::Read;
                let _ = e.read_to_string(&mut err);
            }
            let last = err.lines().last().unwrap_or("").to_string();
            break (false, format!("QEMU with KVM exited ({st}): {last}"));
        }
        if t0.elapsed() > timeout {
            break (
                false,
                format!(
                    "firmware did not finish within {} ms under KVM",
                    timeout.as_millis()
                ),
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn tempfile_dir() -> std::io::Result<std::path::PathBuf> {
    let d = std::env::temp_dir().join(format!("lamina-kvm-probe-{}", std::process::id()));
    std::fs::create_dir_all(&d)?;
    Ok(d)
}
