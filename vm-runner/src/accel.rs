//! Which accelerator works on this host: KVM when it runs guest code at
//! native speed, TCG otherwise.
//!
//! `/dev/kvm` may open and still fail or hang (nested virtualisation on
//! these machines: a guest kernel spins for minutes). Running the firmware
//! alone is not enough to tell: on some of these machines SeaBIOS reaches
//! "No bootable device" under KVM in 1.4 s and a kernel then hangs. So the
//! probe boots a boot sector of its own ([`probe_sector`]) that counts a
//! register down from 200 million and then writes `LAMINA-KVM-OK` on the
//! debug port, and waits at most [`PROBE_TIMEOUT`] for it. Under working
//! KVM the count takes about a tenth of a second (TCG: half a second);
//! under the broken KVM here it had not finished after 20 s. The answer is
//! kept per boot of the host ([`cache_path`]).

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
    /// Why not, or how long the probe's guest code took.
    pub detail: String,
    /// How it was probed ([`PROBE_METHOD`]); an answer of an older method is
    /// probed again.
    #[serde(default)]
    pub method: u32,
}

/// The probe's method: 2 runs guest code ([`probe_sector`]); 1 (older
/// binaries) only ran the firmware, which passed where KVM then hung.
pub const PROBE_METHOD: u32 = 2;

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
    if let Some(p) = read_json::<Probe>(cache)
        .filter(|p| p.boot_id == id && p.qemu == q && p.method == PROBE_METHOD && !reprobe)
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
        method: PROBE_METHOD,
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
    let disk = dir.join("probe.img");
    if let Err(e) = std::fs::write(&disk, probe_sector()) {
        return (false, format!("probe disk: {e}"));
    }
    run_sector(qemu, "kvm", &dir, &disk, &log, timeout)
}

/// Boots the probe disk under `accel` and waits for its marker.
fn run_sector(
    qemu: &Path,
    accel: &str,
    dir: &Path,
    disk: &Path,
    log: &Path,
    timeout: Duration,
) -> (bool, String) {
    let child = Command::new(qemu)
        .args([
            "-accel",
            accel,
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
        .arg("-drive")
        .arg(format!("file={},format=raw,if=ide", disk.display()))
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
        let text = String::from_utf8_lossy(&std::fs::read(log).unwrap_or_default()).into_owned();
        if text.contains(MARKER) {
            break (
                true,
                format!("guest code ran in {} ms", t0.elapsed().as_millis()),
            );
        }
        if text.contains("No bootable device") {
            break (false, "the firmware did not boot the probe disk".into());
        }
        if let Ok(Some(st)) = child.try_wait() {
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                use std::io::Read;
                let _ = e.read_to_string(&mut err);
            }
            let last = err.lines().last().unwrap_or("").to_string();
            break (false, format!("QEMU with {accel} exited ({st}): {last}"));
        }
        if t0.elapsed() > timeout {
            break (
                false,
                format!(
                    "the probe's guest code did not finish within {} ms under {accel}",
                    timeout.as_millis()
                ),
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(dir);
    result
}

/// What the probe's guest writes once its count is done.
const MARKER: &str = "LAMINA-KVM-OK";

/// Iterations of the probe's count.
const PROBE_COUNT: u32 = 200_000_000;

/// The probe's disk: one boot sector (16-bit real mode, loaded at 0x7c00)
/// and padding to 1 MiB so the firmware treats it as a disk. Its code:
///
/// ```text
/// xor ax,ax / mov ds,ax / cld        ; DS = 0 for lodsb
/// mov dx,0x402 / mov al,'S' / out    ; "S": started
/// mov ecx,PROBE_COUNT
/// l: dec ecx / jnz l                 ; the count
/// mov si,msg
/// p: lodsb / test al,al / jz d / out dx,al / jmp p
/// d: cli / hlt / jmp d
/// msg: "LAMINA-KVM-OK\n", 0
/// ```
pub fn probe_sector() -> Vec<u8> {
    let mut c: Vec<u8> = vec![
        0x31, 0xC0, 0x8E, 0xD8, 0xFC, 0xBA, 0x02, 0x04, 0xB0, b'S', 0xEE,
    ];
    c.extend([0x66, 0xB9]);
    c.extend(PROBE_COUNT.to_le_bytes());
    // dec ecx; jnz back to the dec (4 bytes back from the next one).
    c.extend([0x66, 0x49, 0x75, 0xFC]);
    let msg_at = c.len() + 1;
    c.extend([0xBE, 0, 0]);
    // lodsb; test al,al; jz +3; out dx,al; jmp -8 (to the lodsb).
    c.extend([0xAC, 0x84, 0xC0, 0x74, 0x03, 0xEE, 0xEB, 0xF8]);
    c.extend([0xFA, 0xF4, 0xEB, 0xFC]);
    // The sector is loaded at 0x7c00 and is far shorter than 64 KiB.
    let msg = 0x7C00u16 + c.len() as u16;
    c[msg_at..msg_at + 2].copy_from_slice(&msg.to_le_bytes());
    c.extend(MARKER.as_bytes());
    c.extend(b"\n\0");
    c.resize(510, 0);
    c.extend([0x55, 0xAA]);
    c.resize(1024 * 1024, 0);
    c
}

fn tempfile_dir() -> std::io::Result<std::path::PathBuf> {
    let d = std::env::temp_dir().join(format!("lamina-kvm-probe-{}", std::process::id()));
    std::fs::create_dir_all(&d)?;
    Ok(d)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_probe_sector_is_a_boot_sector_with_its_marker() {
        let d = probe_sector();
        assert_eq!(d.len(), 1024 * 1024);
        assert_eq!(&d[510..512], &[0x55, 0xAA]);
        let text = String::from_utf8_lossy(&d[..510]);
        assert!(text.contains(MARKER));
        // The message pointer names where the marker is.
        let at = u16::from_le_bytes([d[22], d[23]]) as usize - 0x7C00;
        assert!(d[at..].starts_with(MARKER.as_bytes()));
    }

    /// The sector really runs and writes its marker (under TCG, which works
    /// everywhere QEMU does).
    #[test]
    fn the_probe_sector_runs_under_tcg() {
        let qemu = Path::new("qemu-system-x86_64");
        if Command::new(qemu).arg("--version").output().is_err() {
            eprintln!("skipped: no qemu-system-x86_64");
            return;
        }
        let dir = std::env::temp_dir().join(format!("lamina-probe-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let disk = dir.join("probe.img");
        std::fs::write(&disk, probe_sector()).unwrap();
        let (ok, detail) = run_sector(
            qemu,
            "tcg",
            &dir,
            &disk,
            &dir.join("log"),
            Duration::from_secs(60),
        );
        assert!(ok, "{detail}");
    }
}
