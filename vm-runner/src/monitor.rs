//! The per-VM monitor: the process that starts QEMU, watches it and records
//! how it ended.
//!
//! The command line cannot wait for a VM (it exits), so `vm start` runs a
//! monitor in the background (the same binary, its own process group). The
//! monitor holds `monitor.lock` for as long as it watches:
//!
//! - **launch**: it starts QEMU as its child from `launch.json`, writes
//!   `run.json`, connects to QEMU's second QMP socket (`watch.sock`) and
//!   marks the run ready; it then remembers QMP `SHUTDOWN` events, reaps
//!   QEMU (exit code or signal) and writes `exit.json`.
//! - **attach**: after the monitor itself died (a restart of Lamina), a new
//!   one re-attaches to the QEMU still running: it watches the same events
//!   and notices the pid going away. QEMU is no longer its child, so the
//!   exit code is then unknown; the QMP reason is still known.
//!
//! Either way the caller's `on_exit` then records the exit in its catalog.
//! The monitor also runs the adapters of the VM's network peripherals
//! ([`crate::peripheral::adapter`]): they live and die with it.

use std::fs::File;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::error::{Error, IoContext, Result};
use crate::fsutil::{read_json, tail, write_json};
use crate::procfs;
use crate::qmp::Qmp;
use crate::rundir::{Exit, Run, RunDir};

/// How long QEMU may take to answer QMP after it started.
pub const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// What the starter hands to the monitor (`launch.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Launch {
    /// The run this launch starts.
    pub run_id: u64,
    /// The QEMU binary.
    pub program: PathBuf,
    /// Its arguments.
    pub args: Vec<String>,
    /// `kvm` or `tcg`.
    pub accel: String,
}

/// Writes `launch.json`.
pub fn write_launch(dir: &RunDir, launch: &Launch) -> Result<()> {
    write_json(&dir.file("launch.json"), launch)
}

/// Nanoseconds since the epoch.
pub fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i64)
}

/// Takes `monitor.lock`; `None` if another monitor holds it.
fn lock(dir: &RunDir) -> Result<Option<File>> {
    let p = dir.file("monitor.lock");
    let f = File::create(&p).at(&p)?;
    match f.try_lock() {
        Ok(()) => Ok(Some(f)),
        Err(std::fs::TryLockError::WouldBlock) => Ok(None),
        Err(std::fs::TryLockError::Error(e)) => Err(e).at(p),
    }
}

/// Whether a monitor is watching the VM of `dir`.
pub fn is_watched(dir: &RunDir) -> bool {
    matches!(lock(dir), Ok(None))
}

/// Launch mode: runs QEMU from `launch.json` and watches it to the end.
pub fn launch(dir: &RunDir, on_exit: &mut dyn FnMut(&Exit)) -> Result<()> {
    let Some(_lock) = lock(dir)? else {
        return Err(Error::Invalid(format!(
            "{}: another monitor is running",
            dir.path().display()
        )));
    };
    let l: Launch = read_json(&dir.file("launch.json"))
        .ok_or_else(|| Error::Invalid(format!("{}: no launch.json", dir.path().display())))?;
    let _ = std::fs::remove_file(dir.file("intent"));
    // The network side of the VM's peripherals, for as long as QEMU runs.
    let _adapters = crate::peripheral::adapter::start(dir)?;
    let log_path = dir.file("qemu.log");
    let log = File::create(&log_path).at(&log_path)?;
    let log2 = log.try_clone().at(&log_path)?;
    let spawned = Command::new(&l.program)
        .args(&l.args)
        .current_dir(dir.path())
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2)
        .spawn();
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => {
            let exit = Exit {
                run_id: l.run_id,
                at_ns: now_ns(),
                code: None,
                signal: None,
                shutdown: None,
                requested: None,
                reason: format!("cannot run {}: {e}", l.program.display()),
            };
            dir.write_exit(&exit)?;
            on_exit(&exit);
            return Ok(());
        }
    };
    let pid = child.id() as i32;
    let start_ticks = procfs::stat(pid).map_or(0, |s| s.start_ticks);
    let mut run = Run {
        run_id: l.run_id,
        pid,
        start_ticks,
        monitor_pid: std::process::id() as i32,
        started_ns: now_ns(),
        accel: l.accel.clone(),
        ready: false,
    };
    dir.write_run(&run)?;
    tracing::info!(pid, "QEMU started");

    // Connect to the watch socket while QEMU lives, for at most READY_TIMEOUT.
    let t0 = Instant::now();
    let mut qmp = None;
    let mut gave_up = false;
    while qmp.is_none() {
        if child.try_wait().ok().flatten().is_some() {
            break;
        }
        if t0.elapsed() > READY_TIMEOUT {
            gave_up = true;
            let _ = child.kill();
            break;
        }
        match Qmp::connect(&dir.watch(), Duration::from_secs(5)) {
            Ok(q) => qmp = Some(q),
            Err(_) => std::thread::sleep(Duration::from_millis(25)),
        }
    }
    let shutdown = Arc::new(Mutex::new(None::<String>));
    let watcher = qmp.map(|mut q| {
        run.ready = true;
        if let Err(e) = dir.write_run(&run) {
            tracing::warn!("{e}");
        }
        let _ = q.set_timeout(None);
        let seen = shutdown.clone();
        std::thread::spawn(move || watch_events(q, &seen))
    });
    let status = child.wait().at(&l.program)?;
    if let Some(w) = watcher {
        let _ = w.join();
    }
    use std::os::unix::process::ExitStatusExt;
    let shutdown = shutdown.lock().ok().and_then(|s| s.clone());
    let requested = if gave_up {
        Some("ready-timeout".to_string())
    } else {
        dir.intent(l.run_id)
    };
    let mut exit = Exit {
        run_id: l.run_id,
        at_ns: now_ns(),
        code: status.code(),
        signal: status.signal(),
        shutdown,
        requested,
        reason: String::new(),
    };
    exit.reason = describe(&exit, &tail(&log_path, 2));
    tracing::info!(reason = %exit.reason, "QEMU ended");
    dir.write_exit(&exit)?;
    on_exit(&exit);
    Ok(())
}

/// Attach mode: watches a QEMU that is not this process's child until it
/// goes away. Returns at once if another monitor watches it or it is gone.
pub fn attach(dir: &RunDir, on_exit: &mut dyn FnMut(&Exit)) -> Result<()> {
    let Some(_lock) = lock(dir)? else {
        return Ok(());
    };
    let Some(run) = dir.run() else {
        return Ok(());
    };
    if !procfs::alive(run.pid, run.start_ticks) {
        return Ok(());
    }
    tracing::info!(pid = run.pid, "re-attached to QEMU");
    let _adapters = crate::peripheral::adapter::start(dir)?;
    let shutdown = Arc::new(Mutex::new(None::<String>));
    if let Ok(mut q) = Qmp::connect(&dir.watch(), Duration::from_secs(5)) {
        let _ = q.set_timeout(None);
        let seen = shutdown.clone();
        std::thread::spawn(move || watch_events(q, &seen));
    }
    while procfs::alive(run.pid, run.start_ticks) {
        std::thread::sleep(Duration::from_millis(100));
    }
    // Let the event thread record a SHUTDOWN that came just before the end.
    std::thread::sleep(Duration::from_millis(100));
    let mut exit = Exit {
        run_id: run.run_id,
        at_ns: now_ns(),
        code: None,
        signal: None,
        shutdown: shutdown.lock().ok().and_then(|s| s.clone()),
        requested: dir.intent(run.run_id),
        reason: String::new(),
    };
    exit.reason = describe(&exit, "");
    dir.write_exit(&exit)?;
    on_exit(&exit);
    Ok(())
}

/// Keeps the reason of the last `SHUTDOWN` event until the connection ends.
fn watch_events(mut q: Qmp, seen: &Mutex<Option<String>>) {
    while let Ok(m) = q.read() {
        let event = m.get("event").and_then(|e| e.as_str()).unwrap_or_default();
        tracing::debug!(event, "QMP event");
        let reason = match event {
            "SHUTDOWN" => m["data"]["reason"].as_str().map(str::to_string),
            "GUEST_PANICKED" => Some("guest-panic".into()),
            _ => None,
        };
        if let (Some(r), Ok(mut s)) = (reason, seen.lock()) {
            *s = Some(r);
        }
    }
}

/// One line on how a run ended.
pub(crate) fn describe(e: &Exit, stderr_tail: &str) -> String {
    let signal_name = |s: i32| {
        nix::sys::signal::Signal::try_from(s).map_or_else(
            |_| format!("signal {s}"),
            |n| format!("signal {s} ({})", n.as_str()),
        )
    };
    let cause = match (e.requested.as_deref(), e.shutdown.as_deref()) {
        (Some("kill"), _) => "killed by `vm kill`".to_string(),
        (Some("stop-timeout"), _) => {
            "killed by `vm stop`: the guest did not power off in time".to_string()
        }
        (Some("ready-timeout"), _) => "killed: QMP did not answer in time".to_string(),
        (Some("stop"), Some("guest-shutdown")) => {
            "the guest powered off (ACPI power-down by `vm stop`)".to_string()
        }
        (_, Some("guest-shutdown")) => "the guest powered off".to_string(),
        (_, Some("guest-reset")) => "the guest rebooted (QEMU runs with -no-reboot)".into(),
        (_, Some("guest-panic")) => "the guest panicked".to_string(),
        (_, Some("host-qmp-quit")) => "QEMU was told to quit over QMP".to_string(),
        (_, Some("host-signal")) => "QEMU was stopped by a signal".to_string(),
        (_, Some(other)) => format!("QEMU shut down ({other})"),
        (_, None) => match (e.signal, e.code) {
            (Some(s), _) => format!("QEMU died of {}", signal_name(s)),
            (None, Some(0)) => "QEMU exited".to_string(),
            (None, Some(c)) => format!("QEMU failed with exit status {c}"),
            (None, None) => "QEMU went away (exit status unknown: watched after a restart)".into(),
        },
    };
    let mut line = cause;
    match (e.signal, e.code) {
        (Some(s), _) if !line.contains("signal") => line.push_str(&format!("; {}", signal_name(s))),
        (None, Some(c)) if c != 0 && !line.contains("status") => {
            line.push_str(&format!("; exit status {c}"))
        }
        _ => {}
    }
    if e.code.is_some_and(|c| c != 0) && !stderr_tail.is_empty() {
        line.push_str(&format!(": {stderr_tail}"));
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exit(
        code: Option<i32>,
        signal: Option<i32>,
        shutdown: Option<&str>,
        req: Option<&str>,
    ) -> Exit {
        Exit {
            run_id: 1,
            at_ns: 0,
            code,
            signal,
            shutdown: shutdown.map(Into::into),
            requested: req.map(Into::into),
            reason: String::new(),
        }
    }

    #[test]
    fn exits_are_described() {
        let d = describe(&exit(None, Some(9), None, None), "");
        assert_eq!(d, "QEMU died of signal 9 (SIGKILL)");
        let d = describe(&exit(None, Some(9), None, Some("kill")), "");
        assert_eq!(d, "killed by `vm kill`; signal 9 (SIGKILL)");
        let d = describe(
            &exit(Some(0), None, Some("guest-shutdown"), Some("stop")),
            "",
        );
        assert!(d.starts_with("the guest powered off"), "{d}");
        let d = describe(
            &exit(Some(1), None, None, None),
            "qemu: could not open disk",
        );
        assert_eq!(
            d,
            "QEMU failed with exit status 1: qemu: could not open disk"
        );
    }
}
