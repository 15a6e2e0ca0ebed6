//! Network peripherals (issue #14) against real QEMU under TCG, with the
//! fixture guest and **no network card** (`--net none`): a serial port
//! whose server is down at start, comes up, goes away and comes back; a
//! printer whose server is down at start receiving the guest's raw job
//! from the spool once it is up; a TLS link that refuses clients
//! without the right certificate (openssl s_client as the peer); a
//! peripheral that already serves a VM refused to another; a usb-redir
//! device hot-plugged into a running VM and reaching its usbredir server;
//! bad input.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::vms::*;
use common::*;
use serde_json::Value;

/// A port nobody listens on (yet).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Accepts one connection within `secs`.
fn accept_within(l: &TcpListener, secs: u64) -> TcpStream {
    l.set_nonblocking(true).unwrap();
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        match l.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
                return s;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                assert!(Instant::now() < deadline, "no connection within {secs} s");
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => panic!("accept: {e}"),
        }
    }
}

/// Reads lines until one is a whole `LAMINA-GUEST-SERIAL-OUT N` (the first
/// may be the tail of a line the guest was writing when the link came up).
fn serial_out_line(r: &mut impl BufRead) -> String {
    for _ in 0..10 {
        let mut line = String::new();
        assert!(r.read_line(&mut line).unwrap() > 0, "the link closed");
        let l = line.trim_end();
        if l.strip_prefix("LAMINA-GUEST-SERIAL-OUT ")
            .is_some_and(|n| n.parse::<u64>().is_ok())
        {
            return l.to_string();
        }
    }
    panic!("no LAMINA-GUEST-SERIAL-OUT line in 10 lines");
}

/// `vm peripheral add VM NAME --kind KIND --connect tcp:127.0.0.1:PORT`;
/// its output.
fn add_connect(env: &Vms, vm: &str, name: &str, kind: &str, port: u16) -> String {
    env.ok(&[
        "vm",
        "peripheral",
        "add",
        vm,
        name,
        "--kind",
        kind,
        "--connect",
        &format!("tcp:127.0.0.1:{port}"),
    ])
}

/// The row of peripheral `name` in `vm peripheral ls VM`.
fn link(env: &Vms, vm: &str, name: &str) -> Value {
    let rows = env.json(&["vm", "peripheral", "ls", vm]);
    rows.as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == name)
        .unwrap_or_else(|| panic!("no peripheral {name} in {rows}"))
        .clone()
}

/// Waits until `cond` holds for the row of `name`.
fn wait_link(env: &Vms, vm: &str, name: &str, what: &str, cond: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let r = link(env, vm, name);
        if cond(&r) {
            return r;
        }
        assert!(Instant::now() < deadline, "{name}: never {what}: {r}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A print server (port 9100 style): keeps each connection's bytes, a job.
struct PrintServer {
    jobs: Arc<Mutex<Vec<Vec<u8>>>>,
}

impl PrintServer {
    fn start(port: u16) -> PrintServer {
        let l = TcpListener::bind(("127.0.0.1", port)).unwrap();
        let jobs = Arc::new(Mutex::new(Vec::new()));
        let j = jobs.clone();
        std::thread::spawn(move || {
            for c in l.incoming() {
                let Ok(mut c) = c else { return };
                let j = j.clone();
                std::thread::spawn(move || {
                    let mut job = Vec::new();
                    if c.read_to_end(&mut job).is_ok() {
                        j.lock().unwrap().push(job);
                    }
                });
            }
        });
        PrintServer { jobs }
    }

    /// The first job whose connection has ended.
    fn wait_job(&self) -> Vec<u8> {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Some(j) = self.jobs.lock().unwrap().first() {
                return j.clone();
            }
            assert!(Instant::now() < deadline, "no finished print job");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

const JOB: &[u8] =
    b"LAMINA-PRINT-JOB begin\npage 1 of the fixture guest\nLAMINA-PRINT-JOB end\n\x0c";

#[test]
fn serial_and_printer_reach_their_servers_without_a_network_card() {
    let Some(env) = Vms::new() else { return };
    env.template("t", "pc", "none", "lamina.serial=ttyS1 lamina.print=lp0");
    env.vm_on_overlay("v", "t");
    let (tport, lport) = (free_port(), free_port());
    add_connect(&env, "v", "tty", "serial", tport);
    let out = add_connect(&env, "v", "lp", "printer", lport);
    assert!(out.contains("as lp0"), "{out}");
    env.ok(&["vm", "start", "v"]);
    // No network card: the peripherals go around the guest's network.
    let show = env.show("v");
    let dir = Path::new(show["paths"]["dir"].as_str().unwrap());
    let launch: Value =
        serde_json::from_slice(&std::fs::read(dir.join("launch.json")).unwrap()).unwrap();
    let args = launch["args"].to_string();
    assert!(!args.contains("netdev") && !args.contains("-nic"), "{args}");
    assert!(args.contains("isa-serial,chardev=per0"), "{args}");

    // The serial server is down at start: the link says so, the VM boots.
    let r = wait_link(&env, "v", "tty", "retrying", |r| r["state"] == "retrying");
    let err = r["last_error"].as_str().unwrap_or_default();
    assert!(err.contains(&format!("127.0.0.1:{tport}")), "{r}");
    env.wait_console("v", "LAMINA-GUEST-IDLE", 300);

    // The print server is down too: the guest's job waits in the spool,
    // and reaches the server, byte for byte and in a connection of its
    // own, once it is up.
    let r = wait_link(&env, "v", "lp", "spooled", |r| {
        r["state"] == "retrying" && r["queued_bytes"] == JOB.len()
    });
    assert!(
        r["last_error"]
            .as_str()
            .unwrap()
            .contains(&format!("127.0.0.1:{lport}")),
        "{r}"
    );
    let printer = PrintServer::start(lport);
    let job = printer.wait_job();
    assert_eq!(job, JOB, "{:?}", String::from_utf8_lossy(&job));
    wait_link(&env, "v", "lp", "idle", |r| {
        r["state"] == "idle" && r["queued_bytes"] == 0
    });

    // The server comes up: the guest's line arrives; a line sent back is
    // echoed on the guest's console.
    let server = TcpListener::bind(("127.0.0.1", tport)).unwrap();
    let c = accept_within(&server, 60);
    let mut r = BufReader::new(c.try_clone().unwrap());
    serial_out_line(&mut r);
    (&c).write_all(b"hello from the network\n").unwrap();
    env.wait_console("v", "LAMINA-GUEST-SERIAL-IN hello from the network", 120);
    wait_link(&env, "v", "tty", "connected", |r| r["state"] == "connected");

    // It goes away mid-session: the state shows it, and the link comes
    // back when the server does.
    drop(r);
    drop(c);
    let r = wait_link(&env, "v", "tty", "retrying", |r| r["state"] == "retrying");
    assert!(
        r["last_error"]
            .as_str()
            .unwrap_or_default()
            .contains("closed"),
        "{r}"
    );
    let c = accept_within(&server, 60);
    let mut r = BufReader::new(c.try_clone().unwrap());
    serial_out_line(&mut r);
    (&c).write_all(b"back again\n").unwrap();
    env.wait_console("v", "LAMINA-GUEST-SERIAL-IN back again", 120);

    // Bytes each way, per peripheral.
    let st = env.json(&["vm", "stats", "v"]);
    let row = |n: &str| {
        st["peripherals"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["name"] == n)
            .unwrap()
            .clone()
    };
    let tty = row("tty");
    assert_eq!(tty["device"], "ttyS1", "{tty}");
    assert_eq!(tty["connections"], 2, "{tty}");
    assert_eq!(
        tty["to_guest_bytes"].as_u64(),
        Some(("hello from the network\n".len() + "back again\n".len()) as u64),
        "{tty}"
    );
    assert!(tty["from_guest_bytes"].as_u64().unwrap() > 40, "{tty}");
    let lp = row("lp");
    assert_eq!(
        lp["from_guest_bytes"].as_u64(),
        Some(JOB.len() as u64),
        "{lp}"
    );
    assert_eq!(lp["to_guest_bytes"], 0, "{lp}");
    stop_ok(&env, "v");
    let r = link(&env, "v", "tty");
    assert_eq!(r["state"], "off", "{r}");
}

/// A CA and certificates made by openssl: `ca`, `server` (127.0.0.1),
/// `client`, and `rogue` (a client certificate of another CA).
fn certs(dir: &Path) {
    let sh = format!(
        r#"set -e
cd {dir}
mk_ca() {{ openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
  -subj "/CN=$1" -keyout $1.key -out $1.pem 2>/dev/null; }}
mk() {{ # mk NAME CA EXT
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=$1" \
    -keyout $1.key -out $1.csr 2>/dev/null
  printf '%s\n' "$3" > $1.ext
  openssl x509 -req -in $1.csr -CA $2.pem -CAkey $2.key -CAcreateserial -days 2 \
    -extfile $1.ext -out $1.pem 2>/dev/null
}}
mk_ca ca
mk_ca rogue-ca
mk server ca "subjectAltName=IP:127.0.0.1,DNS:localhost"
mk client ca "extendedKeyUsage=clientAuth"
mk rogue rogue-ca "extendedKeyUsage=clientAuth"
mk rogue-server rogue-ca "subjectAltName=IP:127.0.0.1"
"#,
        dir = dir.display()
    );
    let st = Command::new("bash").arg("-c").arg(sh).status().unwrap();
    assert!(st.success(), "openssl certificates");
}

/// `openssl s_client` to `port` with the client certificate `cert` (or
/// none), its stdin a pipe.
fn s_client(dir: &Path, port: u16, cert: Option<&str>) -> std::process::Child {
    let mut c = Command::new("timeout");
    c.args([
        "60",
        "openssl",
        "s_client",
        "-quiet",
        "-verify_return_error",
    ])
    .arg("-connect")
    .arg(format!("127.0.0.1:{port}"))
    .arg("-CAfile")
    .arg(dir.join("ca.pem"));
    if let Some(n) = cert {
        c.arg("-cert")
            .arg(dir.join(format!("{n}.pem")))
            .arg("-key")
            .arg(dir.join(format!("{n}.key")));
    }
    c.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

#[test]
fn tls_links_refuse_wrong_certificates_and_a_peripheral_serves_one_vm() {
    let Some(env) = Vms::new() else { return };
    if !require(
        Command::new("openssl").arg("version").output().is_ok(),
        "openssl",
    ) {
        return;
    }
    let pki = env.path("pki");
    std::fs::create_dir_all(&pki).unwrap();
    certs(&pki);
    let f = |n: &str| pki.join(n).to_str().unwrap().to_string();
    env.template("t", "pc", "none", "lamina.serial=ttyS1 lamina.print=lp0");
    env.vm_on_overlay("a", "t");
    env.vm_on_overlay("b", "t");
    let port = free_port();
    let listen = format!("tcp:127.0.0.1:{port}");
    let add = |vm: &str, name: &str, extra: &[&str]| {
        let mut a = vec!["vm", "peripheral", "add", vm, name, "--kind", "serial"];
        a.extend_from_slice(extra);
        env.run(&a)
    };

    // Bad input: one clear line each, nothing added.
    let (ca, cert, key) = (f("ca.pem"), f("server.pem"), f("server.key"));
    let missing = f("nope.pem");
    for (extra, why) in [
        (vec!["--connect", "udp:127.0.0.1:9"], "only tcp:"),
        (vec!["--connect", "tcp:127.0.0.1"], "no port"),
        (
            vec!["--connect", "tcp:h:1", "--tls-ca", &missing],
            "nope.pem",
        ),
        (
            vec![
                "--connect",
                "tcp:h:1",
                "--tls-cert",
                &cert,
                "--tls-key",
                &key,
            ],
            "needs --tls-ca",
        ),
        (
            vec!["--listen", &listen, "--tls-ca", &ca],
            "needs --tls-cert and --tls-key",
        ),
        (
            vec!["--listen", &listen, "--tls-cert", &key, "--tls-key", &key],
            "no PEM certificate",
        ),
        (
            vec![
                "--listen",
                &listen,
                "--tls-cert",
                &f("client.pem"),
                "--tls-key",
                &key,
            ],
            "do not fit",
        ),
    ] {
        let o = add("a", "tty", &extra);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{extra:?}: {err}");
        assert!(err.contains(why), "{extra:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
    }
    let (code, err) = env.fail(&[
        "vm",
        "peripheral",
        "add",
        "a",
        "tty",
        "--kind",
        "scanner",
        "--listen",
        &listen,
    ]);
    assert!(code == 2 && err.contains("serial, printer, usb"), "{err}");
    let (code, err) = env.fail(&[
        "vm",
        "peripheral",
        "add",
        "nosuch",
        "tty",
        "--kind",
        "serial",
        "--listen",
        &listen,
    ]);
    assert!(code != 0 && err.contains("nosuch"), "{err}");
    assert_eq!(env.json(&["vm", "peripheral", "ls"]), Value::Array(vec![]));

    // TLS, listening, client certificates required.
    let o = add(
        "a",
        "tty",
        &[
            "--listen",
            &listen,
            "--tls-ca",
            &ca,
            "--tls-cert",
            &cert,
            "--tls-key",
            &key,
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    // TLS, connecting: a printer whose server must show a certificate of
    // the CA, and which shows its own client certificate.
    let pport = free_port();
    env.ok(&[
        "vm",
        "peripheral",
        "add",
        "a",
        "lp",
        "--kind",
        "printer",
        "--connect",
        &format!("tcp:127.0.0.1:{pport}"),
        "--tls-ca",
        &ca,
        "--tls-cert",
        &f("client.pem"),
        "--tls-key",
        &f("client.key"),
    ]);

    // One peripheral serves one VM: by name, and by endpoint.
    let (code, err) = env.fail(&[
        "vm",
        "peripheral",
        "add",
        "b",
        "tty",
        "--kind",
        "serial",
        "--listen",
        &format!("tcp:127.0.0.1:{}", free_port()),
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("peripheral tty belongs to VM a"), "{err}");
    let (code, err) = env.fail(&[
        "vm",
        "peripheral",
        "add",
        "b",
        "other",
        "--kind",
        "serial",
        "--listen",
        &listen,
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains(&format!("{listen} is peripheral tty of VM a")),
        "{err}"
    );
    assert!(env.show("b")["vm"]["peripherals"].is_null());

    // The printer's end first: a server of another CA is not trusted...
    let s_server = |cert: &str, out: &Path| {
        Command::new("timeout")
            .args([
                "120", "openssl", "s_server", "-quiet", "-naccept", "1", "-Verify", "1",
            ])
            .arg("-accept")
            .arg(pport.to_string())
            .arg("-CAfile")
            .arg(pki.join("ca.pem"))
            .arg("-cert")
            .arg(pki.join(format!("{cert}.pem")))
            .arg("-key")
            .arg(pki.join(format!("{cert}.key")))
            .stdin(Stdio::piped())
            .stdout(std::fs::File::create(out).unwrap())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    };
    let mut rogue = s_server("rogue-server", &env.path("rogue.out"));
    env.ok(&["vm", "start", "a"]);
    wait_link(&env, "a", "tty", "listening", |r| r["state"] == "listening");
    let r = wait_link(&env, "a", "lp", "refusing the rogue server", |r| {
        r["state"] == "retrying"
            && r["last_error"]
                .as_str()
                .unwrap_or_default()
                .contains("certificate")
    });
    assert!(
        r["queued_bytes"].as_u64().unwrap_or(0) <= JOB.len() as u64,
        "{r}"
    );
    let _ = rogue.kill();
    let _ = rogue.wait();
    // ... the right one gets the job, over TLS, with the client certificate
    // it asked for (-Verify).
    let good_out = env.path("good.out");
    let mut good = s_server("server", &good_out);
    let deadline = Instant::now() + Duration::from_secs(120);
    while !std::fs::read(&good_out)
        .unwrap_or_default()
        .windows(JOB.len())
        .any(|w| w == JOB)
    {
        assert!(
            Instant::now() < deadline,
            "s_server got {:?}",
            std::fs::read_to_string(&good_out)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let _ = good.kill();
    let _ = good.wait();

    // Without a client certificate, and with one of another CA: refused.
    for (n, cert) in [(1, None), (2, Some("rogue"))] {
        let mut c = s_client(&pki, port, cert);
        drop(c.stdin.take());
        let mut got = String::new();
        c.stdout.take().unwrap().read_to_string(&mut got).unwrap();
        c.wait().unwrap();
        assert!(!got.contains("LAMINA-GUEST"), "{cert:?} got {got:?}");
        let r = wait_link(&env, "a", "tty", "refused", |r| r["refused"] == n);
        let e = r["last_error"].as_str().unwrap_or_default();
        assert!(e.contains("refused 127.0.0.1") && e.contains("TLS"), "{r}");
    }

    // The right certificate: the guest's lines come through, and a line
    // sent goes to the guest.
    let mut c = s_client(&pki, port, Some("client"));
    let mut r = BufReader::new(c.stdout.take().unwrap());
    env.wait_console("a", "LAMINA-GUEST-IDLE", 300);
    serial_out_line(&mut r);
    // A second station while the first is connected: refused.
    let mut second = s_client(&pki, port, Some("client"));
    drop(second.stdin.take());
    let mut got = String::new();
    second
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut got)
        .unwrap();
    let _ = second.wait();
    assert!(!got.contains("LAMINA-GUEST"), "{got:?}");
    let row = wait_link(&env, "a", "tty", "refused", |r| r["refused"] == 3);
    assert!(
        row["last_error"]
            .as_str()
            .unwrap_or_default()
            .contains("in use by"),
        "{row}"
    );
    c.stdin
        .as_mut()
        .unwrap()
        .write_all(b"hello over tls\n")
        .unwrap();
    env.wait_console("a", "LAMINA-GUEST-SERIAL-IN hello over tls", 120);
    let row = link(&env, "a", "tty");
    assert_eq!(row["state"], "connected", "{row}");
    assert_eq!(row["connections"], 1, "{row}");
    assert_eq!(row["tls"], true, "{row}");
    drop(c.stdin.take());
    let _ = c.kill();
    let _ = c.wait();
    stop_ok(&env, "a");
}

#[test]
fn usb_redir_is_hot_plugged_and_reaches_its_server() {
    let Some(env) = Vms::new() else { return };
    env.template("t", "pc", "none", "");
    env.vm_on_overlay("u", "t");
    env.ok(&["vm", "start", "u"]);
    env.wait_console("u", "LAMINA-GUEST-IDLE", 300);
    let server = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = server.local_addr().unwrap().port();

    // A serial port cannot be added to a running x86 VM: said so.
    let out = add_connect(&env, "u", "tty", "serial", free_port());
    assert!(out.contains("next start"), "{out}");
    assert_eq!(link(&env, "u", "tty")["state"], "next start");

    // A USB device can: QEMU's usb-redir connects and says hello.
    let out = add_connect(&env, "u", "key", "usb", port);
    assert!(out.contains("hot-plugged"), "{out}");
    let mut c = accept_within(&server, 60);
    // usbredir: a header of type, length and id (u32 LE each); type 0 is
    // usb_redir_hello, whose payload starts with a 64-byte version string.
    let mut head = [0u8; 12];
    c.read_exact(&mut head).unwrap();
    let u = |i: usize| u32::from_le_bytes(head[i..i + 4].try_into().unwrap());
    assert_eq!(u(0), 0, "not a usbredir hello: {head:?}");
    let mut hello = vec![0u8; u(4) as usize];
    c.read_exact(&mut hello).unwrap();
    let version = String::from_utf8_lossy(&hello[..64]);
    assert!(version.starts_with("qemu usb-redir guest"), "{version:?}");
    let r = wait_link(&env, "u", "key", "connected", |r| r["state"] == "connected");
    assert_eq!(
        r["from_guest_bytes"].as_u64(),
        Some(12 + hello.len() as u64),
        "{r}"
    );

    // Removed: unplugged, and the server sees the link end.
    let out = env.ok(&["vm", "peripheral", "rm", "u", "key"]);
    assert!(out.contains("unplugged"), "{out}");
    let mut rest = Vec::new();
    let _ = c.read_to_end(&mut rest);
    let rows = env.json(&["vm", "peripheral", "ls", "u"]);
    assert_eq!(rows.as_array().unwrap().len(), 1, "{rows}");
    stop_ok(&env, "u");
}

#[test]
fn an_arm_phone_reaches_its_serial_peripheral_through_a_virtio_port() {
    let Some(env) = Vms::new() else { return };
    let Some(g) = common::guest::guest_arm() else {
        return;
    };
    env.phone_template("phone", g, "lamina.serial=vport:lamina.tty");
    let disk = env.overlay_on("phone", &g.join("disk.raw"));
    env.ok(&[
        "vm",
        "create",
        "p",
        "--template",
        "phone",
        "--disk",
        disk.to_str().unwrap(),
    ]);
    let server = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = server.local_addr().unwrap().port();
    let out = add_connect(&env, "p", "tty", "serial", port);
    assert!(out.contains("as virtio-port lamina.tty"), "{out}");
    env.ok(&["vm", "start", "p"]);
    let c = accept_within(&server, 300);
    let mut r = BufReader::new(c.try_clone().unwrap());
    serial_out_line(&mut r);
    (&c).write_all(b"hello arm\n").unwrap();
    env.wait_console("p", "LAMINA-GUEST-SERIAL-IN hello arm", 120);
    // On Arm a serial port can be added to the running VM.
    let out = add_connect(&env, "p", "gps", "serial", free_port());
    assert!(out.contains("hot-plugged"), "{out}");
    wait_link(&env, "p", "gps", "retrying", |r| r["state"] == "retrying");
    env.wait_console("p", "LAMINA-GUEST-IDLE", 300);
    stop_ok(&env, "p");
}
