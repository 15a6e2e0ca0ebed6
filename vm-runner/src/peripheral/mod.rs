//! Network peripherals mapped into one VM as local devices.
//!
//! A printer, a serial device or a USB device that sits on the network is
//! joined to a device inside one guest (a serial port, a parallel port, a
//! `usb-redir` USB device) through the hypervisor side of the VM, never
//! through the guest's network card: a VM with no network card still
//! reaches its printer.
//!
//! The path of the bytes:
//!
//! ```text
//! guest driver ── QEMU device ── chardev (Unix socket pN.sock in the run dir)
//!     ── adapter (in the VM's monitor process: TLS, byte counts, reconnects)
//!     ── TCP ── the peripheral's server or station
//! ```
//!
//! The adapter ([`adapter`]) holds the network side: it connects out (or
//! listens), optionally with TLS (rustls: the peer's certificate checked
//! against the given CA and the peer's host name; a client certificate
//! shown or required), counts the bytes each way, and reconnects with a
//! backoff when the peer is down or goes away. While the network side is
//! down the guest's device stays present and its output is dropped, as on
//! an unplugged cable; QEMU never waits on the network, so the VM never
//! hangs on a peripheral. Its state is in `links.json` in the run dir
//! ([`read_states`]).

pub mod adapter;
mod hotplug;
mod spool;
mod tls;

pub use hotplug::{plug, unplug};

use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::fsutil::read_json;
use crate::rundir::RunDir;
use crate::spec::{check_name, existing_file, Arch};

/// What a peripheral is inside the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PeripheralKind {
    /// A serial port: `ttyS1`.. on x86 (16550), a named virtio-serial
    /// port on Arm.
    Serial,
    /// A parallel port (`lp0`..) on x86: the guest's print jobs arrive as
    /// raw bytes at a network print server (port 9100 style).
    Printer,
    /// A `usb-redir` USB device joined to a usbredir server
    /// (`usbredirserver`, `usbredirect`).
    Usb,
}

impl std::str::FromStr for PeripheralKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "serial" => Ok(PeripheralKind::Serial),
            "printer" => Ok(PeripheralKind::Printer),
            "usb" => Ok(PeripheralKind::Usb),
            _ => Err(Error::Invalid(format!(
                "unknown peripheral kind {s:?} (expected one of: serial, printer, usb)"
            ))),
        }
    }
}

impl fmt::Display for PeripheralKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PeripheralKind::Serial => "serial",
            PeripheralKind::Printer => "printer",
            PeripheralKind::Usb => "usb",
        })
    }
}

/// How the adapter reaches the peripheral.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "mode")]
pub enum Link {
    /// The adapter connects to the peripheral's server.
    Connect {
        /// Host name or address.
        host: String,
        /// TCP port.
        port: u16,
    },
    /// The adapter listens; the peripheral's station connects (one at a
    /// time).
    Listen {
        /// Address to listen on.
        addr: String,
        /// TCP port.
        port: u16,
    },
}

/// Splits `tcp:HOST:PORT` (HOST may be `[v6]`).
fn parse_tcp(what: &str, s: &str) -> Result<(String, u16)> {
    let bad = |why: &str| Error::Invalid(format!("{what} {s:?}: {why} (expected tcp:HOST:PORT)"));
    let rest = s
        .strip_prefix("tcp:")
        .ok_or_else(|| bad("only tcp: links are supported"))?;
    let (host, port) = rest.rsplit_once(':').ok_or_else(|| bad("no port"))?;
    let port: u16 = port.parse().map_err(|_| bad("bad port"))?;
    if port == 0 {
        return Err(bad("port 0"));
    }
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if host.is_empty() || host.contains(char::is_whitespace) {
        return Err(bad("bad host"));
    }
    Ok((host.to_string(), port))
}

impl Link {
    /// From `--connect tcp:HOST:PORT` or `--listen tcp:ADDR:PORT` (exactly one).
    pub fn parse(connect: Option<&str>, listen: Option<&str>) -> Result<Link> {
        match (connect, listen) {
            (Some(c), None) => {
                let (host, port) = parse_tcp("--connect", c)?;
                Ok(Link::Connect { host, port })
            }
            (None, Some(l)) => {
                let (addr, port) = parse_tcp("--listen", l)?;
                Ok(Link::Listen { addr, port })
            }
            _ => Err(Error::Invalid(
                "give exactly one of --connect tcp:HOST:PORT and --listen tcp:ADDR:PORT".into(),
            )),
        }
    }

    /// `tcp:HOST:PORT`, as given.
    pub fn endpoint(&self) -> String {
        let (h, p) = match self {
            Link::Connect { host, port } => (host, port),
            Link::Listen { addr, port } => (addr, port),
        };
        if h.contains(':') {
            format!("tcp:[{h}]:{p}")
        } else {
            format!("tcp:{h}:{p}")
        }
    }
}

impl fmt::Display for Link {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Link::Connect { .. } => write!(f, "connect {}", self.endpoint()),
            Link::Listen { .. } => write!(f, "listen {}", self.endpoint()),
        }
    }
}

/// TLS on a link: PEM files.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct LinkTls {
    /// CA certificate(s): the peer's certificate must chain to them (when
    /// listening: clients must show a certificate that does).
    pub ca: Option<PathBuf>,
    /// This side's certificate (a client certificate when connecting).
    pub cert: Option<PathBuf>,
    /// Its private key.
    pub key: Option<PathBuf>,
}

/// A peripheral of a VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Peripheral {
    /// Name, unique among all VMs: one peripheral belongs to one VM.
    pub name: String,
    /// What it is in the guest.
    pub kind: PeripheralKind,
    /// How it is reached.
    pub link: Link,
    /// TLS on the link, if any.
    pub tls: Option<LinkTls>,
    /// Its slot in the VM (socket `pSLOT.sock`, QEMU ids `perSLOT`),
    /// fixed when it is added.
    pub slot: u32,
}

/// Serial ports a VM may have besides its console (x86: ttyS1-ttyS3).
pub const MAX_SERIAL: usize = 3;
/// Parallel ports (x86: lp0-lp2).
pub const MAX_PRINTER: usize = 3;
/// Peripherals per VM.
pub const MAX_PERIPHERALS: usize = 16;

impl Peripheral {
    /// Checks the name and the TLS files (which must exist; made absolute,
    /// and loadable as certificates and keys).
    pub fn validate(mut self) -> Result<Self> {
        check_name("peripheral", &self.name)?;
        if let Some(t) = self.tls.take() {
            let f = |what: &str, p: &Option<PathBuf>| {
                p.as_deref().map(|p| existing_file(what, p)).transpose()
            };
            let t = LinkTls {
                ca: f("--tls-ca", &t.ca)?,
                cert: f("--tls-cert", &t.cert)?,
                key: f("--tls-key", &t.key)?,
            };
            if t.cert.is_some() != t.key.is_some() {
                return Err(Error::Invalid(
                    "--tls-cert and --tls-key go together".into(),
                ));
            }
            match &self.link {
                Link::Connect { .. } if t.ca.is_none() => {
                    return Err(Error::Invalid(
                        "a TLS link that connects needs --tls-ca (the CA the peripheral's server certificate is checked against)".into(),
                    ))
                }
                Link::Listen { .. } if t.cert.is_none() => {
                    return Err(Error::Invalid(
                        "a TLS link that listens needs --tls-cert and --tls-key (and --tls-ca to require client certificates)".into(),
                    ))
                }
                _ => {}
            }
            // Fails now, naming the file, rather than at the VM's start.
            tls::check(&self.link, &t)?;
            self.tls = Some(t);
        }
        Ok(self)
    }

    /// The Unix socket QEMU's chardev listens on, in the VM's run dir.
    pub fn guest_socket(&self, dir: &RunDir) -> PathBuf {
        dir.file(&format!("p{}.sock", self.slot))
    }

    /// Its chardev's id in QEMU (its device's is `dev-` and this).
    pub fn qemu_id(&self) -> String {
        format!("per{}", self.slot)
    }

    /// Whether it can be added to a running VM (QMP `chardev-add` +
    /// `device_add`): USB devices and Arm's virtio-serial ports can; the
    /// ISA serial and parallel ports of x86 cannot.
    pub fn hot_pluggable(&self, arch: Arch) -> bool {
        self.kind == PeripheralKind::Usb || arch == Arch::Aarch64
    }
}

/// Where each of `ps` appears in an `arch` guest: `ttyS1`, `lp0`,
/// `virtio-port lamina.NAME` or `usb`, in the order of `ps`.
pub fn guest_devices(arch: Arch, ps: &[Peripheral]) -> Vec<String> {
    // Ports are numbered by slot within their kind: adding one never
    // renumbers those already there.
    let rank = |p: &Peripheral| {
        ps.iter()
            .filter(|q| q.kind == p.kind && q.slot < p.slot)
            .count()
    };
    ps.iter()
        .map(|p| match (arch, p.kind) {
            (_, PeripheralKind::Usb) => "usb".to_string(),
            (Arch::Aarch64, _) => format!("virtio-port lamina.{}", p.name),
            (Arch::X86_64, PeripheralKind::Serial) => format!("ttyS{}", rank(p) + 1),
            (Arch::X86_64, PeripheralKind::Printer) => format!("lp{}", rank(p)),
        })
        .collect()
}

/// Checks that `ps` fit one `arch` VM (counts of each kind).
pub fn check_fit(arch: Arch, ps: &[Peripheral]) -> Result<()> {
    let n = |k| ps.iter().filter(|p| p.kind == k).count();
    if ps.len() > MAX_PERIPHERALS {
        return Err(Error::Invalid(format!(
            "a VM has at most {MAX_PERIPHERALS} peripherals"
        )));
    }
    if arch == Arch::X86_64 {
        if n(PeripheralKind::Serial) > MAX_SERIAL {
            return Err(Error::Invalid(format!(
                "a VM has at most {MAX_SERIAL} serial peripherals (ttyS1-ttyS{MAX_SERIAL})"
            )));
        }
        if n(PeripheralKind::Printer) > MAX_PRINTER {
            return Err(Error::Invalid(format!(
                "a VM has at most {MAX_PRINTER} printers (lp0-lp{})",
                MAX_PRINTER - 1
            )));
        }
    }
    Ok(())
}

/// QEMU's arguments for `ps` in an `arch` VM whose run dir is `dir`.
pub fn qemu_args(arch: Arch, ps: &[Peripheral], dir: &RunDir) -> Result<Vec<String>> {
    check_fit(arch, ps)?;
    let mut a = Vec::new();
    let path = |p: &Peripheral| p.guest_socket(dir).to_string_lossy().replace(',', ",,");
    // Buses first, always, so that a later hot-plug finds them: a USB
    // controller, and on Arm a virtio-serial bus.
    a.extend(["-device".into(), "qemu-xhci,id=perusb".into()]);
    if arch == Arch::Aarch64 {
        a.extend(["-device".into(), "virtio-serial-pci,id=perser".into()]);
    }
    let devices = guest_devices(arch, ps);
    for (p, dev) in ps.iter().zip(&devices) {
        let id = p.qemu_id();
        a.push("-chardev".into());
        a.push(format!(
            "socket,id={id},path={},server=on,wait=off",
            path(p)
        ));
        let device = match (arch, p.kind) {
            (_, PeripheralKind::Usb) => format!("usb-redir,chardev={id},id=dev-{id},bus=perusb.0"),
            (Arch::Aarch64, _) => format!(
                "virtserialport,chardev={id},id=dev-{id},bus=perser.0,name=lamina.{}",
                p.name
            ),
            (Arch::X86_64, PeripheralKind::Serial) => {
                let index = dev.trim_start_matches("ttyS");
                format!("isa-serial,chardev={id},id=dev-{id},index={index}")
            }
            (Arch::X86_64, PeripheralKind::Printer) => {
                let index = dev.trim_start_matches("lp");
                format!("isa-parallel,chardev={id},id=dev-{id},index={index}")
            }
        };
        a.extend(["-device".into(), device]);
    }
    Ok(a)
}

/// The state of one peripheral's link, as its adapter last wrote it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkState {
    /// The peripheral.
    pub name: String,
    /// `connecting`, `connected`, `retrying` (the peer is down: the next
    /// attempt comes after a backoff), `listening` (no station connected),
    /// `idle` (a printer with no job to send) or `error` (cannot listen,
    /// TLS files unusable).
    pub state: String,
    /// The peer of the current connection.
    pub peer: Option<String>,
    /// Bytes from the network to the guest, over all connections.
    pub to_guest: u64,
    /// Bytes from the guest to the network.
    pub from_guest: u64,
    /// Connections made (or accepted).
    pub connections: u64,
    /// Connections refused (TLS handshake failed, a second station while
    /// one is connected).
    pub refused: u64,
    /// Printers: bytes of the guest's jobs spooled, not yet sent.
    #[serde(default)]
    pub queued: u64,
    /// Printers: bytes dropped because the spool was full.
    #[serde(default)]
    pub dropped: u64,
    /// The last thing that went wrong.
    pub last_error: Option<String>,
    /// When `state` last changed, ns since the epoch.
    pub since_ns: i64,
}

/// The link states of the VM whose run dir is `dir` (empty when no adapter
/// has written them, e.g. the VM has not run).
pub fn read_states(dir: &RunDir) -> Vec<LinkState> {
    read_json(&dir.file("links.json")).unwrap_or_default()
}

#[cfg(test)]
mod tests;
