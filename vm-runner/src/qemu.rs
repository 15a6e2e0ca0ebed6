//! The QEMU command line of a VM.

use std::io::Read;
use std::path::{Path, PathBuf};

use crate::error::{Error, IoContext, Result};
use crate::rundir::RunDir;
use crate::spec::{Arch, Disk, Net, Template, Vm};

/// The QEMU binary of `arch`, found on PATH.
pub fn binary(arch: Arch) -> Result<PathBuf> {
    let (name, package) = match arch {
        Arch::X86_64 => ("qemu-system-x86_64", "qemu-system-x86 qemu-utils"),
        Arch::Aarch64 => ("qemu-system-aarch64", "qemu-system-arm"),
    };
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .ok_or_else(|| Error::QemuMissing {
            binary: name.into(),
            package: package.into(),
        })
}

/// Escapes a value for QEMU's `key=value,...` option syntax (commas double).
fn opt(v: &str) -> String {
    v.replace(',', ",,")
}

fn path_opt(p: &Path) -> String {
    opt(&p.to_string_lossy())
}

/// `qcow2` if the file starts with the qcow2 magic, else `raw`.
fn file_format(path: &Path) -> Result<&'static str> {
    let mut magic = [0u8; 4];
    let mut f = std::fs::File::open(path).at(path)?;
    let n = f.read(&mut magic).at(path)?;
    Ok(if n == 4 && &magic == b"QFI\xfb" {
        "qcow2"
    } else {
        "raw"
    })
}

/// What a command line is built from.
pub struct Plan<'a> {
    /// The VM.
    pub vm: &'a Vm,
    /// Its template.
    pub template: &'a Template,
    /// Its runtime directory.
    pub dir: &'a RunDir,
    /// `kvm` or `tcg`.
    pub accel: &'a str,
    /// The command that relays one `allow:` connection, as a program and
    /// its first arguments; the counters file, host and port are appended.
    /// Needed for `allow:` networking only.
    pub relay: &'a [String],
}

/// The arguments after the binary.
pub fn arguments(p: &Plan<'_>) -> Result<Vec<String>> {
    let t = p.template;
    let d = p.dir;
    let (w, h) = t.profile.geometry();
    let mut a: Vec<String> = Vec::new();
    let mut push = |items: &[&str]| a.extend(items.iter().map(|s| s.to_string()));
    push(&[
        "-name",
        &format!(
            "guest={},process=lamina-vm:{}",
            opt(&p.vm.name),
            opt(&p.vm.name)
        ),
    ]);
    push(&["-uuid", &p.vm.uuid]);
    push(&["-nodefaults", "-no-user-config"]);
    match t.arch {
        Arch::X86_64 => {
            push(&["-machine", &format!("q35,accel={}", p.accel)]);
            if p.accel == "kvm" {
                push(&["-cpu", "host"]);
            }
            // The std VGA with an EDID whose preferred mode is the profile's.
            push(&["-device", &format!("VGA,xres={w},yres={h},edid=on")]);
        }
        Arch::Aarch64 => {
            push(&["-machine", &format!("virt,accel={}", p.accel)]);
            // Under TCG, `max` with QEMU's cheap pointer-authentication hash:
            // the same features, but the fixture guest boots ~3x faster than
            // with `max`'s default (architected QARMA) pauth emulation.
            push(&[
                "-cpu",
                if p.accel == "kvm" {
                    "host"
                } else {
                    "max,pauth-impdef=on"
                },
            ]);
            push(&["-device", &format!("virtio-gpu-pci,xres={w},yres={h}")]);
            push(&["-device", "virtio-keyboard-pci"]);
        }
    }
    // An absolute pointer, so a VNC client's pointer lines up.
    push(&["-device", "virtio-tablet-pci"]);
    push(&["-smp", &t.cpus.to_string(), "-m", &t.memory_mib.to_string()]);
    push(&["-display", "none"]);
    push(&["-vnc", &format!("unix:{}", path_opt(&d.vnc()))]);
    push(&[
        "-chardev",
        &format!(
            "socket,id=serial0,path={},server=on,wait=off,logfile={},logappend=on",
            path_opt(&d.console_sock()),
            path_opt(&d.console_log())
        ),
    ]);
    push(&["-serial", "chardev:serial0"]);
    for (id, sock) in [("qmp", d.qmp()), ("watch", d.watch())] {
        push(&[
            "-chardev",
            &format!("socket,id={id},path={},server=on,wait=off", path_opt(&sock)),
        ]);
        push(&["-mon", &format!("chardev={id},mode=control")]);
    }
    let (file, format) = match &p.vm.disk {
        Disk::File { path } => (path_opt(path), file_format(path)?),
        Disk::Nbd { uri } => (opt(uri), "raw"),
    };
    push(&[
        "-drive",
        &format!("file={file},format={format},if=none,id=disk0,cache=writeback,discard=unmap"),
    ]);
    push(&["-device", "virtio-blk-pci,drive=disk0,bootindex=1"]);
    match &t.net {
        Net::None => {}
        Net::User => push(&["-netdev", "user,id=net0"]),
        Net::Allow(dests) => {
            let counters = d.net_counters();
            let mut spec = "user,id=net0,restrict=on".to_string();
            for (i, dest) in dests.iter().enumerate() {
                let mut cmd: Vec<String> = p.relay.to_vec();
                if cmd.is_empty() {
                    return Err(Error::Invalid(
                        "allow: networking needs a relay command".into(),
                    ));
                }
                cmd.push(counters.to_string_lossy().into_owned());
                cmd.push(dest.host.clone());
                cmd.push(dest.port.to_string());
                // QEMU's slirp splits the command at spaces, without quoting.
                if let Some(bad) = cmd.iter().find(|c| c.contains(char::is_whitespace)) {
                    return Err(Error::Invalid(format!(
                        "allow: networking cannot run its relay from a path with spaces: {bad:?}"
                    )));
                }
                spec.push_str(&format!(
                    ",guestfwd=tcp:{}:{}-cmd:{}",
                    Net::guest_addr(i),
                    dest.port,
                    opt(&cmd.join(" "))
                ));
            }
            push(&["-netdev", &spec]);
        }
    }
    if t.net != Net::None {
        push(&[
            "-device",
            &format!("virtio-net-pci,netdev=net0,mac={}", p.vm.mac),
        ]);
    }
    // Network peripherals, outside the network card.
    let periph = crate::peripheral::qemu_args(t.arch, &p.vm.peripherals, d)?;
    push(&periph.iter().map(String::as_str).collect::<Vec<_>>());
    if let Some(k) = &t.kernel {
        push(&["-kernel", &k.to_string_lossy()]);
    }
    if let Some(i) = &t.initrd {
        push(&["-initrd", &i.to_string_lossy()]);
    }
    if let Some(ap) = &t.append {
        push(&["-append", ap]);
    }
    // Exit on guest reboot as on power-off; a VM is restarted by `vm start`.
    push(&["-no-reboot"]);
    Ok(a)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{Accel, Mac, NetDest, Profile, State};

    fn vm(disk: Disk) -> Vm {
        Vm {
            name: "v,1".into(),
            uuid: "u".into(),
            mac: Mac([2, 0, 0, 0, 0, 1]),
            template: "t".into(),
            disk,
            created_ns: 0,
            state: State::PoweredOff,
            run: None,
            last_exit: None,
            peripherals: Vec::new(),
        }
    }

    fn template(profile: Profile, net: Net) -> Template {
        Template {
            name: "t".into(),
            profile,
            arch: Arch::X86_64,
            cpus: 2,
            memory_mib: 256,
            kernel: None,
            initrd: None,
            append: None,
            net,
            accel: Accel::Auto,
        }
    }

    #[test]
    fn command_line_has_profile_geometry_sockets_and_policy() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = RunDir::create(tmp.path()).unwrap();
        let net = Net::Allow(vec![NetDest {
            host: "127.0.0.1".into(),
            port: 8080,
        }]);
        let t = template(Profile::Phone, net);
        let v = vm(Disk::Nbd {
            uri: "nbd+unix:///d?socket=/s".into(),
        });
        let relay = vec!["/usr/bin/lamina".to_string(), "vm".into(), "relay".into()];
        let a = arguments(&Plan {
            vm: &v,
            template: &t,
            dir: &dir,
            accel: "tcg",
            relay: &relay,
        })
        .unwrap()
        .join(" ");
        assert!(a.contains("VGA,xres=720,yres=1280"), "{a}");
        assert!(a.contains("guest=v,,1"), "{a}");
        assert!(
            a.contains("restrict=on,guestfwd=tcp:10.0.2.100:8080-cmd:/usr/bin/lamina vm relay"),
            "{a}"
        );
        assert!(a.contains("file=nbd+unix:///d?socket=/s,format=raw"), "{a}");
        assert!(a.contains("mac=02:00:00:00:00:01"), "{a}");
        assert!(
            a.contains(&format!("-vnc unix:{}", dir.vnc().display())),
            "{a}"
        );
    }

    #[test]
    fn qcow2_files_are_detected_and_no_network_means_no_card() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = RunDir::create(&tmp.path().join("r")).unwrap();
        let img = tmp.path().join("d.img");
        std::fs::write(&img, b"QFI\xfb\0\0\0\x03").unwrap();
        let v = vm(Disk::File { path: img });
        let t = template(Profile::Pc, Net::None);
        let a = arguments(&Plan {
            vm: &v,
            template: &t,
            dir: &dir,
            accel: "tcg",
            relay: &[],
        })
        .unwrap()
        .join(" ");
        assert!(a.contains("format=qcow2"), "{a}");
        assert!(a.contains("VGA,xres=1280,yres=800"), "{a}");
        assert!(!a.contains("netdev"), "{a}");
    }
}
