//! Operations on a VM's QEMU: start (through a monitor), observe, stop,
//! kill, screenshot and block statistics. Every wait has a deadline.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill as send_signal, Signal};
use nix::unistd::Pid;
use serde::Serialize;
use serde_json::{json, Value};

use crate::error::{Error, IoContext, Result};
use crate::fsutil::tail;
use crate::monitor::{self, now_ns};
use crate::procfs;
use crate::qmp::Qmp;
use crate::rundir::{Exit, Run, RunDir};
use crate::spec::State;

/// How long a QMP command may take to answer.
const QMP_TIMEOUT: Duration = Duration::from_secs(10);

/// Starts the monitor `monitor` (a command whose process runs
/// [`monitor::launch`] on `dir`, after [`monitor::write_launch`] for
/// `run_id`) and waits until QEMU answers QMP. On failure QEMU is gone and
/// the error says why (QEMU's own last lines when it exited).
pub fn start(name: &str, dir: &RunDir, run_id: u64, mut monitor: Command) -> Result<Run> {
    let mlog = dir.file("monitor.log");
    let log = std::fs::File::create(&mlog).at(&mlog)?;
    use std::os::unix::process::CommandExt;
    let mut child = monitor
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .process_group(0)
        .spawn()
        .at(&mlog)?;
    let deadline = Instant::now() + monitor::READY_TIMEOUT + Duration::from_secs(10);
    let failed = |reason: String| Error::StartFailed {
        name: name.to_string(),
        reason,
    };
    loop {
        if let Some(run) = dir.run().filter(|r| r.run_id == run_id && r.ready) {
            return Ok(run);
        }
        if let Some(exit) = dir.exit(run_id) {
            // The monitor records the exit and ends; reap it.
            let _ = child.wait();
            return Err(failed(exit.reason));
        }
        if let Ok(Some(st)) = child.try_wait() {
            if let Some(exit) = dir.exit(run_id) {
                return Err(failed(exit.reason));
            }
            return Err(failed(format!(
                "the monitor ended ({st}): {}",
                tail(&mlog, 2)
            )));
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            if let Some(run) = dir.run().filter(|r| r.run_id == run_id) {
                kill_run(&run);
            }
            return Err(failed("QEMU did not answer QMP in time".into()));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// What [`observe`] found.
#[derive(Debug, Clone)]
pub struct Observation {
    /// The state now.
    pub state: State,
    /// How the run ended, when it has.
    pub exit: Option<Exit>,
    /// QEMU runs but no monitor watches it (spawn one in attach mode).
    pub unwatched: bool,
}

/// The state of the run `run` of the VM in `dir`: running (pid with its
/// start time alive and a QMP handshake), unknown (alive, no QMP answer) or
/// powered off (with the recorded exit, or an exit of unknown status).
pub fn observe(dir: &RunDir, run: &Run) -> Observation {
    if procfs::alive(run.pid, run.start_ticks) {
        let state = match Qmp::connect(&dir.qmp(), Duration::from_secs(3)) {
            Ok(_) => State::Running,
            Err(e) => {
                tracing::warn!("{e}");
                State::Unknown
            }
        };
        return Observation {
            state,
            exit: None,
            unwatched: !monitor::is_watched(dir),
        };
    }
    Observation {
        state: State::PoweredOff,
        exit: Some(ended(dir, run)),
        unwatched: false,
    }
}

/// How the run `run`, whose QEMU is gone, ended: as its monitor recorded
/// it, or (no monitor, or none within 2 s) of unknown status.
fn ended(dir: &RunDir, run: &Run) -> Exit {
    // The monitor writes exit.json right after reaping; give it a moment.
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let watched = monitor::is_watched(dir);
        if let Some(e) = dir.exit(run.run_id) {
            return e;
        }
        if Instant::now() > deadline || !watched {
            let mut e = Exit {
                run_id: run.run_id,
                at_ns: now_ns(),
                code: None,
                signal: None,
                shutdown: None,
                requested: dir.intent(run.run_id),
                reason: String::new(),
            };
            e.reason = monitor::describe(&e, "");
            return e;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn kill_run(run: &Run) {
    if procfs::alive(run.pid, run.start_ticks) {
        let _ = send_signal(Pid::from_raw(run.pid), Signal::SIGKILL);
    }
}

/// Waits for the run's QEMU to go away; false on timeout.
fn wait_gone(run: &Run, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while procfs::alive(run.pid, run.start_ticks) {
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    true
}

/// Asks the guest to power down (QMP `system_powerdown`, repeated every 2 s:
/// a guest may miss an early press), and kills QEMU if it has not exited
/// after `timeout`. Returns how the run ended.
pub fn stop(dir: &RunDir, run: &Run, timeout: Duration) -> Result<Exit> {
    dir.set_intent(run.run_id, "stop")?;
    let deadline = Instant::now() + timeout;
    let mut next_press = Instant::now();
    while procfs::alive(run.pid, run.start_ticks) {
        if Instant::now() > deadline {
            dir.set_intent(run.run_id, "stop-timeout")?;
            kill_run(run);
            if !wait_gone(run, Duration::from_secs(10)) {
                return Err(Error::Timeout(format!(
                    "QEMU pid {} survived SIGKILL",
                    run.pid
                )));
            }
            break;
        }
        if Instant::now() >= next_press {
            // QEMU may be exiting already: a failed press is not an error.
            if let Ok(mut q) = Qmp::connect(&dir.qmp(), Duration::from_secs(2)) {
                let _ = q.execute("system_powerdown", None);
            }
            next_press = Instant::now() + Duration::from_secs(2);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(ended(dir, run))
}

/// Kills QEMU at once (SIGKILL). Returns how the run ended.
pub fn kill(dir: &RunDir, run: &Run) -> Result<Exit> {
    dir.set_intent(run.run_id, "kill")?;
    kill_run(run);
    if !wait_gone(run, Duration::from_secs(10)) {
        return Err(Error::Timeout(format!(
            "QEMU pid {} survived SIGKILL",
            run.pid
        )));
    }
    Ok(ended(dir, run))
}

/// Saves the VM's screen as a PNG at `file` (written whole or not at all).
pub fn screenshot(dir: &RunDir, file: &Path) -> Result<()> {
    let tmp = dir.file("screenshot.png");
    let _ = std::fs::remove_file(&tmp);
    let mut q = Qmp::connect(&dir.qmp(), QMP_TIMEOUT)?;
    q.execute(
        "screendump",
        Some(json!({ "filename": tmp.to_string_lossy(), "format": "png" })),
    )?;
    let data = std::fs::read(&tmp).at(&tmp)?;
    if !data.starts_with(b"\x89PNG\r\n\x1a\n") {
        return Err(Error::Qmp {
            sock: dir.qmp(),
            reason: "screendump did not write a PNG".into(),
        });
    }
    let part = file.with_extension("png.part");
    std::fs::write(&part, &data).at(&part)?;
    std::fs::rename(&part, file).at(file)?;
    let _ = std::fs::remove_file(&tmp);
    Ok(())
}

/// I/O counters of one disk of a VM.
#[derive(Debug, Clone, Serialize)]
pub struct BlockStats {
    /// QEMU's drive id.
    pub device: String,
    /// Bytes read.
    pub read_bytes: u64,
    /// Bytes written.
    pub write_bytes: u64,
    /// Read requests.
    pub read_ops: u64,
    /// Write requests.
    pub write_ops: u64,
    /// Flush requests.
    pub flush_ops: u64,
}

/// Disk counters from QMP `query-blockstats`.
pub fn block_stats(dir: &RunDir) -> Result<Vec<BlockStats>> {
    let mut q = Qmp::connect(&dir.qmp(), QMP_TIMEOUT)?;
    let r = q.execute("query-blockstats", None)?;
    let n = |s: &Value, k: &str| s[k].as_u64().unwrap_or(0);
    Ok(r.as_array()
        .map(|a| {
            a.iter()
                .filter(|d| d["device"].as_str().is_some_and(|s| !s.is_empty()))
                .map(|d| {
                    let s = &d["stats"];
                    BlockStats {
                        device: d["device"].as_str().unwrap_or_default().to_string(),
                        read_bytes: n(s, "rd_bytes"),
                        write_bytes: n(s, "wr_bytes"),
                        read_ops: n(s, "rd_operations"),
                        write_ops: n(s, "wr_operations"),
                        flush_ops: n(s, "flush_operations"),
                    }
                })
                .collect()
        })
        .unwrap_or_default())
}
