use std::io::{BufRead, BufReader, Write};
use std::time::{Duration, Instant};

use super::*;

fn periph(name: &str, kind: PeripheralKind, slot: u32) -> Peripheral {
    Peripheral {
        name: name.into(),
        kind,
        link: Link::Connect {
            host: "127.0.0.1".into(),
            port: 9100,
        },
        tls: None,
        slot,
    }
}

#[test]
fn links_parse_and_name_what_is_wrong() {
    assert_eq!(
        Link::parse(Some("tcp:printer.lan:9100"), None).unwrap(),
        Link::Connect {
            host: "printer.lan".into(),
            port: 9100
        }
    );
    let l = Link::parse(None, Some("tcp:[::1]:7000")).unwrap();
    assert_eq!(l.endpoint(), "tcp:[::1]:7000");
    assert_eq!(l.to_string(), "listen tcp:[::1]:7000");
    for (c, why) in [
        ("udp:h:1", "only tcp:"),
        ("tcp:h", "no port"),
        ("tcp:h:99999", "bad port"),
        ("tcp:h:0", "port 0"),
        ("tcp::80", "bad host"),
    ] {
        let e = Link::parse(Some(c), None).unwrap_err().to_string();
        assert!(e.contains(why) && e.contains(c), "{c}: {e}");
    }
    let e = Link::parse(Some("tcp:a:1"), Some("tcp:b:2"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("exactly one"), "{e}");
    let e = "scanner".parse::<PeripheralKind>().unwrap_err().to_string();
    assert!(e.contains("serial, printer, usb"), "{e}");
}

#[test]
fn tls_needs_the_files_its_direction_uses() {
    let tmp = tempfile::tempdir().unwrap();
    let mut p = periph("p", PeripheralKind::Serial, 0);
    p.tls = Some(LinkTls {
        ca: None,
        cert: None,
        key: None,
    });
    let e = p.clone().validate().unwrap_err().to_string();
    assert!(e.contains("--tls-ca"), "{e}");
    let missing = tmp.path().join("ca.pem");
    p.tls = Some(LinkTls {
        ca: Some(missing.clone()),
        cert: None,
        key: None,
    });
    let e = p.clone().validate().unwrap_err().to_string();
    assert!(e.contains(&missing.display().to_string()), "{e}");
    std::fs::write(&missing, "not a certificate\n").unwrap();
    let e = p.clone().validate().unwrap_err().to_string();
    assert!(e.contains("no PEM certificate"), "{e}");
    p.link = Link::Listen {
        addr: "0.0.0.0".into(),
        port: 7000,
    };
    let e = p.validate().unwrap_err().to_string();
    assert!(e.contains("--tls-cert and --tls-key"), "{e}");
}

#[test]
fn x86_ports_are_numbered_by_slot_and_usb_gets_a_controller() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = RunDir::create(tmp.path()).unwrap();
    let ps = vec![
        periph("b", PeripheralKind::Serial, 4),
        periph("lp", PeripheralKind::Printer, 2),
        periph("a", PeripheralKind::Serial, 1),
        periph("key", PeripheralKind::Usb, 3),
    ];
    assert_eq!(
        guest_devices(Arch::X86_64, &ps),
        ["ttyS2", "lp0", "ttyS1", "usb"]
    );
    let a = qemu_args(Arch::X86_64, &ps, &dir).unwrap().join(" ");
    assert!(
        a.contains("isa-serial,chardev=per1,id=dev-per1,index=1"),
        "{a}"
    );
    assert!(
        a.contains("isa-serial,chardev=per4,id=dev-per4,index=2"),
        "{a}"
    );
    assert!(
        a.contains("isa-parallel,chardev=per2,id=dev-per2,index=0"),
        "{a}"
    );
    assert!(a.contains("-device qemu-xhci,id=perusb"), "{a}");
    assert!(
        a.contains("usb-redir,chardev=per3,id=dev-per3,bus=perusb.0"),
        "{a}"
    );
    let sock = dir.file("p3.sock");
    assert!(
        a.contains(&format!(
            "socket,id=per3,path={},server=on,wait=off",
            sock.display()
        )),
        "{a}"
    );
    let arm = qemu_args(Arch::Aarch64, &ps, &dir).unwrap().join(" ");
    assert!(arm.contains("virtio-serial-pci,id=perser"), "{arm}");
    assert!(arm.contains("virtserialport,chardev=per2,id=dev-per2,bus=perser.0,name=lamina.lp"));
    let four: Vec<_> = (0..4)
        .map(|i| periph(&format!("s{i}"), PeripheralKind::Serial, i))
        .collect();
    let e = qemu_args(Arch::X86_64, &four, &dir)
        .unwrap_err()
        .to_string();
    assert!(e.contains("at most 3 serial"), "{e}");
    assert!(qemu_args(Arch::Aarch64, &four, &dir).is_ok());
}

/// Waits until `dir`'s link `name` is in `state`.
fn wait_state(dir: &RunDir, name: &str, state: &str) -> LinkState {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let s = read_states(dir).into_iter().find(|s| s.name == name);
        if let Some(s) = s.filter(|s| s.state == state) {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "{name} never {state}: {:?}",
            read_states(dir)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A peripheral of `kind` whose adapter runs in a scratch run dir, linked
/// to a port nobody listens on yet, with QEMU's side (the chardev's Unix
/// socket server) played by a listener.
struct Rig {
    _tmp: tempfile::TempDir,
    dir: RunDir,
    port: u16,
    guest: std::os::unix::net::UnixListener,
    _adapters: adapter::Adapters,
}

fn rig(name: &str, kind: PeripheralKind) -> Rig {
    let tmp = tempfile::tempdir().unwrap();
    let dir = RunDir::create(tmp.path()).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut p = periph(name, kind, 0);
    p.link = Link::Connect {
        host: "127.0.0.1".into(),
        port,
    };
    let guest = std::os::unix::net::UnixListener::bind(p.guest_socket(&dir)).unwrap();
    adapter::write_wanted(&dir, std::slice::from_ref(&p)).unwrap();
    let adapters = adapter::start(&dir).unwrap();
    Rig {
        _tmp: tmp,
        dir,
        port,
        guest,
        _adapters: adapters,
    }
}

#[test]
fn the_adapter_joins_a_server_to_the_device_counts_and_reconnects() {
    let Rig {
        dir, port, guest, ..
    } = &rig("tty", PeripheralKind::Serial);
    let (dir, port) = (dir, *port);
    let s = wait_state(dir, "tty", "retrying");
    assert!(
        s.last_error
            .as_deref()
            .unwrap_or_default()
            .contains("refused"),
        "{s:?}"
    );

    let server = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
    let (mut net, _) = server.accept().unwrap();
    let (mut dev, _) = guest.accept().unwrap();
    wait_state(dir, "tty", "connected");
    dev.write_all(b"from the guest\n").unwrap();
    let mut line = String::new();
    BufReader::new(&mut net).read_line(&mut line).unwrap();
    assert_eq!(line, "from the guest\n");
    net.write_all(b"to the guest\n").unwrap();
    let mut line = String::new();
    BufReader::new(&mut dev).read_line(&mut line).unwrap();
    assert_eq!(line, "to the guest\n");

    // The server goes away: the device is let go, and joined again when the
    // server is back.
    drop(net);
    let mut rest = Vec::new();
    std::io::Read::read_to_end(&mut dev, &mut rest).unwrap();
    let (net, _) = server.accept().unwrap();
    let (_dev, _) = guest.accept().unwrap();
    let s = wait_state(dir, "tty", "connected");
    assert_eq!(
        (s.connections, s.to_guest, s.from_guest),
        (2, 13, 15),
        "{s:?}"
    );
    drop(net);

    // Taken out of the wanted links: cut, and gone from the states.
    adapter::write_wanted(dir, &[]).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !read_states(dir).is_empty() {
        assert!(Instant::now() < deadline, "{:?}", read_states(dir));
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_printer_spools_while_its_server_is_down_and_sends_each_job_in_one_connection() {
    let Rig {
        dir, port, guest, ..
    } = &rig("lp", PeripheralKind::Printer);
    let (dir, port) = (dir, *port);
    // The device is read whether the server is up or not.
    let (mut dev, _) = guest.accept().unwrap();
    let job = b"%!PS job one\n\x0c";
    dev.write_all(job).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let s = loop {
        let s = read_states(dir).into_iter().find(|s| s.name == "lp");
        if let Some(s) = s.filter(|s| s.state == "retrying" && s.queued == job.len() as u64) {
            break s;
        }
        assert!(Instant::now() < deadline, "{:?}", read_states(dir));
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(s.last_error.unwrap().contains("refused"));

    // The server comes up: the whole job in one connection, which ends
    // when the guest has been silent for a while.
    let server = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
    let (mut c, _) = server.accept().unwrap();
    c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut got = Vec::new();
    std::io::Read::read_to_end(&mut c, &mut got).unwrap();
    assert_eq!(got, job);
    let s = wait_state(dir, "lp", "idle");
    assert_eq!(
        (s.from_guest, s.queued, s.connections),
        (job.len() as u64, 0, 1),
        "{s:?}"
    );

    // The next job: a connection of its own.
    dev.write_all(b"job two\x0c").unwrap();
    let (mut c, _) = server.accept().unwrap();
    c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut got = Vec::new();
    std::io::Read::read_to_end(&mut c, &mut got).unwrap();
    assert_eq!(got, b"job two\x0c");
}

#[test]
fn links_notice_a_peer_that_vanishes() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = tokio::net::TcpStream::connect(l.local_addr().unwrap())
            .await
            .unwrap();
        adapter::tune(&c);
        let s = socket2::SockRef::from(&c);
        assert!(s.keepalive().unwrap());
        assert_eq!(s.tcp_keepalive_time().unwrap(), Duration::from_secs(30));
        assert_eq!(s.tcp_keepalive_interval().unwrap(), Duration::from_secs(10));
        assert_eq!(s.tcp_keepalive_retries().unwrap(), 3);
        assert_eq!(s.tcp_user_timeout().unwrap(), Some(Duration::from_secs(60)));
        assert!(c.nodelay().unwrap());
    });
}
