//! Listing and looking at VMs: ls, show, stats, console, screenshot.

use std::io::IsTerminal;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use lamina_sync::Access;
use lamina_vm::procfs;
use lamina_vm::{Net, RunDir, State, Template, Vm};
use serde::Serialize;

use super::{all, current, refresh, run_dir, Current, TEMPLATE_KIND, VM_KIND};
use crate::cli::Cli;
use crate::cmd::open;
use crate::output::{bytes, time, Out, UsageError};

/// One row of `vm ls`.
#[derive(Serialize)]
struct Row {
    name: String,
    state: State,
    pid: Option<i32>,
    uuid: String,
    mac: String,
    profile: Option<String>,
    template: String,
    cpu_percent: Option<f64>,
    rss_bytes: Option<u64>,
    /// Its network peripherals and their links' states.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    peripherals: Vec<super::peripheral::Row>,
}

fn live_pid(vm: &Vm) -> Option<i32> {
    vm.run
        .as_ref()
        .filter(|_| vm.state != State::PoweredOff)
        .map(|r| r.pid)
}

pub(super) fn ls(cli: &Cli, out: &Out) -> anyhow::Result<ExitCode> {
    let store = open(cli, out, Access::Read)?;
    let root = store.root().to_path_buf();
    let mut vms: Vec<Vm> = all(&store, VM_KIND)?;
    let templates: Vec<Template> = all(&store, TEMPLATE_KIND)?;
    drop(store);
    refresh(cli, &root, &mut vms);
    let pids: Vec<i32> = vms.iter().filter_map(live_pid).collect();
    let cpu = procfs::cpu_percent(&pids, Duration::from_millis(200));
    let mut cpu_of = pids
        .iter()
        .copied()
        .zip(cpu)
        .collect::<std::collections::HashMap<_, _>>();
    let rows: Vec<Row> = vms
        .iter()
        .map(|v| {
            let pid = live_pid(v);
            let template = templates.iter().find(|t| t.name == v.template);
            let arch = template.map_or(lamina_vm::Arch::X86_64, |t| t.arch);
            Row {
                name: v.name.clone(),
                state: v.state,
                pid,
                uuid: v.uuid.clone(),
                mac: v.mac.to_string(),
                profile: template.map(|t| super::json_name(&t.profile)),
                template: v.template.clone(),
                cpu_percent: pid.and_then(|p| cpu_of.remove(&p).flatten()),
                rss_bytes: pid.and_then(procfs::stat).map(|s| s.rss_bytes),
                peripherals: super::peripheral::rows(&root, v, arch),
            }
        })
        .collect();
    out.result(&rows, || {
        let mut s = format!(
            "{:<16} {:<11} {:>7} {:<36} {:<17} {:<7} {:>6} {:>10}\n",
            "NAME", "STATE", "PID", "UUID", "MAC", "PROFILE", "CPU%", "RSS"
        );
        for r in &rows {
            s += &format!(
                "{:<16} {:<11} {:>7} {:<36} {:<17} {:<7} {:>6} {:>10}\n",
                r.name,
                r.state.to_string(),
                r.pid.map_or("-".into(), |p| p.to_string()),
                r.uuid,
                r.mac,
                r.profile.as_deref().unwrap_or("?"),
                r.cpu_percent.map_or("-".into(), |c| format!("{c:.1}")),
                r.rss_bytes.map_or("-".into(), bytes),
            );
        }
        s
    })?;
    Ok(ExitCode::SUCCESS)
}

pub(super) fn show(cli: &Cli, out: &Out, name: &str) -> anyhow::Result<ExitCode> {
    let Current { vm, root, template } = current(cli, out, name)?;
    let dir = RunDir::at(&run_dir(&root, &vm));
    let admin = {
        let store = open(cli, out, Access::Read)?;
        super::policy::admin_net(&store, &vm)?
    };
    let net = template.as_ref().map(|t| match &admin {
        Some(a) => t.net.within(&a.net),
        None => t.net.clone(),
    });
    let doc = serde_json::json!({
        "vm": vm,
        "net": net.as_ref().map(ToString::to_string),
        "net_policy": admin,
        "paths": {
            "dir": dir.path(), "qmp": dir.qmp(), "vnc": dir.vnc(),
            "console": dir.console_sock(), "console_log": dir.console_log(),
        },
    });
    out.result(&doc, || {
        let mut s = format!(
            "vm        {}\nuuid      {}\nmac       {}\ntemplate  {}\ndisk      {}\ncreated   {}\nstate     {}\n",
            vm.name,
            vm.uuid,
            vm.mac,
            vm.template,
            vm.disk,
            time(vm.created_ns),
            vm.state
        );
        if let Some(n) = &net {
            s += &format!("net       {n}");
            if let Some(a) = &admin {
                s += &format!(" (layer {}'s policy {} from {})", a.layer, a.net, a.source);
            }
            s.push('\n');
        }
        if let Some(r) = vm.run.as_ref().filter(|_| vm.state != State::PoweredOff) {
            s += &format!("pid       {}\naccel     {}\nstarted   {}\n", r.pid, r.accel, time(r.started_ns));
        }
        if let Some(e) = &vm.last_exit {
            s += &format!("last exit {} at {}\n", e.reason, time(e.at_ns));
        }
        s += &format!(
            "qmp       {}\nvnc       {}\nconsole   {} (log {})\n",
            dir.qmp().display(),
            dir.vnc().display(),
            dir.console_sock().display(),
            dir.console_log().display()
        );
        s
    })?;
    Ok(ExitCode::SUCCESS)
}

fn require_running(vm: &Vm) -> anyhow::Result<()> {
    if vm.state == State::Running {
        Ok(())
    } else {
        Err(UsageError(format!("VM {} is {}", vm.name, vm.state)).into())
    }
}

pub(super) fn stats(cli: &Cli, out: &Out, name: &str, interval: u64) -> anyhow::Result<ExitCode> {
    let Current { vm, root, template } = current(cli, out, name)?;
    let dir = RunDir::at(&run_dir(&root, &vm));
    let pid = live_pid(&vm);
    let cpu = pid.and_then(|p| {
        procfs::cpu_percent(&[p], Duration::from_millis(interval.clamp(10, 60_000)))[0]
    });
    let st = pid.and_then(procfs::stat);
    let disks = if vm.state == State::Running {
        lamina_vm::control::block_stats(&dir).unwrap_or_default()
    } else {
        Vec::new()
    };
    // Byte counts exist for `allow:` relays (finished connections); QEMU's
    // user networking keeps none.
    let net = match template.as_ref().map(|t| &t.net) {
        Some(Net::Allow(_)) => {
            let (to_guest, from_guest) = dir.relayed_bytes();
            Some(serde_json::json!({ "rx_bytes": to_guest, "tx_bytes": from_guest }))
        }
        _ => None,
    };
    let host = procfs::host();
    let arch = template
        .as_ref()
        .map_or(lamina_vm::Arch::X86_64, |t| t.arch);
    let periph = super::peripheral::rows(&root, &vm, arch);
    let doc = serde_json::json!({
        "name": vm.name, "state": vm.state, "pid": pid,
        "cpu_percent": cpu, "rss_bytes": st.map(|s| s.rss_bytes),
        "cpu_seconds": st.map(|s| s.cpu_ticks as f64 / procfs::ticks_per_sec() as f64),
        "disks": disks, "net": net, "peripherals": periph, "host": host,
    });
    out.result(&doc, || {
        let mut s = format!("vm       {} ({})\n", vm.name, vm.state);
        if let (Some(c), Some(st)) = (cpu, st) {
            s += &format!("cpu      {c:.1} %\nrss      {}\n", bytes(st.rss_bytes));
        }
        for d in &disks {
            s += &format!(
                "disk     {}: read {} in {} requests, written {} in {} requests, {} flushes\n",
                d.device,
                bytes(d.read_bytes),
                d.read_ops,
                bytes(d.write_bytes),
                d.write_ops,
                d.flush_ops
            );
        }
        match &net {
            Some(n) => {
                s += &format!(
                    "net      to guest {}, from guest {} (allow-list relays)\n",
                    bytes(n["rx_bytes"].as_u64().unwrap_or(0)),
                    bytes(n["tx_bytes"].as_u64().unwrap_or(0))
                )
            }
            None => s += "net      no counters (QEMU user networking or none)\n",
        }
        for r in &periph {
            s += &r.line();
        }
        s += &format!(
            "host     load {:.2} {:.2} {:.2}, {} CPUs, memory available {} of {} (free {})\n",
            host.load[0],
            host.load[1],
            host.load[2],
            host.cpus,
            bytes(host.mem_available),
            bytes(host.mem_total),
            bytes(host.mem_free)
        );
        s
    })?;
    Ok(ExitCode::SUCCESS)
}

pub(super) fn console(cli: &Cli, out: &Out, name: &str) -> anyhow::Result<ExitCode> {
    let Current { vm, root, .. } = current(cli, out, name)?;
    require_running(&vm)?;
    let dir = RunDir::at(&run_dir(&root, &vm));
    let tty = std::io::stdin().is_terminal();
    let saved = if tty {
        use nix::sys::termios;
        let stdin = std::io::stdin();
        let old = termios::tcgetattr(&stdin)?;
        let mut raw = old.clone();
        termios::cfmakeraw(&mut raw);
        termios::tcsetattr(&stdin, termios::SetArg::TCSANOW, &raw)?;
        Some(old)
    } else {
        None
    };
    if tty {
        eprint!("Connected to the serial console of {name}; detach with Ctrl-]\r\n");
    }
    let r = lamina_vm::console::attach(&dir, std::io::stdin(), std::io::stdout());
    if let Some(old) = saved {
        let _ = nix::sys::termios::tcsetattr(
            std::io::stdin(),
            nix::sys::termios::SetArg::TCSANOW,
            &old,
        );
        eprintln!("\r\nDetached from {name}");
    }
    r?;
    Ok(ExitCode::SUCCESS)
}

/// Width and height from a PNG's IHDR.
fn png_size(file: &Path) -> Option<(u32, u32)> {
    let d = std::fs::read(file).ok()?;
    let be = |at: usize| Some(u32::from_be_bytes(d.get(at..at + 4)?.try_into().ok()?));
    Some((be(16)?, be(20)?))
}

pub(super) fn screenshot(
    cli: &Cli,
    out: &Out,
    name: &str,
    file: &Path,
) -> anyhow::Result<ExitCode> {
    let Current { vm, root, .. } = current(cli, out, name)?;
    require_running(&vm)?;
    let file = std::path::absolute(file)?;
    lamina_vm::control::screenshot(&RunDir::at(&run_dir(&root, &vm)), &file)?;
    let (w, h) = png_size(&file).unwrap_or_default();
    out.result(
        &serde_json::json!({ "name": name, "file": file, "width": w, "height": h }),
        || format!("saved {}: {w}x{h} PNG", file.display()),
    )?;
    Ok(ExitCode::SUCCESS)
}
