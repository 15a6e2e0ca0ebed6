//! `lamina bench vm`: the fixture guest started with `lamina vm start`
//! beside the same QEMU command line started by hand.
//!
//! For 1 VM and then for N at once, it measures the time from the start
//! (`lamina vm start` spawned; or QEMU spawned) to the guest's first serial
//! marker (`LAMINA-GUEST-BOOTED`) and to `LAMINA-GUEST-IDLE`, and the RSS
//! of each idle QEMU (from /proc). The hand-started QEMU runs exactly the
//! arguments Lamina's monitor used (`launch.json`), so the difference is
//! the runner's own cost: validation, the KVM probe result lookup, the
//! monitor process and the wait for QMP.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::Serialize;

use super::run_ok;
use crate::output::Out;

/// One round: `vms` VMs started at once by `how`.
#[derive(Debug, Serialize)]
pub struct Round {
    how: &'static str,
    vms: usize,
    /// Seconds to LAMINA-GUEST-BOOTED, per VM.
    booted_s: Vec<f64>,
    /// Seconds to LAMINA-GUEST-IDLE, per VM.
    idle_s: Vec<f64>,
    /// RSS of each idle QEMU, bytes.
    rss: Vec<u64>,
}

/// The whole report.
#[derive(Debug, Serialize)]
pub struct Report {
    qemu: String,
    /// Guest architecture and profile, e.g. `aarch64 phone`.
    guest: String,
    accel: String,
    /// Seconds the host's KVM probe took (once per boot, before the rounds).
    probe_s: f64,
    rounds: Vec<Round>,
}

fn mean(v: &[f64]) -> f64 {
    if v.is_empty() {
        0.0
    } else {
        v.iter().sum::<f64>() / v.len() as f64
    }
}

fn max(v: &[f64]) -> f64 {
    v.iter().copied().fold(0.0, f64::max)
}

/// Seconds since `t0` at which `log` first holds `marker`.
pub(super) fn wait_marker(
    log: &Path,
    marker: &str,
    t0: Instant,
    limit: Duration,
) -> anyhow::Result<f64> {
    loop {
        if std::fs::read_to_string(log)
            .unwrap_or_default()
            .contains(marker)
        {
            return Ok(t0.elapsed().as_secs_f64());
        }
        if t0.elapsed() > limit {
            bail!(
                "no {marker} in {} within {} s",
                log.display(),
                limit.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn rss_of(pid: i32) -> u64 {
    lamina_vm::procfs::stat(pid).map_or(0, |s| s.rss_bytes)
}

struct Bench {
    lamina: PathBuf,
    store: PathBuf,
}

impl Bench {
    fn lamina(&self) -> Command {
        let mut c = Command::new(&self.lamina);
        c.arg("--store").arg(&self.store).arg("--quiet");
        c
    }

    fn show(&self, vm: &str) -> anyhow::Result<serde_json::Value> {
        let o = super::stdout_of(
            self.lamina().args(["--json", "vm", "show", vm]),
            "lamina vm show",
        )?;
        Ok(serde_json::from_str(&o)?)
    }

    /// Starts `names` at once with `lamina vm start`.
    fn round_lamina(&self, names: &[String]) -> anyhow::Result<(Round, Vec<serde_json::Value>)> {
        let mut logs = Vec::new();
        for n in names {
            let dir = PathBuf::from(self.show(n)?["paths"]["dir"].as_str().unwrap_or_default());
            let _ = std::fs::remove_file(dir.join("console.log"));
            logs.push(dir.join("console.log"));
        }
        let t0 = Instant::now();
        let starts: Vec<Child> = names
            .iter()
            .map(|n| {
                self.lamina()
                    .args(["vm", "start", n])
                    .stdout(Stdio::null())
                    .spawn()
                    .context("lamina vm start")
            })
            .collect::<anyhow::Result<_>>()?;
        let limit = Duration::from_secs(300);
        let booted = logs
            .iter()
            .map(|l| wait_marker(l, "LAMINA-GUEST-BOOTED", t0, limit))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let idle = logs
            .iter()
            .map(|l| wait_marker(l, "LAMINA-GUEST-IDLE", t0, limit))
            .collect::<anyhow::Result<Vec<_>>>()?;
        for mut s in starts {
            if !s.wait()?.success() {
                bail!("lamina vm start failed");
            }
        }
        std::thread::sleep(Duration::from_secs(2));
        let mut rss = Vec::new();
        let mut shows = Vec::new();
        for n in names {
            let s = self.show(n)?;
            rss.push(rss_of(s["vm"]["run"]["pid"].as_i64().unwrap_or(0) as i32));
            shows.push(s);
        }
        for n in names {
            run_ok(self.lamina().args(["vm", "kill", n]), "lamina vm kill")?;
        }
        let round = Round {
            how: "lamina vm start",
            vms: names.len(),
            booted_s: booted,
            idle_s: idle,
            rss,
        };
        Ok((round, shows))
    }
}

/// Starts the QEMU command lines of `launches` (launch.json) by hand.
fn round_by_hand(dirs: &[PathBuf]) -> anyhow::Result<Round> {
    let mut cmds = Vec::new();
    for d in dirs {
        let l: lamina_vm::monitor::Launch =
            serde_json::from_slice(&std::fs::read(d.join("launch.json"))?)?;
        let _ = std::fs::remove_file(d.join("console.log"));
        let mut c = Command::new(&l.program);
        c.args(&l.args)
            .current_dir(d)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        cmds.push((c, d.join("console.log")));
    }
    let t0 = Instant::now();
    let mut children = Vec::new();
    for (c, _) in &mut cmds {
        children.push(c.spawn().context("starting QEMU")?);
    }
    let limit = Duration::from_secs(300);
    let result = (|| -> anyhow::Result<Round> {
        let booted = cmds
            .iter()
            .map(|(_, l)| wait_marker(l, "LAMINA-GUEST-BOOTED", t0, limit))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let idle = cmds
            .iter()
            .map(|(_, l)| wait_marker(l, "LAMINA-GUEST-IDLE", t0, limit))
            .collect::<anyhow::Result<Vec<_>>>()?;
        std::thread::sleep(Duration::from_secs(2));
        let rss = children.iter().map(|c| rss_of(c.id() as i32)).collect();
        Ok(Round {
            how: "QEMU by hand",
            vms: dirs.len(),
            booted_s: booted,
            idle_s: idle,
            rss,
        })
    })();
    for mut c in children {
        let _ = c.kill();
        let _ = c.wait();
    }
    result
}

/// Runs the benchmark in `work` with the fixture guest in `guest`.
pub fn run(
    lamina: &Path,
    arch: lamina_vm::Arch,
    guest: &Path,
    work: &Path,
    n: usize,
    out: &Out,
) -> anyhow::Result<Report> {
    for f in ["vmlinuz", "initrd.img", "disk.raw"] {
        if !guest.join(f).is_file() {
            bail!(
                "{}: no {f} (build the guest with fixtures/guest/build.sh)",
                guest.display()
            );
        }
    }
    let b = Bench {
        lamina: lamina.to_path_buf(),
        store: work.join("store"),
    };
    run_ok(b.lamina().arg("init"), "lamina init")?;
    let (profile, arch_name, console, qemu_bin) = match arch {
        lamina_vm::Arch::X86_64 => ("pc", "x86_64", "ttyS0", "qemu-system-x86_64"),
        lamina_vm::Arch::Aarch64 => ("phone", "aarch64", "ttyAMA0", "qemu-system-aarch64"),
    };
    run_ok(
        b.lamina()
            .args([
                "vm",
                "template",
                "create",
                "bench",
                "--profile",
                profile,
                "--arch",
                arch_name,
                "--memory",
                "256",
            ])
            .arg("--kernel")
            .arg(guest.join("vmlinuz"))
            .arg("--initrd")
            .arg(guest.join("initrd.img"))
            .args(["--append", &format!("console={console} quiet panic=-1")]),
        "lamina vm template create",
    )?;
    let names: Vec<String> = (0..n).map(|i| format!("bench{i}")).collect();
    for name in &names {
        let disk = work.join(format!("{name}.qcow2"));
        run_ok(
            Command::new("qemu-img")
                .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
                .arg(guest.join("disk.raw"))
                .arg(&disk),
            "qemu-img create",
        )?;
        run_ok(
            b.lamina()
                .args(["vm", "create", name, "--template", "bench", "--disk"])
                .arg(&disk),
            "lamina vm create",
        )?;
    }
    // The KVM probe runs once per host boot; time it apart from the rounds.
    let probe: serde_json::Value = serde_json::from_str(&super::stdout_of(
        b.lamina().args(["--json", "vm", "accel", "--reprobe"]),
        "lamina vm accel",
    )?)?;
    let probe_s = probe["seconds"].as_f64().unwrap_or(0.0);
    let mut rounds = Vec::new();
    out.note("1 VM with lamina vm start");
    let (r, shows) = b.round_lamina(&names[..1])?;
    rounds.push(r);
    let accel = shows[0]["vm"]["run"]["accel"]
        .as_str()
        .unwrap_or("?")
        .to_string();
    let dirs: Vec<PathBuf> = names
        .iter()
        .map(|n| {
            Ok(PathBuf::from(
                b.show(n)?["paths"]["dir"].as_str().unwrap_or_default(),
            ))
        })
        .collect::<anyhow::Result<_>>()?;
    out.note("1 VM by hand");
    rounds.push(round_by_hand(&dirs[..1])?);
    if n > 1 {
        out.note(&format!("{n} VMs with lamina vm start"));
        rounds.push(b.round_lamina(&names)?.0);
        out.note(&format!("{n} VMs by hand"));
        rounds.push(round_by_hand(&dirs)?);
    }
    let qemu = super::stdout_of(Command::new(qemu_bin).arg("--version"), "qemu --version")?
        .lines()
        .next()
        .unwrap_or_default()
        .to_string();
    Ok(Report {
        qemu,
        guest: format!("{arch_name} {profile}"),
        accel,
        probe_s,
        rounds,
    })
}

/// The table.
pub fn render(r: &Report) -> String {
    let mut s = format!(
        "{} ({}; the KVM probe, once per host boot, took {:.2} s before these rounds), fixture guest {}, 256 MiB\n",
        r.qemu, r.accel, r.probe_s, r.guest
    );
    s += &format!(
        "{:<18} {:>4} {:>16} {:>16} {:>14} {:>14}\n",
        "started by", "VMs", "to BOOTED mean", "to IDLE mean", "IDLE max", "RSS/VM mean"
    );
    for x in &r.rounds {
        let rss = x.rss.iter().sum::<u64>() as f64 / x.rss.len().max(1) as f64 / 1048576.0;
        s += &format!(
            "{:<18} {:>4} {:>15.2}s {:>15.2}s {:>13.2}s {:>10.1} MiB\n",
            x.how,
            x.vms,
            mean(&x.booted_s),
            mean(&x.idle_s),
            max(&x.idle_s),
            rss
        );
    }
    for pair in r.rounds.chunks(2) {
        if let [l, h] = pair {
            s += &format!(
                "{} VM(s): lamina/hand time to BOOTED {:.2}x, to IDLE {:.2}x, RSS {:.2}x (below 1: Lamina faster/smaller)\n",
                l.vms,
                mean(&l.booted_s) / mean(&h.booted_s).max(1e-9),
                mean(&l.idle_s) / mean(&h.idle_s).max(1e-9),
                l.rss.iter().sum::<u64>() as f64 / h.rss.iter().sum::<u64>().max(1) as f64
            );
        }
    }
    s
}
