//! Lamina's VM runner: runs QEMU virtual machines on given disks.
//!
//! The runner knows nothing of layers (DESIGN §8). It is given a
//! [`Template`] (profile, CPUs, memory, kernel, network policy, accelerator)
//! and a [`Disk`] (an image file or an NBD URI), and it:
//!
//! - builds the QEMU command line ([`qemu`]), with a QMP socket, a VNC
//!   display on a Unix socket and a serial console (socket + log), all in the
//!   VM's runtime directory ([`RunDir`]);
//! - starts QEMU under a small per-VM monitor process ([`monitor`]) that
//!   outlives the command that started it, watches QMP events, reaps QEMU
//!   and records how it ended ([`Exit`]);
//! - observes a VM after any restart of the command line: pid + start time
//!   + a QMP handshake ([`control::observe`]);
//! - stops (ACPI power-down, then kill), kills, takes screenshots and reads
//!   figures from /proc ([`control`], [`procfs`]);
//! - probes KVM once, with a bounded time, and falls back to TCG
//!   ([`accel`]);
//! - joins network peripherals (printers, serial and USB devices) to
//!   local devices of one guest, outside its network card ([`peripheral`]).
//!
//! Keeping VM records (definitions, last known state) is the caller's job:
//! every type here is serde-serialisable so it can live in any catalog.

pub mod accel;
pub mod console;
pub mod control;
mod error;
mod fsutil;
pub mod monitor;
mod net;
pub mod peripheral;
pub mod procfs;
pub mod qemu;
pub mod qmp;
mod rundir;
mod spec;

pub use error::{Error, Result};
pub use peripheral::{Link, LinkState, LinkTls, Peripheral, PeripheralKind};
pub use rundir::{Exit, Run, RunDir};
pub use spec::{
    check_name, new_mac, new_uuid, Accel, Arch, Disk, Mac, Net, NetDest, Profile, State, Template,
    Vm,
};
