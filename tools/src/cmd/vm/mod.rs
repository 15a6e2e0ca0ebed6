//! `lamina vm ...`: templates and VMs, recorded in the store's catalog, run
//! by `lamina-vm`.
//!
//! Records: kind `vm-template` (a [`Template`] as JSON) and kind `vm` (a
//! [`Vm`]: definition and last known state). Runtime files of a VM live in
//! `STORE/vms/UUID/` (see `lamina_vm::RunDir`).

mod info;
mod peripheral;
mod policy;
mod run;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use lamina_sync::{Access, LockWait, Store};
use lamina_vm::{Disk, RunDir, State, Template, Vm};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::cli::{Cli, TemplateCommand, TemplateCreateArgs, VmCommand};
use crate::cmd::{open, open_with};
use crate::output::{NotFound, Out, UsageError};

const TEMPLATE_KIND: &str = "vm-template";
const VM_KIND: &str = "vm";

/// Runs a `vm` subcommand.
pub fn run(cli: &Cli, out: &Out, cmd: &VmCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        VmCommand::Template(t) => template(cli, out, t),
        VmCommand::Create {
            name,
            template,
            disk,
        } => create(cli, out, name, template, disk),
        VmCommand::Start { name } => run::start(cli, out, name),
        VmCommand::Stop { name, timeout } => run::stop(cli, out, name, *timeout),
        VmCommand::Kill { name } => run::kill(cli, out, name),
        VmCommand::Destroy { name, force } => destroy(cli, out, name, *force),
        VmCommand::Ls => info::ls(cli, out),
        VmCommand::Accel { reprobe } => run::accel_probe(cli, out, *reprobe),
        VmCommand::Show { name } => info::show(cli, out, name),
        VmCommand::Stats { name, interval } => info::stats(cli, out, name, *interval),
        VmCommand::Peripheral(p) => peripheral::run(cli, out, p),
        VmCommand::Console { name } => info::console(cli, out, name),
        VmCommand::Screenshot { name, file } => info::screenshot(cli, out, name, file),
        VmCommand::Monitor { name, dir, attach } => run::monitor(cli, name, dir, *attach),
        VmCommand::Relay {
            counters,
            host,
            port,
        } => Ok(run::relay(counters, host, *port)),
    }
}

/// A usage error from the runner's validation (exit 2), else the error.
fn vm_err(e: lamina_vm::Error) -> anyhow::Error {
    if e.is_invalid_input() {
        UsageError(e.to_string()).into()
    } else {
        e.into()
    }
}

fn decode<T: DeserializeOwned>(kind: &str, name: &str, v: &[u8]) -> anyhow::Result<T> {
    serde_json::from_slice(v).with_context(|| format!("corrupt {kind} record {name:?}"))
}

fn get<T: DeserializeOwned>(store: &Store, kind: &str, name: &str) -> anyhow::Result<T> {
    match store.record(kind, name)? {
        Some(v) => decode(kind, name, &v),
        None => {
            let what = if kind == VM_KIND { "VM" } else { "template" };
            Err(NotFound(format!("no {what} named {name:?}")).into())
        }
    }
}

fn all<T: DeserializeOwned>(store: &Store, kind: &str) -> anyhow::Result<Vec<T>> {
    store
        .records(kind)?
        .iter()
        .map(|(n, v)| decode(kind, n, v))
        .collect()
}

fn put<T: Serialize>(store: &Store, kind: &str, name: &str, value: &T) -> anyhow::Result<()> {
    let mut batch = store.batch()?;
    batch.put_record(kind, name, &serde_json::to_vec(value)?)?;
    store.commit(batch)?;
    Ok(())
}

/// The runtime directory of a VM.
fn run_dir(root: &Path, vm: &Vm) -> PathBuf {
    root.join("vms").join(&vm.uuid)
}

/// Opens the store for writing, waiting at most `wait` (`None`: fail at
/// once), without messages (monitors and listings call this in passing).
fn open_write(cli: &Cli, wait: Option<std::time::Duration>) -> anyhow::Result<Store> {
    let wait = wait.map_or(LockWait::Fail, |w| LockWait::Wait(Some(w)));
    open_with(cli, &Out::new(false, true), Access::Write, wait)
}

/// Saves `vm`'s new state and exit, unless its record moved on to another
/// run (or is gone) meanwhile.
fn record_state(store: &Store, vm: &Vm) -> anyhow::Result<()> {
    let Some(v) = store.record(VM_KIND, &vm.name)? else {
        return Ok(());
    };
    let mut cur: Vm = decode(VM_KIND, &vm.name, &v)?;
    if cur.uuid != vm.uuid
        || cur.run.as_ref().map(|r| r.run_id) != vm.run.as_ref().map(|r| r.run_id)
    {
        return Ok(());
    }
    cur.state = vm.state;
    cur.last_exit = vm.last_exit.clone();
    put(store, VM_KIND, &vm.name, &cur)
}

/// Brings the state of VMs that were running up to date: observes their
/// QEMU, re-attaches a monitor to a QEMU nobody watches, and records VMs
/// found powered off (best effort: skipped if a writer holds the store).
fn refresh(cli: &Cli, root: &Path, vms: &mut [Vm]) {
    let mut changed = Vec::new();
    for vm in vms.iter_mut() {
        let Some(r) = vm.run.clone() else { continue };
        if vm.state == State::PoweredOff {
            continue;
        }
        let dir = RunDir::at(&run_dir(root, vm));
        let o = lamina_vm::control::observe(&dir, &r);
        if o.unwatched {
            if let Err(e) = run::spawn_monitor(root, vm, &dir, true) {
                tracing::warn!("VM {}: cannot re-attach a monitor: {e:#}", vm.name);
            }
        }
        if o.state != vm.state {
            vm.state = o.state;
            if o.exit.is_some() {
                vm.last_exit = o.exit;
            }
            changed.push(vm.clone());
        }
    }
    if changed.is_empty() {
        return;
    }
    match open_write(cli, None) {
        Ok(store) => {
            for vm in &changed {
                if let Err(e) = record_state(&store, vm) {
                    tracing::warn!("VM {}: cannot record its state: {e:#}", vm.name);
                }
            }
        }
        Err(e) => tracing::info!("state not recorded now: {e:#}"),
    }
}

/// A VM as it is now, read with its template in one store open.
struct Current {
    vm: Vm,
    /// The store directory.
    root: PathBuf,
    /// Its template, unless that record is gone.
    template: Option<Template>,
}

/// One VM, its state brought up to date.
fn current(cli: &Cli, out: &Out, name: &str) -> anyhow::Result<Current> {
    let store = open(cli, out, Access::Read)?;
    let root = store.root().to_path_buf();
    let mut vm: Vm = get(&store, VM_KIND, name)?;
    let template = match store.record(TEMPLATE_KIND, &vm.template)? {
        Some(v) => Some(decode(TEMPLATE_KIND, &vm.template, &v)?),
        None => None,
    };
    drop(store);
    refresh(cli, &root, std::slice::from_mut(&mut vm));
    Ok(Current { vm, root, template })
}

fn template(cli: &Cli, out: &Out, cmd: &TemplateCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        TemplateCommand::Create(a) => return template_create(cli, out, a),
        TemplateCommand::Ls => {
            let store = open(cli, out, Access::Read)?;
            let ts: Vec<Template> = all(&store, TEMPLATE_KIND)?;
            out.result(&ts, || {
                let mut s = format!(
                    "{:<20} {:<7} {:<8} {:>4} {:>7}  {:<8} {}\n",
                    "NAME", "PROFILE", "ARCH", "CPUS", "MEMORY", "ACCEL", "NET"
                );
                for t in &ts {
                    s += &format!(
                        "{:<20} {:<7} {:<8} {:>4} {:>4}MiB  {:<8} {}\n",
                        t.name,
                        json_name(&t.profile),
                        json_name(&t.arch),
                        t.cpus,
                        t.memory_mib,
                        json_name(&t.accel),
                        t.net
                    );
                }
                s
            })?;
        }
        TemplateCommand::Show { name } => {
            let store = open(cli, out, Access::Read)?;
            let t: Template = get(&store, TEMPLATE_KIND, name)?;
            out.result(&t, || template_text(&t))?;
        }
        TemplateCommand::Rm { name } => {
            let store = open(cli, out, Access::Write)?;
            let _: Template = get(&store, TEMPLATE_KIND, name)?;
            let users: Vec<String> = all::<Vm>(&store, VM_KIND)?
                .into_iter()
                .filter(|v| &v.template == name)
                .map(|v| v.name)
                .collect();
            if !users.is_empty() {
                return Err(UsageError(format!(
                    "template {name:?} is in use by VM(s) {}: destroy them first",
                    users.join(", ")
                ))
                .into());
            }
            let mut batch = store.batch()?;
            batch.delete_record(TEMPLATE_KIND, name)?;
            store.commit(batch)?;
            out.result(&serde_json::json!({ "removed": name }), || {
                format!("removed template {name}")
            })?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The serde name of a unit enum value (`pc`, `x86_64`, ...).
fn json_name<T: Serialize>(v: &T) -> String {
    serde_json::to_value(v)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

fn template_text(t: &Template) -> String {
    let (w, h) = t.profile.geometry();
    let p = |o: &Option<PathBuf>| o.as_ref().map_or("-".into(), |p| p.display().to_string());
    format!(
        "template {}\nprofile  {} ({w}x{h})\narch     {}\ncpus     {}\nmemory   {} MiB\nkernel   {}\ninitrd   {}\nappend   {}\nnet      {}\naccel    {}\n",
        t.name,
        json_name(&t.profile),
        json_name(&t.arch),
        t.cpus,
        t.memory_mib,
        p(&t.kernel),
        p(&t.initrd),
        t.append.as_deref().unwrap_or("-"),
        t.net,
        json_name(&t.accel)
    )
}

fn template_create(cli: &Cli, out: &Out, a: &TemplateCreateArgs) -> anyhow::Result<ExitCode> {
    let t = Template {
        name: a.name.clone(),
        profile: a.profile.parse().map_err(vm_err)?,
        arch: a.arch.parse().map_err(vm_err)?,
        cpus: a.cpus,
        memory_mib: a.memory,
        kernel: a.kernel.clone(),
        initrd: a.initrd.clone(),
        append: a.append.clone(),
        net: a.net.parse().map_err(vm_err)?,
        accel: a.accel.parse().map_err(vm_err)?,
    }
    .validate()
    .map_err(vm_err)?;
    let store = open(cli, out, Access::Write)?;
    if store.record(TEMPLATE_KIND, &t.name)?.is_some() {
        return Err(UsageError(format!("a template named {:?} exists already", t.name)).into());
    }
    put(&store, TEMPLATE_KIND, &t.name, &t)?;
    out.result(&t, || format!("created template {}", t.name))?;
    Ok(ExitCode::SUCCESS)
}

fn create(
    cli: &Cli,
    out: &Out,
    name: &str,
    template: &str,
    disk: &str,
) -> anyhow::Result<ExitCode> {
    lamina_vm::check_name("VM", name).map_err(vm_err)?;
    let disk = Disk::parse(disk).map_err(vm_err)?;
    let store = open(cli, out, Access::Write)?;
    let _: Template = get(&store, TEMPLATE_KIND, template)?;
    if store.record(VM_KIND, name)?.is_some() {
        return Err(UsageError(format!("a VM named {name:?} exists already")).into());
    }
    let existing: Vec<Vm> = all(&store, VM_KIND)?;
    let mut taken: HashSet<_> = existing.iter().map(|v| v.mac).collect();
    taken.extend(lamina_vm::procfs::host_macs());
    let vm = Vm {
        name: name.to_string(),
        uuid: lamina_vm::new_uuid(),
        mac: lamina_vm::new_mac(&taken),
        template: template.to_string(),
        disk,
        created_ns: lamina_vm::monitor::now_ns(),
        state: State::PoweredOff,
        run: None,
        last_exit: None,
        peripherals: Vec::new(),
    };
    // Fails now, not at start, if the store's path is too deep for sockets.
    RunDir::create(&run_dir(store.root(), &vm)).map_err(vm_err)?;
    if let Err(e) = put(&store, VM_KIND, name, &vm) {
        let _ = std::fs::remove_dir_all(run_dir(store.root(), &vm));
        return Err(e);
    }
    out.result(&vm, || {
        format!("created VM {name} (uuid {}, mac {})", vm.uuid, vm.mac)
    })?;
    Ok(ExitCode::SUCCESS)
}

fn destroy(cli: &Cli, out: &Out, name: &str, force: bool) -> anyhow::Result<ExitCode> {
    let Current { vm, root, .. } = current(cli, out, name)?;
    if vm.state != State::PoweredOff {
        let Some(r) = vm.run.as_ref().filter(|_| force) else {
            return Err(UsageError(format!(
                "VM {name} is {}: stop or kill it first, or pass --force",
                vm.state
            ))
            .into());
        };
        lamina_vm::control::kill(&RunDir::at(&run_dir(&root, &vm)), r)?;
    }
    let store = open(cli, out, Access::Write)?;
    let mut batch = store.batch()?;
    batch.delete_record(VM_KIND, name)?;
    store.commit(batch)?;
    let dir = run_dir(&root, &vm);
    if let Err(e) = std::fs::remove_dir_all(&dir) {
        if e.kind() != std::io::ErrorKind::NotFound {
            out.note(&format!("warning: {}: {e}", dir.display()));
        }
    }
    out.result(&serde_json::json!({ "destroyed": name }), || {
        format!("destroyed VM {name} (its disk is kept)")
    })?;
    Ok(ExitCode::SUCCESS)
}
