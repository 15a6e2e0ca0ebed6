//! What a VM is: templates, disks, network policies, identities and states.

use std::collections::HashSet;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
pub use crate::net::{Net, NetDest};

/// The kind of device a VM stands for; sets the display geometry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Profile {
    /// A desktop PC: 1280×800.
    Pc,
    /// A phone: 720×1280, portrait.
    Phone,
}

impl Profile {
    /// The framebuffer the guest sees, width × height.
    pub fn geometry(self) -> (u32, u32) {
        match self {
            Profile::Pc => (1280, 800),
            Profile::Phone => (720, 1280),
        }
    }
}

/// Guest architecture.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    /// x86-64 (`qemu-system-x86_64`, q35).
    X86_64,
    /// 64-bit Arm (`qemu-system-aarch64`, virt).
    Aarch64,
}

/// Accelerator choice of a template.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// KVM when the host's probe says it works, else TCG.
    Auto,
    /// KVM, without probing.
    Kvm,
    /// TCG (emulation).
    Tcg,
}

fn parse_enum<T>(what: &str, s: &str, table: &[(&str, T)]) -> Result<T>
where
    T: Copy,
{
    table
        .iter()
        .find(|(n, _)| *n == s)
        .map(|(_, v)| *v)
        .ok_or_else(|| {
            let names: Vec<&str> = table.iter().map(|(n, _)| *n).collect();
            Error::Invalid(format!(
                "unknown {what} {s:?} (expected one of: {})",
                names.join(", ")
            ))
        })
}

impl FromStr for Profile {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        parse_enum(
            "profile",
            s,
            &[("pc", Profile::Pc), ("phone", Profile::Phone)],
        )
    }
}

impl FromStr for Arch {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        parse_enum(
            "architecture",
            s,
            &[("x86_64", Arch::X86_64), ("aarch64", Arch::Aarch64)],
        )
    }
}

impl FromStr for Accel {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        parse_enum(
            "accelerator",
            s,
            &[
                ("auto", Accel::Auto),
                ("kvm", Accel::Kvm),
                ("tcg", Accel::Tcg),
            ],
        )
    }
}

/// A VM template: everything but the disk and the identity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Template {
    /// Name.
    pub name: String,
    /// Display profile.
    pub profile: Profile,
    /// Guest architecture.
    pub arch: Arch,
    /// Virtual CPUs.
    pub cpus: u32,
    /// Memory in MiB.
    pub memory_mib: u32,
    /// Kernel to boot directly (absolute path), else the disk's boot loader.
    pub kernel: Option<PathBuf>,
    /// Initial ramdisk (absolute path); needs `kernel`.
    pub initrd: Option<PathBuf>,
    /// Kernel command line; needs `kernel`.
    pub append: Option<String>,
    /// Network policy.
    pub net: Net,
    /// Accelerator.
    pub accel: Accel,
}

/// Smallest memory a template may ask for.
pub const MIN_MEMORY_MIB: u32 = 16;
/// Largest number of vCPUs.
pub const MAX_CPUS: u32 = 255;

impl Template {
    /// Checks the values and makes file paths absolute. Names the first
    /// thing that is wrong.
    pub fn validate(mut self) -> Result<Self> {
        check_name("template", &self.name)?;
        if self.cpus == 0 || self.cpus > MAX_CPUS {
            return Err(Error::Invalid(format!(
                "cpus must be 1-{MAX_CPUS}, not {}",
                self.cpus
            )));
        }
        if self.memory_mib < MIN_MEMORY_MIB {
            return Err(Error::Invalid(format!(
                "memory must be at least {MIN_MEMORY_MIB} MiB, not {}",
                self.memory_mib
            )));
        }
        if self.kernel.is_none() && (self.initrd.is_some() || self.append.is_some()) {
            return Err(Error::Invalid("--initrd and --append need --kernel".into()));
        }
        self.kernel = self
            .kernel
            .map(|p| existing_file("kernel", &p))
            .transpose()?;
        self.initrd = self
            .initrd
            .map(|p| existing_file("initrd", &p))
            .transpose()?;
        if let Some(a) = &self.append {
            if a.contains('\n') {
                return Err(Error::Invalid("--append must be one line".into()));
            }
        }
        Ok(self)
    }
}

/// A file that must exist, made absolute.
pub(crate) fn existing_file(what: &str, p: &Path) -> Result<PathBuf> {
    match std::fs::metadata(p) {
        Ok(m) if m.is_file() => std::fs::canonicalize(p)
            .map_err(|e| Error::Invalid(format!("{what} {}: {e}", p.display()))),
        Ok(_) => Err(Error::Invalid(format!(
            "{what} {}: not a regular file",
            p.display()
        ))),
        Err(e) => Err(Error::Invalid(format!("{what} {}: {e}", p.display()))),
    }
}

/// Names of templates and VMs: 1-64 of `[A-Za-z0-9._-]`, not starting with `.` or `-`.
pub fn check_name(what: &str, name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with(['.', '-'])
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(Error::Invalid(format!(
            "bad {what} name {name:?}: use 1-64 letters, digits, '.', '_' or '-', not starting with '.' or '-'"
        )))
    }
}

/// A VM's disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "kind")]
pub enum Disk {
    /// An image file (raw or qcow2, detected at start).
    File {
        /// Absolute path.
        path: PathBuf,
    },
    /// An NBD export: `nbd://HOST:PORT/NAME` or `nbd+unix:///NAME?socket=PATH`.
    Nbd {
        /// The URI as given.
        uri: String,
    },
}

impl Disk {
    /// Parses a disk argument: an image path (must exist), or an NBD URI.
    pub fn parse(s: &str) -> Result<Disk> {
        if s.starts_with("nbd://") || s.starts_with("nbd+unix://") {
            nbd_target(s)?;
            return Ok(Disk::Nbd { uri: s.to_string() });
        }
        if let Some((scheme, _)) = s.split_once("://") {
            return Err(Error::Invalid(format!(
                "disk {s:?}: unknown URI scheme {scheme:?} (expected a file, nbd:// or nbd+unix://)"
            )));
        }
        Ok(Disk::File {
            path: existing_file("disk", Path::new(s))?,
        })
    }

    /// Checks that the disk can be opened now: the file exists, or the NBD
    /// server accepts a connection (within 5 s).
    pub fn check_reachable(&self) -> Result<()> {
        match self {
            Disk::File { path } => existing_file("disk", path).map(|_| ()),
            Disk::Nbd { uri } => {
                let t = std::time::Duration::from_secs(5);
                let r = match nbd_target(uri)? {
                    NbdTarget::Tcp(addr) => {
                        use std::net::ToSocketAddrs;
                        addr.to_socket_addrs()
                            .and_then(|mut a| {
                                a.next().ok_or_else(|| std::io::ErrorKind::NotFound.into())
                            })
                            .and_then(|a| std::net::TcpStream::connect_timeout(&a, t))
                            .map(|_| ())
                    }
                    NbdTarget::Unix(p) => std::os::unix::net::UnixStream::connect(&p).map(|_| ()),
                };
                r.map_err(|e| Error::Invalid(format!("disk {uri}: cannot connect: {e}")))
            }
        }
    }
}

impl fmt::Display for Disk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Disk::File { path } => write!(f, "{}", path.display()),
            Disk::Nbd { uri } => f.write_str(uri),
        }
    }
}

enum NbdTarget {
    Tcp(String),
    Unix(PathBuf),
}

fn nbd_target(uri: &str) -> Result<NbdTarget> {
    let bad = |why: &str| Error::Invalid(format!("disk {uri:?}: {why}"));
    if let Some(rest) = uri.strip_prefix("nbd://") {
        let hostport = rest.split('/').next().unwrap_or_default();
        if hostport.is_empty() {
            return Err(bad("expected nbd://HOST[:PORT]/NAME"));
        }
        let addr = if hostport
            .rsplit_once(':')
            .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
        {
            hostport.to_string()
        } else {
            format!("{hostport}:10809")
        };
        Ok(NbdTarget::Tcp(addr))
    } else if let Some(rest) = uri.strip_prefix("nbd+unix://") {
        let socket = rest
            .split_once('?')
            .and_then(|(_, q)| q.split('&').find_map(|kv| kv.strip_prefix("socket=")))
            .filter(|s| !s.is_empty())
            .ok_or_else(|| bad("expected nbd+unix:///NAME?socket=PATH"))?;
        Ok(NbdTarget::Unix(PathBuf::from(socket)))
    } else {
        Err(bad("not an NBD URI"))
    }
}

/// A MAC address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Mac(pub [u8; 6]);

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

impl FromStr for Mac {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let parts: Vec<&str> = s.split(':').collect();
        let mut b = [0u8; 6];
        if parts.len() != 6 {
            return Err(Error::Invalid(format!("bad MAC address {s:?}")));
        }
        for (i, p) in parts.iter().enumerate() {
            b[i] = u8::from_str_radix(p, 16)
                .map_err(|_| Error::Invalid(format!("bad MAC address {s:?}")))?;
        }
        Ok(Mac(b))
    }
}

impl Serialize for Mac {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Mac {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A random locally administered unicast MAC (first octet `x2`, `x6`, `xa`
/// or `xe`) that is not in `taken`.
pub fn new_mac(taken: &HashSet<Mac>) -> Mac {
    let mut rng = rand::rng();
    loop {
        let mut b: [u8; 6] = rng.random();
        b[0] = (b[0] & 0xfc) | 0x02; // unicast, locally administered
        let m = Mac(b);
        if !taken.contains(&m) {
            return m;
        }
    }
}

/// A random (version 4) UUID.
pub fn new_uuid() -> String {
    let mut b: [u8; 16] = rand::rng().random();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// Last known state of a VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum State {
    /// QEMU is running and answers QMP.
    Running,
    /// QEMU is not running.
    PoweredOff,
    /// QEMU's process exists but does not answer QMP.
    Unknown,
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            State::Running => "running",
            State::PoweredOff => "powered-off",
            State::Unknown => "unknown",
        })
    }
}

/// A VM definition and its last known state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vm {
    /// Name.
    pub name: String,
    /// Random UUID, given to QEMU (`-uuid`, SMBIOS).
    pub uuid: String,
    /// MAC address of its network card.
    pub mac: Mac,
    /// The template it runs.
    pub template: String,
    /// Its disk.
    pub disk: Disk,
    /// Creation time, ns since the epoch.
    pub created_ns: i64,
    /// Last known state.
    pub state: State,
    /// The current (or last) run.
    pub run: Option<crate::Run>,
    /// How the last run ended.
    pub last_exit: Option<crate::Exit>,
    /// Its network peripherals.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub peripherals: Vec<crate::Peripheral>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_are_local_unicast_and_avoid_taken_ones() {
        let mut taken = HashSet::new();
        for _ in 0..1000 {
            let m = new_mac(&taken);
            assert_eq!(m.0[0] & 1, 0, "multicast bit set in {m}");
            assert_eq!(m.0[0] & 2, 2, "not locally administered: {m}");
            assert!(taken.insert(m), "duplicate {m}");
            assert_eq!(m.to_string().parse::<Mac>().unwrap(), m);
        }
    }

    #[test]
    fn uuids_are_version_4() {
        let u = new_uuid();
        assert_eq!(u.len(), 36);
        assert_eq!(&u[14..15], "4");
        assert!(matches!(&u[19..20], "8" | "9" | "a" | "b"), "{u}");
        assert_ne!(u, new_uuid());
    }

    #[test]
    fn disks_parse_and_name_what_is_wrong() {
        assert!(matches!(
            Disk::parse("nbd+unix:///vm?socket=/run/x.sock").unwrap(),
            Disk::Nbd { .. }
        ));
        assert!(matches!(
            Disk::parse("nbd://127.0.0.1:10809/vm").unwrap(),
            Disk::Nbd { .. }
        ));
        let e = Disk::parse("/nonexistent/disk.qcow2")
            .unwrap_err()
            .to_string();
        assert!(e.contains("/nonexistent/disk.qcow2"), "{e}");
        let e = Disk::parse("nbd+unix:///vm").unwrap_err().to_string();
        assert!(e.contains("socket="), "{e}");
        let e = Disk::parse("iscsi://x/y").unwrap_err().to_string();
        assert!(e.contains("iscsi"), "{e}");
    }

    #[test]
    fn templates_reject_bad_values() {
        let t = Template {
            name: "t".into(),
            profile: Profile::Pc,
            arch: Arch::X86_64,
            cpus: 1,
            memory_mib: 0,
            kernel: None,
            initrd: None,
            append: None,
            net: Net::None,
            accel: Accel::Auto,
        };
        let e = t.clone().validate().unwrap_err().to_string();
        assert!(e.contains("memory"), "{e}");
        let e = Template {
            memory_mib: 256,
            kernel: Some("/nonexistent/vmlinuz".into()),
            ..t.clone()
        }
        .validate()
        .unwrap_err()
        .to_string();
        assert!(e.contains("kernel /nonexistent/vmlinuz"), "{e}");
        let e = Template {
            memory_mib: 256,
            cpus: 0,
            ..t.clone()
        }
        .validate()
        .unwrap_err()
        .to_string();
        assert!(e.contains("cpus"), "{e}");
        assert!(Template {
            memory_mib: 256,
            ..t
        }
        .validate()
        .is_ok());
    }
}
