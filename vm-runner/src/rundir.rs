//! A VM's runtime directory: sockets, logs and the files through which the
//! monitor, QEMU and the command line meet.
//!
//! | file          | written by | what |
//! |---------------|------------|------|
//! | `qmp.sock`    | QEMU       | QMP for commands (stop, screenshot, stats) |
//! | `watch.sock`  | QEMU       | QMP kept open by the monitor for events |
//! | `vnc.sock`    | QEMU       | the VNC display |
//! | `console.sock`| QEMU       | the serial console (one client at a time) |
//! | `console.log` | QEMU       | everything the serial console printed |
//! | `qemu.log`    | QEMU       | QEMU's own stdout and stderr |
//! | `launch.json` | starter    | the QEMU command line of the next run |
//! | `run.json`    | monitor    | the running QEMU: [`Run`] |
//! | `exit.json`   | monitor    | how it ended: [`Exit`] |
//! | `intent`      | stop/kill  | why QEMU is being stopped |
//! | `monitor.lock`| monitor    | flock held while a monitor watches QEMU |
//! | `monitor.log` | monitor    | its log |
//! | `net.counters`| relays     | bytes relayed for `allow:` networking |

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, IoContext, Result};
use crate::fsutil::{read_json, write_json};

/// Longest Unix socket path (`sun_path` less its NUL).
const MAX_SOCKET_PATH: usize = 107;

/// The runtime directory of one VM.
#[derive(Debug, Clone)]
pub struct RunDir {
    dir: PathBuf,
}

/// A running (or last) QEMU process of a VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Run {
    /// Identifies this run (random), so records of older runs are ignored.
    pub run_id: u64,
    /// QEMU's pid.
    pub pid: i32,
    /// QEMU's start time in clock ticks since boot (/proc/PID/stat field
    /// 22): with the pid, it tells this QEMU from a process that reused
    /// the pid.
    pub start_ticks: u64,
    /// The monitor's pid.
    pub monitor_pid: i32,
    /// When QEMU started, ns since the epoch.
    pub started_ns: i64,
    /// The accelerator it runs with (`kvm` or `tcg`).
    pub accel: String,
    /// QMP answered the handshake.
    pub ready: bool,
}

/// How a QEMU run ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Exit {
    /// The run that ended.
    pub run_id: u64,
    /// When it was noticed, ns since the epoch.
    pub at_ns: i64,
    /// QEMU's exit code, if it exited (known when the monitor reaped it).
    pub code: Option<i32>,
    /// The signal that killed it, if one did.
    pub signal: Option<i32>,
    /// The reason QEMU gave in its last QMP `SHUTDOWN` event
    /// (`guest-shutdown`, `host-qmp-quit`, `host-signal`, `guest-panic`, ...).
    pub shutdown: Option<String>,
    /// What Lamina asked for (`stop`, `kill`, `stop-timeout`), if anything.
    pub requested: Option<String>,
    /// One line for people.
    pub reason: String,
}

impl RunDir {
    /// The runtime directory `dir` (created if missing). Fails if socket
    /// paths inside it would be too long for a Unix socket.
    pub fn create(dir: &Path) -> Result<RunDir> {
        let longest = dir.join("console.sock");
        if longest.as_os_str().len() > MAX_SOCKET_PATH {
            return Err(Error::Invalid(format!(
                "runtime directory {} is too deep for Unix sockets ({} > {MAX_SOCKET_PATH} bytes); use a store with a shorter path",
                dir.display(),
                longest.as_os_str().len()
            )));
        }
        std::fs::create_dir_all(dir).at(dir)?;
        Ok(RunDir {
            dir: dir.to_path_buf(),
        })
    }

    /// The directory, without creating it.
    pub fn at(dir: &Path) -> RunDir {
        RunDir {
            dir: dir.to_path_buf(),
        }
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// A file in it.
    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// QMP socket for commands.
    pub fn qmp(&self) -> PathBuf {
        self.file("qmp.sock")
    }
    /// QMP socket the monitor watches.
    pub fn watch(&self) -> PathBuf {
        self.file("watch.sock")
    }
    /// VNC display socket.
    pub fn vnc(&self) -> PathBuf {
        self.file("vnc.sock")
    }
    /// Serial console socket.
    pub fn console_sock(&self) -> PathBuf {
        self.file("console.sock")
    }
    /// Serial console log.
    pub fn console_log(&self) -> PathBuf {
        self.file("console.log")
    }
    /// Network byte counters of `allow:` relays.
    pub fn net_counters(&self) -> PathBuf {
        self.file("net.counters")
    }

    /// The current run as the monitor wrote it.
    pub fn run(&self) -> Option<Run> {
        read_json(&self.file("run.json"))
    }
    pub(crate) fn write_run(&self, run: &Run) -> Result<()> {
        write_json(&self.file("run.json"), run)
    }

    /// How the run `run_id` ended, if the monitor recorded it.
    pub fn exit(&self, run_id: u64) -> Option<Exit> {
        read_json::<Exit>(&self.file("exit.json")).filter(|e| e.run_id == run_id)
    }
    pub(crate) fn write_exit(&self, exit: &Exit) -> Result<()> {
        write_json(&self.file("exit.json"), exit)
    }

    /// Why QEMU is being stopped, for the run `run_id`.
    pub(crate) fn intent(&self, run_id: u64) -> Option<String> {
        let text = std::fs::read_to_string(self.file("intent")).ok()?;
        let (id, what) = text.trim().split_once(' ')?;
        (id.parse::<u64>().ok()? == run_id).then(|| what.to_string())
    }
    pub(crate) fn set_intent(&self, run_id: u64, what: &str) -> Result<()> {
        let p = self.file("intent");
        std::fs::write(&p, format!("{run_id} {what}\n")).at(&p)
    }

    /// Bytes relayed to and from the guest by `allow:` relays: (to guest,
    /// from guest), over finished connections.
    pub fn relayed_bytes(&self) -> (u64, u64) {
        let text = std::fs::read_to_string(self.net_counters()).unwrap_or_default();
        text.lines()
            .filter_map(|l| {
                let (a, b) = l.split_once(' ')?;
                Some((a.parse::<u64>().ok()?, b.parse::<u64>().ok()?))
            })
            .fold((0, 0), |(a, b), (x, y)| (a + x, b + y))
    }
}
