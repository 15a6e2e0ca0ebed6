//! Figures from /proc: per-process CPU time and RSS, host load and memory.
//! No `ps` or `top`.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::spec::Mac;

/// What /proc/PID/stat says about a process.
#[derive(Debug, Clone, Copy)]
pub struct ProcStat {
    /// State letter (`R`, `S`, `Z`, ...).
    pub state: char,
    /// User + system CPU time, clock ticks.
    pub cpu_ticks: u64,
    /// Start time, clock ticks since boot.
    pub start_ticks: u64,
    /// Resident set size, bytes.
    pub rss_bytes: u64,
}

/// Clock ticks per second (`sysconf(_SC_CLK_TCK)`).
pub fn ticks_per_sec() -> u64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .map_or(100, |v| v as u64)
}

fn page_size() -> u64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .map_or(4096, |v| v as u64)
}

/// Reads /proc/PID/stat; `None` if the process does not exist.
pub fn stat(pid: i32) -> Option<ProcStat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold spaces: split after
    // the last ')'.
    let rest = &text[text.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // Fields counted from 3 (state) in proc(5): index = field - 3.
    let num = |field: usize| f.get(field - 3).and_then(|v| v.parse::<u64>().ok());
    Some(ProcStat {
        state: f.first()?.chars().next()?,
        cpu_ticks: num(14)? + num(15)?,
        start_ticks: num(22)?,
        rss_bytes: num(24)? * page_size(),
    })
}

/// Whether `pid` is the live (not zombie) process that started at
/// `start_ticks`.
pub fn alive(pid: i32, start_ticks: u64) -> bool {
    stat(pid).is_some_and(|s| s.start_ticks == start_ticks && s.state != 'Z' && s.state != 'X')
}

/// CPU use of several processes over one shared interval, in percent of
/// one CPU (so 2 busy threads show 200). Processes that vanish give `None`.
pub fn cpu_percent(pids: &[i32], window: Duration) -> Vec<Option<f64>> {
    let before: Vec<Option<u64>> = pids.iter().map(|p| stat(*p).map(|s| s.cpu_ticks)).collect();
    let t0 = Instant::now();
    if pids.is_empty() {
        return Vec::new();
    }
    std::thread::sleep(window);
    let secs = t0.elapsed().as_secs_f64();
    let hz = ticks_per_sec() as f64;
    pids.iter()
        .zip(before)
        .map(|(p, b)| {
            let a = stat(*p)?.cpu_ticks;
            Some((a.saturating_sub(b?)) as f64 / hz / secs * 100.0)
        })
        .collect()
}

/// Host figures.
#[derive(Debug, Clone, Serialize)]
pub struct Host {
    /// Load averages over 1, 5 and 15 minutes.
    pub load: [f64; 3],
    /// CPUs online.
    pub cpus: usize,
    /// Total memory, bytes.
    pub mem_total: u64,
    /// Memory available for new work (MemAvailable), bytes.
    pub mem_available: u64,
    /// Free memory (MemFree), bytes.
    pub mem_free: u64,
}

/// Reads /proc/loadavg and /proc/meminfo.
pub fn host() -> Host {
    let load_text = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let mut load = [0.0; 3];
    for (i, v) in load_text.split_whitespace().take(3).enumerate() {
        load[i] = v.parse().unwrap_or(0.0);
    }
    let mem = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let kib = |key: &str| {
        mem.lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .map_or(0, |k| k * 1024)
    };
    Host {
        load,
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        mem_total: kib("MemTotal"),
        mem_available: kib("MemAvailable"),
        mem_free: kib("MemFree"),
    }
}

/// MAC addresses given (`mac=`) to the QEMU processes running on this host,
/// whoever started them.
pub fn host_macs() -> HashSet<Mac> {
    let mut macs = HashSet::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return macs;
    };
    for e in dir.flatten() {
        let name = e.file_name();
        if !name.to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let text = String::from_utf8_lossy(&cmd);
        if !text.contains("qemu-system") {
            continue;
        }
        for part in text.split(['\0', ',']) {
            if let Some(m) = part.strip_prefix("mac=").and_then(|m| m.parse().ok()) {
                macs.insert(m);
            }
        }
    }
    macs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        let me = std::process::id() as i32;
        let s = stat(me).unwrap();
        assert!(s.rss_bytes > 0);
        assert!(alive(me, s.start_ticks));
        assert!(!alive(me, s.start_ticks + 1));
        let h = host();
        assert!(h.mem_total > 0 && h.mem_available <= h.mem_total);
        // Spin for the window on another thread: about 100 % of a CPU.
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s2 = stop.clone();
        let t = std::thread::spawn(move || {
            while !s2.load(std::sync::atomic::Ordering::Relaxed) {
                std::hint::spin_loop();
            }
        });
        let pct = cpu_percent(&[me], Duration::from_millis(300))[0].unwrap();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        t.join().unwrap();
        assert!(pct > 30.0, "{pct}");
    }
}
