//! Starting and stopping VMs, and the two internal commands QEMU's side
//! needs: the monitor and the `allow:` relay.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Duration;

use lamina_vm::monitor::Launch;
use lamina_vm::{Accel, Arch, Exit, RunDir, State, Template, Vm};
use rand::Rng;

use super::{current, get, open_write, put, record_state, run_dir, vm_err, Current, VM_KIND};
use crate::cli::Cli;
use crate::output::{NotFound, Out, UsageError};

/// This binary, to run the monitor and relays.
fn exe() -> anyhow::Result<PathBuf> {
    Ok(std::env::current_exe()?)
}

/// Starts a monitor for `vm` (launch, or `attach` to a running QEMU).
pub(super) fn spawn_monitor(
    root: &Path,
    vm: &Vm,
    dir: &RunDir,
    attach: bool,
) -> anyhow::Result<Command> {
    let mut c = Command::new(exe()?);
    c.arg("--store")
        .arg(root)
        .args(["vm", "monitor", &vm.name, "--dir"]);
    c.arg(dir.path());
    if attach {
        c.arg("--attach");
        use std::os::unix::process::CommandExt;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.file("monitor.log"))?;
        c.stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .process_group(0)
            .spawn()?;
    }
    Ok(c)
}

/// Which accelerator a template's VM runs with on this host.
fn accel(root: &Path, t: &Template, qemu: &Path) -> String {
    match t.accel {
        Accel::Kvm => "kvm".into(),
        Accel::Tcg => "tcg".into(),
        Accel::Auto if t.arch != Arch::X86_64 || std::env::consts::ARCH != "x86_64" => "tcg".into(),
        Accel::Auto => {
            let (p, _) = lamina_vm::accel::cached_or_probe(&probe_cache(root), qemu, false);
            if p.kvm {
                "kvm".into()
            } else {
                "tcg".into()
            }
        }
    }
}

fn probe_cache(root: &Path) -> PathBuf {
    lamina_vm::accel::cache_path(&root.join("vms/kvm-probe.json"))
}

/// `vm accel`: the host's KVM probe (cached per boot), or a new one.
pub(super) fn accel_probe(cli: &Cli, out: &Out, reprobe: bool) -> anyhow::Result<ExitCode> {
    let root = crate::cmd::store_path(cli)?;
    let qemu = lamina_vm::qemu::binary(Arch::X86_64).map_err(vm_err)?;
    let t0 = std::time::Instant::now();
    let (p, cached) = lamina_vm::accel::cached_or_probe(&probe_cache(&root), &qemu, reprobe);
    let accel = if p.kvm { "kvm" } else { "tcg" };
    let doc = serde_json::json!({
        "accel": accel, "kvm": p.kvm, "detail": p.detail, "qemu": p.qemu,
        "cached": cached, "seconds": t0.elapsed().as_secs_f64(),
    });
    out.result(&doc, || {
        let from = if cached { "cached probe" } else { "probed now" };
        format!("accel {accel} ({from}): {}", p.detail)
    })?;
    Ok(ExitCode::SUCCESS)
}

pub(super) fn start(cli: &Cli, out: &Out, name: &str) -> anyhow::Result<ExitCode> {
    let Current { vm, root, template } = current(cli, out, name)?;
    if vm.state != State::PoweredOff {
        return Err(UsageError(format!("VM {name} is {}: stop or kill it first", vm.state)).into());
    }
    let t = template.ok_or_else(|| NotFound(format!("no template named {:?}", vm.template)))?;
    // Files may have gone since the template was made.
    let mut t = t.validate().map_err(vm_err)?;
    // The admin's network policy over the disk's layer narrows the
    // template's, offline too.
    let admin = {
        let store = crate::cmd::open(cli, out, lamina_sync::Access::Read)?;
        super::policy::admin_net(&store, &vm)?
    };
    if let Some(a) = &admin {
        let narrowed = t.net.within(&a.net);
        if narrowed != t.net {
            out.note(&format!(
                "network: {narrowed} (the template's {} narrowed by layer {}'s policy {} from {})",
                t.net, a.layer, a.net, a.source
            ));
        }
        t.net = narrowed;
    }
    let qemu = lamina_vm::qemu::binary(t.arch).map_err(vm_err)?;
    vm.disk.check_reachable().map_err(vm_err)?;
    let dir = RunDir::create(&run_dir(&root, &vm)).map_err(vm_err)?;
    let accel = accel(&root, &t, &qemu);
    let relay = vec![
        exe()?.to_string_lossy().into_owned(),
        "vm".into(),
        "relay".into(),
    ];
    let args = lamina_vm::qemu::arguments(&lamina_vm::qemu::Plan {
        vm: &vm,
        template: &t,
        dir: &dir,
        accel: &accel,
        relay: &relay,
    })
    .map_err(vm_err)?;
    // The previous run's console stays beside the new one.
    let log = dir.console_log();
    if log.exists() {
        std::fs::rename(&log, dir.file("console.log.1"))?;
    }
    let _ = std::fs::remove_file(dir.net_counters());
    let _ = std::fs::remove_file(dir.file("links.json"));
    // The links the monitor's adapters keep up for this run.
    lamina_vm::peripheral::adapter::write_wanted(&dir, &vm.peripherals)?;
    let run_id: u64 = rand::rng().random();
    lamina_vm::monitor::write_launch(
        &dir,
        &Launch {
            run_id,
            program: qemu,
            args,
            accel,
        },
    )?;
    let monitor = spawn_monitor(&root, &vm, &dir, false)?;
    let started = lamina_vm::control::start(name, &dir, run_id, monitor);
    let store = open_write(cli, Some(Duration::from_secs(120)))?;
    // The record as it is now (the monitor may have written an exit).
    let mut cur: Vm = get(&store, VM_KIND, name)?;
    match started {
        Ok(r) => {
            cur.state = State::Running;
            cur.run = Some(r.clone());
            put(&store, VM_KIND, name, &cur)?;
            let doc = serde_json::json!({
                "name": name, "state": cur.state, "pid": r.pid, "accel": r.accel,
                "qmp": dir.qmp(), "vnc": dir.vnc(), "console": dir.console_sock(),
                "console_log": dir.console_log(),
            });
            out.result(&doc, || {
                format!(
                    "started VM {name}: pid {}, accel {}, console log {}",
                    r.pid,
                    r.accel,
                    dir.console_log().display()
                )
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            cur.state = State::PoweredOff;
            cur.last_exit = dir.exit(run_id).or(cur.last_exit);
            put(&store, VM_KIND, name, &cur)?;
            Err(e.into())
        }
    }
}

fn running(vm: &Vm) -> anyhow::Result<&lamina_vm::Run> {
    match (&vm.run, vm.state) {
        (Some(r), State::Running | State::Unknown) => Ok(r),
        _ => Err(UsageError(format!("VM {} is {}", vm.name, vm.state)).into()),
    }
}

fn finish(cli: &Cli, out: &Out, mut vm: Vm, exit: Exit) -> anyhow::Result<ExitCode> {
    vm.state = State::PoweredOff;
    vm.last_exit = Some(exit.clone());
    let store = open_write(cli, Some(Duration::from_secs(120)))?;
    record_state(&store, &vm)?;
    out.result(
        &serde_json::json!({ "name": vm.name, "state": vm.state, "exit": exit }),
        || format!("VM {} is powered off: {}", vm.name, exit.reason),
    )?;
    Ok(ExitCode::SUCCESS)
}

pub(super) fn stop(cli: &Cli, out: &Out, name: &str, timeout: u64) -> anyhow::Result<ExitCode> {
    let Current { vm, root, .. } = current(cli, out, name)?;
    let r = running(&vm)?.clone();
    let exit = lamina_vm::control::stop(
        &RunDir::at(&run_dir(&root, &vm)),
        &r,
        Duration::from_secs(timeout),
    )?;
    finish(cli, out, vm, exit)
}

pub(super) fn kill(cli: &Cli, out: &Out, name: &str) -> anyhow::Result<ExitCode> {
    let Current { vm, root, .. } = current(cli, out, name)?;
    let r = running(&vm)?.clone();
    let exit = lamina_vm::control::kill(&RunDir::at(&run_dir(&root, &vm)), &r)?;
    finish(cli, out, vm, exit)
}

/// `vm monitor`: watches QEMU, then records its exit in the catalog.
pub(super) fn monitor(cli: &Cli, name: &str, dir: &Path, attach: bool) -> anyhow::Result<ExitCode> {
    let dir = RunDir::at(dir);
    let mut on_exit = |exit: &Exit| {
        let r = (|| -> anyhow::Result<()> {
            let store = open_write(cli, Some(Duration::from_secs(600)))?;
            let mut vm: Vm = get(&store, VM_KIND, name)?;
            if vm.run.as_ref().is_some_and(|r| r.run_id == exit.run_id) {
                vm.state = State::PoweredOff;
                vm.last_exit = Some(exit.clone());
                put(&store, VM_KIND, name, &vm)?;
            }
            Ok(())
        })();
        if let Err(e) = r {
            tracing::warn!("VM {name}: cannot record the exit: {e:#}");
        }
    };
    if attach {
        lamina_vm::monitor::attach(&dir, &mut on_exit)?;
    } else {
        lamina_vm::monitor::launch(&dir, &mut on_exit)?;
    }
    Ok(ExitCode::SUCCESS)
}

/// `vm relay`: stdin/stdout is one guest connection (QEMU's slirp runs this
/// per connection). Nothing may be written to stderr: it is the same
/// socket. Byte counts are appended to `counters` as "TO_GUEST FROM_GUEST".
pub(super) fn relay(counters: &Path, host: &str, port: u16) -> ExitCode {
    let addr = (host, port)
        .to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next());
    let Some(stream) =
        addr.and_then(|a| TcpStream::connect_timeout(&a, Duration::from_secs(10)).ok())
    else {
        return ExitCode::FAILURE;
    };
    let Ok(mut from_dest) = stream.try_clone() else {
        return ExitCode::FAILURE;
    };
    // Guest to destination on a thread; the relay ends when the
    // destination closes (exiting closes the guest's side).
    let from_guest = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let count = from_guest.clone();
    let mut to_dest = stream;
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin().lock();
        copy_counted(&mut stdin, &mut to_dest, &count);
        let _ = to_dest.shutdown(Shutdown::Write);
    });
    let mut stdout = std::io::stdout().lock();
    let to_guest = copy_counted(
        &mut from_dest,
        &mut stdout,
        &std::sync::atomic::AtomicU64::new(0),
    );
    let _ = stdout.flush();
    let from_guest = from_guest.load(std::sync::atomic::Ordering::Relaxed);
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(counters)
    {
        let _ = f.write_all(format!("{to_guest} {from_guest}\n").as_bytes());
    }
    ExitCode::SUCCESS
}

/// Copies until EOF or an error; counts in `n` as it goes; returns the total.
fn copy_counted(r: &mut impl Read, w: &mut impl Write, n: &std::sync::atomic::AtomicU64) -> u64 {
    use std::sync::atomic::Ordering;
    let mut buf = [0u8; 16384];
    loop {
        match r.read(&mut buf) {
            Ok(0) | Err(_) => return n.load(Ordering::Relaxed),
            Ok(k) => {
                if w.write_all(&buf[..k]).and_then(|()| w.flush()).is_err() {
                    return n.load(Ordering::Relaxed);
                }
                n.fetch_add(k as u64, Ordering::Relaxed);
            }
        }
    }
}
