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
    Some(GUEST.get_or_init(|| build(&[])))
}

/// The aarch64 fixture guest (`build.sh --arch aarch64`), built once per
/// test run.
pub fn guest_arm() -> Option<&'static Path> {
    static GUEST: OnceLock<PathBuf> = OnceLock::new();
    let qemu = Command::new("qemu-system-aarch64")
        .arg("--version")
        .output();
    if !require(
        qemu.is_ok(),
        "qemu-system-aarch64 (apt-get install qemu-system-arm)",
    ) {
        return None;
    }
    Some(GUEST.get_or_init(|| build(&["--arch", "aarch64"])))
}

fn build(args: &[&str]) -> PathBuf {
    let dir = tempfile::Builder::new()
        .prefix("lamina-guest-")
        .tempdir()
        .unwrap()
        .keep();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/guest/build.sh");
    let st = Command::new("bash")
        .arg(script)
        .args(args)
        .arg(&dir)
        .status()
        .unwrap();
    assert!(st.success(), "fixtures/guest/build.sh {args:?} failed");
    dir
}

/// Sends QMP commands on `sock`; false if QEMU could not be reached (it may
/// have just exited).
pub fn qmp(sock: &Path, commands: &[&str]) -> bool {
    use std::io::{BufRead, BufReader, Write};
    let attempt = || -> std::io::Result<()> {
        let s = std::os::unix::net::UnixStream::connect(sock)?;
        s.set_read_timeout(Some(std::time::Duration::from_secs(30)))?;
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

/// The fixture guest running in QEMU (TCG) from an NBD drive, its serial
/// console read on a thread so waits have a deadline.
pub struct Booted {
    child: std::process::Child,
    rx: std::sync::mpsc::Receiver<String>,
    /// Console lines so far.
    pub console: Vec<String>,
    qmp: PathBuf,
}

impl Booted {
    /// Boots the guest built in `guest` with `drive` (an NBD URI) as its
    /// virtio disk; `qmp` is the monitor socket to create.
    pub fn start(guest: &Path, drive: &str, qmp: &Path) -> Booted {
        use std::io::{BufRead, BufReader};
        use std::process::Stdio;
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
            .arg(format!("file={drive},format=raw,if=virtio"))
            .arg("-qmp")
            .arg(format!("unix:{},server,nowait", qmp.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        let stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Booted {
            child,
            rx,
            console: Vec::new(),
            qmp: qmp.to_owned(),
        }
    }

    /// Waits up to `secs` for a console line containing `marker`; fails
    /// the test on `LAMINA-GUEST-FAIL` or at the deadline.
    pub fn wait_for(&mut self, marker: &str, secs: u64) {
        use std::time::{Duration, Instant};
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(line) => {
                    let hit = line.contains(marker);
                    self.console.push(line);
                    assert!(
                        !self.console.last().unwrap().contains("LAMINA-GUEST-FAIL"),
                        "guest failed: {:#?}",
                        self.console
                    );
                    if hit {
                        return;
                    }
                }
                Err(e) => {
                    let mut err = String::new();
                    if matches!(e, std::sync::mpsc::RecvTimeoutError::Disconnected) {
                        // QEMU closed its console: it is gone.
                        let _ = self.child.wait();
                        if let Some(mut s) = self.child.stderr.take() {
                            let _ = std::io::Read::read_to_string(&mut s, &mut err);
                        }
                    }
                    panic!(
                        "no `{marker}` within {secs} s ({e}); console: {:#?}\nQEMU: {err}",
                        self.console
                    )
                }
            }
        }
    }

    /// Presses the power button (again every few seconds: a press the
    /// guest is not yet listening for is lost) until QEMU exits; returns
    /// its status.
    pub fn power_off(mut self) -> std::process::ExitStatus {
        use std::io::Read;
        use std::time::{Duration, Instant};
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut next_press = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            if Instant::now() >= next_press {
                // Best effort: QEMU may be exiting already.
                qmp(&self.qmp, &["{\"execute\":\"system_powerdown\"}"]);
                next_press = Instant::now() + Duration::from_secs(3);
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let mut err = String::new();
                let _ = self.child.stderr.take().unwrap().read_to_string(&mut err);
                panic!("QEMU did not power off: {err}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Booted {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
