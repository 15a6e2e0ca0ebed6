//! VMs on a scratch store, started by `lamina vm`, with the fixture guest.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::guest::guest;
use super::{run_ok, Env};

pub const APPEND: &str = "console=ttyS0 quiet panic=-1";

/// An Env whose VMs are killed when the test ends, passed or not.
pub struct Vms(pub Env);

impl Drop for Vms {
    fn drop(&mut self) {
        let out = self.0.run(&["--json", "vm", "ls"]);
        if let Ok(list) = serde_json::from_slice::<Value>(&out.stdout) {
            for v in list.as_array().into_iter().flatten() {
                if v["state"] != "powered-off" {
                    let _ = self.0.run(&["vm", "kill", v["name"].as_str().unwrap()]);
                }
            }
        }
    }
}

impl std::ops::Deref for Vms {
    type Target = Env;
    fn deref(&self) -> &Env {
        &self.0
    }
}

impl Vms {
    /// A new store, if QEMU and the fixture guest are there (in CI they
    /// must be).
    pub fn new() -> Option<Vms> {
        guest().map(|_| Vms(Env::new()))
    }

    /// A template booting the fixture guest; `extra` appends to the kernel
    /// command line.
    pub fn template(&self, name: &str, profile: &str, net: &str, extra: &str) {
        let append = format!("{APPEND} {extra}");
        self.template_of(
            name,
            profile,
            "x86_64",
            guest().unwrap(),
            net,
            append.trim(),
        );
    }

    /// A `phone` template for the aarch64 fixture guest in `g`, without a
    /// network card; `extra` appends to the kernel command line.
    pub fn phone_template(&self, name: &str, g: &Path, extra: &str) {
        let append = format!("console=ttyAMA0 quiet panic=-1 {extra}");
        self.template_of(name, "phone", "aarch64", g, "none", append.trim());
    }

    fn template_of(
        &self,
        name: &str,
        profile: &str,
        arch: &str,
        g: &Path,
        net: &str,
        append: &str,
    ) {
        self.ok(&[
            "vm",
            "template",
            "create",
            name,
            "--profile",
            profile,
            "--arch",
            arch,
            "--memory",
            "256",
            "--net",
            net,
            "--kernel",
            g.join("vmlinuz").to_str().unwrap(),
            "--initrd",
            g.join("initrd.img").to_str().unwrap(),
            "--append",
            append,
        ]);
    }

    /// A qcow2 overlay over the fixture disk, for one VM.
    pub fn overlay(&self, name: &str) -> PathBuf {
        self.overlay_on(name, &guest().unwrap().join("disk.raw"))
    }

    /// A qcow2 overlay over the raw image `base`, for one VM.
    pub fn overlay_on(&self, name: &str, base: &Path) -> PathBuf {
        let disk = self.path(&format!("{name}.qcow2"));
        run_ok(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-F",
                "raw",
                "-b",
                base.to_str().unwrap(),
                disk.to_str().unwrap(),
            ],
        );
        disk
    }

    /// `vm create NAME --template T` on a new qcow2 overlay; returns the overlay.
    pub fn vm_on_overlay(&self, name: &str, template: &str) -> PathBuf {
        let disk = self.overlay(name);
        self.ok(&[
            "vm",
            "create",
            name,
            "--template",
            template,
            "--disk",
            disk.to_str().unwrap(),
        ]);
        disk
    }

    pub fn show(&self, vm: &str) -> Value {
        self.json(&["vm", "show", vm])
    }

    pub fn console_log(&self, vm: &str) -> PathBuf {
        PathBuf::from(self.show(vm)["paths"]["console_log"].as_str().unwrap())
    }

    /// Waits for `marker` in the VM's console log; fails on a guest failure.
    pub fn wait_console(&self, vm: &str, marker: &str, secs: u64) -> String {
        let log = self.console_log(vm);
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            assert!(!text.contains("LAMINA-GUEST-FAIL"), "guest failed: {text}");
            if text.contains(marker) {
                return text;
            }
            assert!(
                Instant::now() < deadline,
                "no {marker} within {secs} s: {text:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn state(&self, vm: &str) -> Value {
        let list = self.json(&["vm", "ls"]);
        list.as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == vm)
            .unwrap()
            .clone()
    }
}

/// Asserts a PNG of `w`×`h` with more than one colour.
pub fn assert_screenshot(file: &Path, w: u32, h: u32) {
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(file).unwrap()));
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    assert_eq!((info.width, info.height), (w, h), "{}", file.display());
    let px = info.color_type.samples();
    let pixels: std::collections::HashSet<&[u8]> = buf[..info.buffer_size()].chunks(px).collect();
    assert!(
        pixels.len() >= 4,
        "{} has {} colours",
        file.display(),
        pixels.len()
    );
}

/// Stops `vm` with `vm stop` and checks it ends powered off by the guest.
pub fn stop_ok(env: &Vms, vm: &str) {
    let r = env.json(&["vm", "stop", vm, "--timeout", "120"]);
    assert_eq!(r["state"], "powered-off", "{r}");
    assert_eq!(r["exit"]["shutdown"], "guest-shutdown", "{r}");
    assert_eq!(r["exit"]["code"], 0, "{r}");
    assert_eq!(env.state(vm)["state"], "powered-off");
}

/// The colours of the fixture guest's 8 vertical bars in a screenshot: the
/// pixel at the middle of each bar, on the middle row (RGB).
pub fn bar_colours(file: &Path) -> Vec<[u8; 3]> {
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(file).unwrap()));
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    let px = info.color_type.samples();
    let (w, h) = (info.width as usize, info.height as usize);
    let row = &buf[(h / 2) * info.line_size..];
    (0..8)
        .map(|i| {
            let x = (w / 8) * i + w / 16;
            let p = &row[x * px..x * px + 3];
            [p[0], p[1], p[2]]
        })
        .collect()
}

/// The bars the fixture guest draws, left to right.
pub const BARS: [[u8; 3]; 8] = [
    [255, 255, 255],
    [255, 255, 0],
    [0, 255, 255],
    [0, 255, 0],
    [255, 0, 255],
    [255, 0, 0],
    [0, 0, 255],
    [0, 0, 0],
];
