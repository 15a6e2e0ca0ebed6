//! How a run is measured: wall time, bytes on `lo`, bytes read from
//! storage (per process from /proc, in all from /proc/diskstats), with the
//! page cache dropped first.

use std::fs;
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context};

use super::Run;

fn lo_tx() -> anyhow::Result<u64> {
    Ok(fs::read_to_string("/sys/class/net/lo/statistics/tx_bytes")?
        .trim()
        .parse()?)
}

/// Sectors read from every whole disk, in bytes.
fn disk_reads() -> u64 {
    let Ok(text) = fs::read_to_string("/proc/diskstats") else {
        return 0;
    };
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let name = f.get(2)?;
            // Whole devices only (partitions would count twice).
            let whole = !name.chars().last()?.is_ascii_digit()
                || name.starts_with("nvme") && !name.contains('p');
            whole.then(|| f.get(5)?.parse::<u64>().ok()).flatten()
        })
        .sum::<u64>()
        * 512
}

fn proc_read_bytes(pid: u32) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/io"))
        .ok()
        .and_then(|t| {
            t.lines().find_map(|l| {
                l.strip_prefix("read_bytes: ")
                    .and_then(|v| v.trim().parse().ok())
            })
        })
        .unwrap_or(0)
}

fn drop_caches() {
    // Best effort: without it the runs read from the page cache alike.
    let _ = Command::new("sync").status();
    let _ = fs::write("/proc/sys/vm/drop_caches", "3\n");
}

/// Runs `cmd` to completion; returns wall time and the bytes it read from
/// storage (read from /proc before the exited child is reaped).
fn measured(cmd: &mut Command, what: &str) -> anyhow::Result<(f64, u64)> {
    use nix::sys::wait::{waitid, Id, WaitPidFlag};
    let started = Instant::now();
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {what}"))?;
    let pid = child.id();
    waitid(
        Id::Pid(nix::unistd::Pid::from_raw(pid as i32)),
        WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT,
    )?;
    let secs = started.elapsed().as_secs_f64();
    let read = proc_read_bytes(pid);
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok((secs, read))
}

/// One measured step of a scenario: drop caches, run `steps`, count.
pub(super) fn step(
    server_pid: Option<u32>,
    steps: &mut [(&mut Command, &str)],
) -> anyhow::Result<Run> {
    drop_caches();
    let (tx0, d0) = (lo_tx()?, disk_reads());
    let s0 = server_pid.map_or(0, proc_read_bytes);
    let mut run = Run::default();
    for (cmd, what) in steps.iter_mut() {
        let (secs, read) = measured(cmd, what)?;
        run.secs += secs;
        run.client_read_bytes += read;
    }
    run.wire_bytes = lo_tx()? - tx0;
    let total = disk_reads().saturating_sub(d0);
    run.server_read_bytes = match server_pid {
        Some(p) => proc_read_bytes(p).saturating_sub(s0),
        None => total.saturating_sub(run.client_read_bytes),
    };
    Ok(run)
}
