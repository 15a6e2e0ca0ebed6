//! Peripherals in and out of a running VM, over QMP.

use std::time::{Duration, Instant};

use serde_json::json;

use super::{adapter, Peripheral, PeripheralKind};
use crate::error::{Error, Result};
use crate::qmp::Qmp;
use crate::rundir::RunDir;

const QMP_TIMEOUT: Duration = Duration::from_secs(10);

/// Plugs `p` into the running VM of `dir` (`chardev-add`, then
/// `device_add`; see [`Peripheral::hot_pluggable`]) and starts its link.
/// Nothing is left half-plugged when the device cannot be added.
pub fn plug(dir: &RunDir, p: &Peripheral) -> Result<()> {
    let id = p.qemu_id();
    let mut q = Qmp::connect(&dir.qmp(), QMP_TIMEOUT)?;
    let chardev = json!({
        "id": id,
        "backend": { "type": "socket", "data": {
            "addr": { "type": "unix", "data": {
                "path": p.guest_socket(dir).to_string_lossy() } },
            "server": true, "wait": false } }
    });
    let device = match p.kind {
        PeripheralKind::Usb => json!({
            "driver": "usb-redir", "chardev": id, "id": format!("dev-{id}"),
            "bus": "perusb.0" }),
        _ => json!({
            "driver": "virtserialport", "chardev": id, "id": format!("dev-{id}"),
            "bus": "perser.0", "name": format!("lamina.{}", p.name) }),
    };
    q.execute("chardev-add", Some(chardev))?;
    if let Err(e) = q.execute("device_add", Some(device)) {
        let _ = q.execute("chardev-remove", Some(json!({ "id": id })));
        return Err(e);
    }
    adapter::want(dir, p)
}

/// Cuts `p`'s link in the running VM of `dir` at once; with `device`,
/// also takes its device out (`device_del`, then `chardev-remove` once the
/// guest has let the device go).
pub fn unplug(dir: &RunDir, p: &Peripheral, device: bool) -> Result<()> {
    adapter::unwant(dir, &p.name)?;
    if !device {
        return Ok(());
    }
    let id = p.qemu_id();
    let mut q = Qmp::connect(&dir.qmp(), QMP_TIMEOUT)?;
    q.execute("device_del", Some(json!({ "id": format!("dev-{id}") })))?;
    let deadline = Instant::now() + QMP_TIMEOUT;
    loop {
        match q.execute("chardev-remove", Some(json!({ "id": id }))) {
            Ok(_) => return Ok(()),
            // usb-redir deletes its chardev with the device.
            Err(Error::Qmp { reason, .. }) if reason.contains("not found") => return Ok(()),
            Err(e) if Instant::now() > deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}
