//! What a host agent does on its host: the VM runner and the disk view, run
//! as `lamina` commands on the host's store (each one the same, tested
//! command an admin would type), plus the host's figures from /proc.
//!
//! A pool VM `NAME` has a disk `NAME` (over the pool's base layer) and a
//! VM `NAME` whose disk is `nbd+unix:///NAME?socket=STORE/broker/NAME.nbd`,
//! served by its own `lamina serve` process (pid in `NAME.serve.pid`), so
//! that a reset or removal of one disk never waits for another VM. Those
//! server processes and the VMs' monitors live in their own process
//! groups: a restarted agent finds them again.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// What a host reports.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostReport {
    /// CPUs of the host.
    pub cpus: u32,
    /// 1-minute load average.
    pub load1: f64,
    /// Memory of the host, bytes.
    pub mem_total: u64,
    /// Memory available now (MemAvailable), bytes.
    pub mem_available: u64,
    /// Memory this agent may give VMs (`--memory`, else the host's).
    pub mem_capacity: u64,
    /// Memory of the agent's running VMs (their templates' sizes).
    pub mem_committed: u64,
    /// Free for new VMs: the smaller of available and capacity − committed.
    pub mem_free: u64,
    /// The agent's VMs.
    pub vms: Vec<VmReport>,
}

/// One VM as its host sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmReport {
    /// Name.
    pub name: String,
    /// `running`, `powered-off`, `unknown`.
    pub state: String,
    /// Display profile.
    #[serde(default)]
    pub profile: Option<String>,
    /// Template.
    #[serde(default)]
    pub template: String,
    /// CPU use over a short sample, percent of one CPU.
    #[serde(default)]
    pub cpu_percent: Option<f64>,
    /// Resident memory of its QEMU.
    #[serde(default)]
    pub rss_bytes: Option<u64>,
    /// Its network peripherals (`lamina vm peripheral`).
    #[serde(default)]
    pub peripherals: Vec<PeripheralReport>,
}

/// A VM's network peripheral, as its host reports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeripheralReport {
    /// Name.
    pub name: String,
    /// `serial`, `printer`, `usb`.
    pub kind: String,
    /// Where it is in the guest (`ttyS1`, `lp0`, `usb`, ...).
    pub device: String,
    /// `connect tcp:HOST:PORT` or `listen tcp:ADDR:PORT`.
    pub link: String,
    /// The link's state (`connected`, `retrying`, ...; `off`).
    pub state: String,
}

/// A request for a new VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateVm {
    /// VM (and disk) name.
    pub name: String,
    /// Template, defined on the host.
    pub template: String,
    /// Base layer (`LAYER` or `LAYER@VERSION`) on the host.
    pub base: String,
}

#[derive(Deserialize)]
struct TemplateRow {
    name: String,
    memory_mib: u64,
}

/// The host's side: its store and the `lamina` binary to run on it.
#[derive(Debug, Clone)]
pub struct HostOps {
    lamina: PathBuf,
    store: PathBuf,
    capacity: Option<u64>,
}

/// Longest a `vm start` may take (it waits for QMP itself).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(180);

impl HostOps {
    /// Operations on the store at `store` with the `lamina` binary at
    /// `lamina`; `capacity`: memory (bytes) VMs may take in all.
    pub fn new(lamina: PathBuf, store: PathBuf, capacity: Option<u64>) -> HostOps {
        HostOps {
            lamina,
            store,
            capacity,
        }
    }

    fn dir(&self) -> PathBuf {
        self.store.join("broker")
    }

    fn socket(&self, name: &str) -> PathBuf {
        self.dir().join(format!("{name}.nbd"))
    }

    fn pid_file(&self, name: &str) -> PathBuf {
        self.dir().join(format!("{name}.serve.pid"))
    }

    /// Runs `lamina --json --quiet ARGS` on the store; its stdout.
    fn run(&self, args: &[&str]) -> Result<Vec<u8>> {
        let line = args.join(" ");
        tracing::debug!(command = %line, "running");
        let child = Command::new(&self.lamina)
            .arg("--store")
            .arg(&self.store)
            .args(["--json", "--quiet"])
            .args(args)
            .env_remove("LAMINA_STORE")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| Error::io(format!("cannot run {}", self.lamina.display()), e))?;
        let out = wait_output(child, COMMAND_TIMEOUT)
            .map_err(|e| Error::io(format!("`lamina {line}`"), e))?;
        if out.status.success() {
            return Ok(out.stdout);
        }
        let stderr = String::from_utf8_lossy(&out.stderr);
        let message = stderr
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .map(|l| l.trim().trim_start_matches("error: ").to_owned())
            .unwrap_or_else(|| format!("exit {}", out.status));
        Err(Error::Command {
            command: line,
            message,
        })
    }

    fn run_json<T: serde::de::DeserializeOwned>(&self, args: &[&str]) -> Result<T> {
        let out = self.run(args)?;
        serde_json::from_slice(&out).map_err(|e| Error::Command {
            command: args.join(" "),
            message: format!("unexpected output: {e}"),
        })
    }

    /// The host's figures and VMs.
    ///
    /// # Errors
    /// /proc or a command fails.
    pub fn report(&self) -> Result<HostReport> {
        let vms: Vec<VmReport> = self.run_json(&["vm", "ls"])?;
        let templates: Vec<TemplateRow> = self.run_json(&["vm", "template", "ls"])?;
        let mem_committed = vms
            .iter()
            .filter(|v| v.state != "powered-off")
            .filter_map(|v| templates.iter().find(|t| t.name == v.template))
            .map(|t| t.memory_mib * 1024 * 1024)
            .sum();
        let (mem_total, mem_available) = meminfo()?;
        let mem_capacity = self.capacity.unwrap_or(mem_total);
        Ok(HostReport {
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get() as u32),
            load1: loadavg()?,
            mem_total,
            mem_available,
            mem_capacity,
            mem_committed,
            mem_free: mem_available.min(mem_capacity.saturating_sub(mem_committed)),
            vms,
        })
    }

    /// Creates and starts a VM with its own disk over `req.base`.
    ///
    /// # Errors
    /// A bad template or base, a name in use, QEMU failing to start; what
    /// was made is removed again.
    pub fn create(&self, req: &CreateVm) -> Result<VmReport> {
        lamina_vm::check_name("VM name", &req.name)
            .map_err(|e| Error::InvalidInput(e.to_string()))?;
        if !socket_fits(&self.socket(&req.name)) {
            return Err(Error::InvalidInput(format!(
                "the disk socket {} would be longer than a Unix socket address allows (107 bytes): use a shorter store path or VM name",
                self.socket(&req.name).display()
            )));
        }
        std::fs::create_dir_all(self.dir())
            .map_err(|e| Error::io(format!("cannot create {}", self.dir().display()), e))?;
        let uri = format!(
            "nbd+unix:///{}?socket={}",
            req.name,
            self.socket(&req.name).display()
        );
        self.run(&["disk", "create", &req.name, "--base", &req.base])?;
        let made = self
            .run(&[
                "vm",
                "create",
                &req.name,
                "--template",
                &req.template,
                "--disk",
                &uri,
            ])
            .and_then(|_| self.start(&req.name));
        if let Err(e) = made {
            tracing::warn!(vm = %req.name, error = %e, "creation failed: removing what was made");
            let _ = self.destroy(&req.name);
            return Err(e);
        }
        self.vm(&req.name)
    }

    fn vm(&self, name: &str) -> Result<VmReport> {
        let vms: Vec<VmReport> = self.run_json(&["vm", "ls"])?;
        vms.into_iter()
            .find(|v| v.name == name)
            .ok_or_else(|| Error::NotFound(format!("no VM named {name:?} on this host")))
    }

    /// Starts a stopped VM (and its disk's server).
    ///
    /// # Errors
    /// QEMU fails to start, no such VM.
    pub fn start(&self, name: &str) -> Result<()> {
        self.serve_disk(name)?;
        self.run(&["vm", "start", name])?;
        Ok(())
    }

    /// Powers a VM off (ACPI, then kill) and stops its disk's server.
    ///
    /// # Errors
    /// No such VM.
    pub fn stop(&self, name: &str) -> Result<()> {
        self.run(&["vm", "stop", name, "--timeout", "20"])?;
        self.stop_disk_server(name);
        Ok(())
    }

    /// Kills a VM, drops its disk's changes and starts it again: the
    /// reverting card of a stateless pool.
    ///
    /// # Errors
    /// No such VM, QEMU fails to start.
    pub fn reset(&self, name: &str) -> Result<()> {
        self.kill(name)?;
        self.stop_disk_server(name);
        self.run(&["disk", "reset", name])?;
        self.start(name)
    }

    fn kill(&self, name: &str) -> Result<()> {
        match self.run(&["vm", "kill", name]) {
            Ok(_) => Ok(()),
            // Already off.
            Err(Error::Command { message, .. }) if message.contains("not running") => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Removes a VM and its disk; absent parts are fine.
    ///
    /// # Errors
    /// A part that exists cannot be removed.
    pub fn destroy(&self, name: &str) -> Result<()> {
        let absent = |e: &Error| matches!(e, Error::Command { message, .. } if message.starts_with("no ") || message.contains("not found"));
        if let Err(e) = self.run(&["vm", "destroy", name, "--force"]) {
            if !absent(&e) {
                return Err(e);
            }
        }
        self.stop_disk_server(name);
        if let Err(e) = self.run(&["disk", "rm", name]) {
            if !absent(&e) {
                return Err(e);
            }
        }
        let _ = std::fs::remove_file(self.socket(name));
        let _ = std::fs::remove_file(self.pid_file(name));
        Ok(())
    }

    /// The VM's VNC socket.
    ///
    /// # Errors
    /// No such VM.
    pub fn vnc_socket(&self, name: &str) -> Result<PathBuf> {
        let v: serde_json::Value = self.run_json(&["vm", "show", name])?;
        v["paths"]["vnc"]
            .as_str()
            .map(PathBuf::from)
            .ok_or_else(|| Error::NotFound(format!("VM {name} has no VNC socket")))
    }

    /// The pid of the disk server of `name`, if it runs.
    fn disk_server(&self, name: &str) -> Option<i32> {
        let pid: i32 = std::fs::read_to_string(self.pid_file(name))
            .ok()?
            .trim()
            .parse()
            .ok()?;
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let sock = self.socket(name);
        let sock = sock.as_os_str().as_encoded_bytes();
        // A reused pid runs something else: only ours counts.
        cmdline
            .split(|b| *b == 0)
            .any(|arg| arg == sock)
            .then_some(pid)
    }

    /// Starts `lamina serve` for disk `name` unless it runs; waits until its
    /// socket answers.
    fn serve_disk(&self, name: &str) -> Result<()> {
        if self.disk_server(name).is_some() {
            return Ok(());
        }
        let sock = self.socket(name);
        let _ = std::fs::remove_file(&sock);
        let log = std::fs::File::create(self.dir().join(format!("{name}.serve.log")))
            .map_err(|e| Error::io("cannot create the disk server's log", e))?;
        let mut cmd = Command::new(&self.lamina);
        cmd.arg("--store")
            .arg(&self.store)
            .arg("serve")
            .arg("--socket")
            .arg(&sock)
            .env_remove("LAMINA_STORE")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let mut child = cmd
            .spawn()
            .map_err(|e| Error::io(format!("cannot run {}", self.lamina.display()), e))?;
        let pid = child.id();
        let tmp = self.pid_file(name).with_extension("tmp");
        std::fs::write(&tmp, format!("{pid}\n"))
            .and_then(|()| std::fs::rename(&tmp, self.pid_file(name)))
            .map_err(|e| Error::io("cannot write the disk server's pid file", e))?;
        // Reap it when it ends; it outlives this agent otherwise.
        let exited = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = exited.clone();
        std::thread::spawn(move || {
            let _ = child.wait();
            flag.store(true, std::sync::atomic::Ordering::SeqCst);
        });
        // Generous: a loaded host (VMs booting under TCG) is slow to start
        // one more process.
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if std::os::unix::net::UnixStream::connect(&sock).is_ok() {
                return Ok(());
            }
            // (Not `disk_server`: until the child has exec'd, its command
            // line is still this agent's.)
            if exited.load(std::sync::atomic::Ordering::SeqCst) {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let log = std::fs::read_to_string(self.dir().join(format!("{name}.serve.log")))
            .unwrap_or_default();
        let last = log
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("no output");
        Err(Error::Command {
            command: format!("serve --socket {}", sock.display()),
            message: format!("the disk server did not start: {last}"),
        })
    }

    /// Stops the disk server of `name` (SIGTERM: it flushes and closes the
    /// disk), waiting until it is gone.
    fn stop_disk_server(&self, name: &str) {
        let Some(pid) = self.disk_server(name) else {
            return;
        };
        let pid = nix::unistd::Pid::from_raw(pid);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.disk_server(name).is_some() {
            if Instant::now() > deadline {
                tracing::warn!(disk = name, "disk server ignores SIGTERM: killing it");
                let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
                std::thread::sleep(Duration::from_millis(100));
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = std::fs::remove_file(self.pid_file(name));
    }
}

/// Waits for a child's output, killing it after `timeout`.
fn wait_output(
    mut child: std::process::Child,
    timeout: Duration,
) -> std::io::Result<std::process::Output> {
    use std::io::Read;
    let mut stdout = child.stdout.take();
    let mut stderr = child.stderr.take();
    let out_t = std::thread::spawn(move || {
        let mut b = Vec::new();
        if let Some(s) = stdout.as_mut() {
            let _ = s.read_to_end(&mut b);
        }
        b
    });
    let err_t = std::thread::spawn(move || {
        let mut b = Vec::new();
        if let Some(s) = stderr.as_mut() {
            let _ = s.read_to_end(&mut b);
        }
        b
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no answer within {} s", timeout.as_secs()),
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Ok(std::process::Output {
        status,
        stdout: out_t.join().unwrap_or_default(),
        stderr: err_t.join().unwrap_or_default(),
    })
}

fn meminfo() -> Result<(u64, u64)> {
    let text = std::fs::read_to_string("/proc/meminfo")
        .map_err(|e| Error::io("cannot read /proc/meminfo", e))?;
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| {
                rest.trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .ok()
            })
            .map_or(0, |kib| kib * 1024)
    };
    Ok((field("MemTotal:"), field("MemAvailable:")))
}

fn loadavg() -> Result<f64> {
    let text = std::fs::read_to_string("/proc/loadavg")
        .map_err(|e| Error::io("cannot read /proc/loadavg", e))?;
    Ok(text
        .split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0))
}

/// Whether `path` would fit a Unix socket address (107 bytes).
pub(crate) fn socket_fits(path: &Path) -> bool {
    path.as_os_str().len() < 108
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn host_figures_come_from_proc() {
        let (total, avail) = meminfo().unwrap();
        assert!(total > 0 && avail > 0 && avail <= total);
        assert!(loadavg().unwrap() >= 0.0);
    }

    #[test]
    fn a_command_that_hangs_is_killed_at_its_deadline() {
        let child = Command::new("sleep")
            .arg("30")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let t = Instant::now();
        let e = wait_output(child, Duration::from_millis(200)).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::TimedOut);
        assert!(t.elapsed() < Duration::from_secs(10));
    }
}
