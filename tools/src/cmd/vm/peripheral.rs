//! `lamina vm peripheral add | ls | rm`: network peripherals of VMs.
//!
//! A peripheral is stored in its VM's record and belongs to that VM alone:
//! its name and its network endpoint are unique over all VMs. It applies at
//! the VM's next start; a running VM gets it at once where QEMU can plug
//! the device in (USB, Arm's virtio-serial ports), and a removed one's link
//! is cut at once.

use std::path::Path;
use std::process::ExitCode;

use lamina_sync::Access;
use lamina_vm::peripheral::{self, LinkState};
use lamina_vm::{Arch, Link, LinkTls, Peripheral, RunDir, State, Template, Vm};
use serde::Serialize;

use super::{all, current, get, put, run_dir, vm_err, Current, TEMPLATE_KIND, VM_KIND};
use crate::cli::{Cli, PeripheralAddArgs, PeripheralCommand};
use crate::cmd::open;
use crate::output::{bytes, Out, UsageError};

/// Runs a `vm peripheral` subcommand.
pub(super) fn run(cli: &Cli, out: &Out, cmd: &PeripheralCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        PeripheralCommand::Add(a) => add(cli, out, a),
        PeripheralCommand::Ls { vm } => ls(cli, out, vm.as_deref()),
        PeripheralCommand::Rm { vm, name } => rm(cli, out, vm, name),
    }
}

/// One peripheral, with its link's state when its VM runs.
#[derive(Debug, Serialize)]
pub(super) struct Row {
    vm: String,
    name: String,
    kind: String,
    /// Where it is in the guest (`ttyS1`, `lp0`, `usb`, ...).
    device: String,
    link: String,
    tls: bool,
    /// The link's state, `off` when the VM does not run.
    state: String,
    peer: Option<String>,
    to_guest_bytes: u64,
    from_guest_bytes: u64,
    connections: u64,
    refused: u64,
    /// Printers: bytes spooled, not yet sent.
    queued_bytes: u64,
    /// Printers: bytes dropped on a full spool.
    dropped_bytes: u64,
    last_error: Option<String>,
}

/// The rows of `vm`'s peripherals (its template's arch: `arch`).
pub(super) fn rows(root: &Path, vm: &Vm, arch: Arch) -> Vec<Row> {
    let dir = RunDir::at(&run_dir(root, vm));
    let states: Vec<LinkState> = if vm.state == State::PoweredOff {
        Vec::new()
    } else {
        peripheral::read_states(&dir)
    };
    let devices = peripheral::guest_devices(arch, &vm.peripherals);
    vm.peripherals
        .iter()
        .zip(devices)
        .map(|(p, device)| {
            let s = states.iter().find(|s| s.name == p.name);
            Row {
                vm: vm.name.clone(),
                name: p.name.clone(),
                kind: p.kind.to_string(),
                device,
                link: p.link.to_string(),
                tls: p.tls.is_some(),
                state: s.map_or_else(
                    || {
                        if vm.state == State::PoweredOff {
                            "off".into()
                        } else {
                            "next start".into()
                        }
                    },
                    |s| s.state.clone(),
                ),
                peer: s.and_then(|s| s.peer.clone()),
                to_guest_bytes: s.map_or(0, |s| s.to_guest),
                from_guest_bytes: s.map_or(0, |s| s.from_guest),
                connections: s.map_or(0, |s| s.connections),
                refused: s.map_or(0, |s| s.refused),
                queued_bytes: s.map_or(0, |s| s.queued),
                dropped_bytes: s.map_or(0, |s| s.dropped),
                last_error: s.and_then(|s| s.last_error.clone()),
            }
        })
        .collect()
}

impl Row {
    /// One line of `vm stats`.
    pub(super) fn line(&self) -> String {
        let mut s = format!(
            "periph   {} ({} as {}, {}{}): {}",
            self.name,
            self.kind,
            self.device,
            self.link,
            if self.tls { ", tls" } else { "" },
            self.state
        );
        if let Some(p) = &self.peer {
            s += &format!(" to {p}");
        }
        s += &format!(
            ", to guest {}, from guest {}, {} connections, {} refused",
            bytes(self.to_guest_bytes),
            bytes(self.from_guest_bytes),
            self.connections,
            self.refused
        );
        if self.queued_bytes > 0 || self.dropped_bytes > 0 {
            s += &format!(
                ", {} spooled, {} dropped",
                bytes(self.queued_bytes),
                bytes(self.dropped_bytes)
            );
        }
        if let Some(e) = &self.last_error {
            s += &format!("; last error: {e}");
        }
        s.push('\n');
        s
    }
}

/// The table of `rows`.
pub(super) fn table(rows: &[Row]) -> String {
    let mut s = format!(
        "{:<12} {:<12} {:<8} {:<22} {:<30} {:<10} {:>9} {:>9}  {}\n",
        "VM", "NAME", "KIND", "DEVICE", "LINK", "STATE", "TO GUEST", "FROM", "LAST ERROR"
    );
    for r in rows {
        s += &format!(
            "{:<12} {:<12} {:<8} {:<22} {:<30} {:<10} {:>9} {:>9}  {}\n",
            r.vm,
            r.name,
            r.kind,
            r.device,
            format!("{}{}", r.link, if r.tls { " tls" } else { "" }),
            r.state,
            bytes(r.to_guest_bytes),
            bytes(r.from_guest_bytes),
            r.last_error.as_deref().unwrap_or("-"),
        );
    }
    s
}

fn arch_of(store: &lamina_sync::Store, vm: &Vm) -> anyhow::Result<Arch> {
    let t: Template = get(store, TEMPLATE_KIND, &vm.template)?;
    Ok(t.arch)
}

fn ls(cli: &Cli, out: &Out, only: Option<&str>) -> anyhow::Result<ExitCode> {
    let store = open(cli, out, Access::Read)?;
    let root = store.root().to_path_buf();
    let mut vms: Vec<Vm> = match only {
        Some(n) => vec![get(&store, VM_KIND, n)?],
        None => all(&store, VM_KIND)?,
    };
    let archs: Vec<Arch> = vms
        .iter()
        .map(|v| arch_of(&store, v).unwrap_or(Arch::X86_64))
        .collect();
    drop(store);
    super::refresh(cli, &root, &mut vms);
    let rows: Vec<Row> = vms
        .iter()
        .zip(archs)
        .flat_map(|(v, a)| rows(&root, v, a))
        .collect();
    out.result(&rows, || table(&rows))?;
    Ok(ExitCode::SUCCESS)
}

/// The VM and peripheral that already have `p`'s name, or its endpoint
/// in the same mode, and which of the two (`name`, `endpoint`) matched.
fn owner_of<'a>(vms: &'a [Vm], p: &Peripheral) -> Option<(&'a Vm, &'a Peripheral, &'static str)> {
    vms.iter().find_map(|v| {
        v.peripherals.iter().find_map(|q| {
            if q.name == p.name {
                Some((v, q, "name"))
            } else if q.link.endpoint() == p.link.endpoint()
                && std::mem::discriminant(&q.link) == std::mem::discriminant(&p.link)
            {
                Some((v, q, "endpoint"))
            } else {
                None
            }
        })
    })
}

fn add(cli: &Cli, out: &Out, a: &PeripheralAddArgs) -> anyhow::Result<ExitCode> {
    let link = Link::parse(a.connect.as_deref(), a.listen.as_deref()).map_err(vm_err)?;
    let tls =
        (a.tls_ca.is_some() || a.tls_cert.is_some() || a.tls_key.is_some()).then(|| LinkTls {
            ca: a.tls_ca.clone(),
            cert: a.tls_cert.clone(),
            key: a.tls_key.clone(),
        });
    let mut p = Peripheral {
        name: a.name.clone(),
        kind: a.kind.parse().map_err(vm_err)?,
        link,
        tls,
        slot: 0,
    }
    .validate()
    .map_err(vm_err)?;
    let store = open(cli, out, Access::Write)?;
    let mut vm: Vm = get(&store, VM_KIND, &a.vm)?;
    let arch = arch_of(&store, &vm)?;
    let vms: Vec<Vm> = all(&store, VM_KIND)?;
    if let Some((owner, q, what)) = owner_of(&vms, &p) {
        let msg = match (what, owner.name == vm.name) {
            ("name", true) => format!("VM {} already has a peripheral named {}", vm.name, q.name),
            ("name", false) => format!(
                "peripheral {} belongs to VM {}: one peripheral serves one VM (remove it there first: lamina vm peripheral rm {} {})",
                q.name, owner.name, owner.name, q.name
            ),
            _ => format!(
                "{} is peripheral {} of VM {}: one peripheral serves one VM",
                p.link.endpoint(),
                q.name,
                owner.name
            ),
        };
        return Err(UsageError(msg).into());
    }
    // Slots are never reused: adding one never renumbers the guest's ports.
    p.slot = vm.peripherals.iter().map(|q| q.slot + 1).max().unwrap_or(0);
    vm.peripherals.push(p.clone());
    peripheral::check_fit(arch, &vm.peripherals).map_err(vm_err)?;
    put(&store, VM_KIND, &vm.name, &vm)?;
    let root = store.root().to_path_buf();
    drop(store);
    let device = peripheral::guest_devices(arch, &vm.peripherals)
        .pop()
        .unwrap_or_default();
    let Current { vm, .. } = current(cli, out, &a.vm)?;
    let now = if vm.state == State::PoweredOff {
        "at the VM's next start".to_string()
    } else if p.hot_pluggable(arch) {
        let dir = RunDir::at(&run_dir(&root, &vm));
        match peripheral::plug(&dir, &p) {
            Ok(()) => "now (hot-plugged into the running VM)".to_string(),
            Err(e) => format!("at the VM's next start (hot-plug failed: {e:#})"),
        }
    } else {
        format!(
            "at the VM's next start (QEMU cannot add a {} port to a running {} VM)",
            p.kind,
            super::json_name(&arch)
        )
    };
    out.result(
        &serde_json::json!({ "vm": vm.name, "peripheral": p, "device": device, "applies": now }),
        || {
            format!(
                "added {} {} to VM {} as {device}: applies {now}",
                p.kind, p.name, vm.name
            )
        },
    )?;
    Ok(ExitCode::SUCCESS)
}

fn rm(cli: &Cli, out: &Out, vm_name: &str, name: &str) -> anyhow::Result<ExitCode> {
    let store = open(cli, out, Access::Write)?;
    let mut vm: Vm = get(&store, VM_KIND, vm_name)?;
    let arch = arch_of(&store, &vm)?;
    let Some(i) = vm.peripherals.iter().position(|p| p.name == name) else {
        return Err(crate::output::NotFound(format!(
            "VM {vm_name} has no peripheral named {name:?}"
        ))
        .into());
    };
    let p = vm.peripherals.remove(i);
    put(&store, VM_KIND, vm_name, &vm)?;
    let root = store.root().to_path_buf();
    drop(store);
    let Current { vm, .. } = current(cli, out, vm_name)?;
    let mut said = "removed".to_string();
    if vm.state != State::PoweredOff {
        // The link is cut at once, whether or not the device can go.
        let dir = RunDir::at(&run_dir(&root, &vm));
        let device = p.hot_pluggable(arch);
        said = match peripheral::unplug(&dir, &p, device) {
            Ok(()) if device => "removed; unplugged from the running VM".into(),
            Ok(()) => "removed; its link is cut, the device goes at the VM's next start".into(),
            Err(e) => format!("removed; the device goes at the VM's next start ({e:#})"),
        };
    }
    out.result(
        &serde_json::json!({ "vm": vm_name, "removed": name, "detail": said }),
        || format!("peripheral {name} of VM {vm_name}: {said}"),
    )?;
    Ok(ExitCode::SUCCESS)
}
