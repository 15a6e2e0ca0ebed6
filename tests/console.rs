//! The web console (issue #11) in a real browser: headless Chromium driven
//! over WebDriver (chromedriver) against a `lamina server` with two host
//! agents running the fixture guest (TCG). A user logs in with a password,
//! connects to a pool from a PC-sized window and from a phone-sized one,
//! and the page's noVNC canvas shows the guest's colour bars at the
//! profile's geometry (1280×800, 720×1280); a desktop of "another VDI
//! product" (a second QEMU with a password-protected VNC TCP display) is
//! reached the same way. The console's security checks are asserted with
//! raw requests: cookie flags, CSRF, foreign origins, login rate limits,
//! single-use tickets, another user's session. Screenshots are saved in
//! the test's work directory and under `target/tmp/console/`.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::broker::*;
use common::*;
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{json, Value};

const PASSWORD: &str = "correct horse battery";
const PHONE_UA: &str = "Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/148.0 Mobile Safari/537.36";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// chromedriver, killed on drop.
struct Driver {
    child: Child,
    url: String,
}

impl Driver {
    fn start() -> Option<Driver> {
        let ok = Command::new("chromedriver")
            .arg("--version")
            .output()
            .is_ok()
            && Path::new("/usr/bin/chromium").exists();
        if !require(
            ok,
            "chromium and chromedriver (apt-get install chromium chromium-driver)",
        ) {
            return None;
        }
        let port = free_port();
        let child = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "chromedriver did not listen");
            std::thread::sleep(Duration::from_millis(100));
        }
        Some(Driver {
            child,
            url: format!("http://127.0.0.1:{port}"),
        })
    }

    /// A new headless Chromium with a window of `w`×`h` (and `ua`).
    async fn browser(&self, w: u32, h: u32, ua: Option<&str>) -> Client {
        let profile = tempfile::tempdir().unwrap().keep();
        let mut args = vec![
            "--headless=new".to_owned(),
            "--no-sandbox".into(),
            "--disable-dev-shm-usage".into(),
            "--disable-gpu".into(),
            "--disable-background-networking".into(),
            "--disable-component-update".into(),
            "--disable-sync".into(),
            "--disable-quic".into(),
            "--no-first-run".into(),
            // The test's CA is not the system's.
            "--ignore-certificate-errors".into(),
            format!("--window-size={w},{h}"),
            format!("--user-data-dir={}", profile.display()),
        ];
        if let Some(ua) = ua {
            args.push(format!("--user-agent={ua}"));
        }
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            json!({"binary": "/usr/bin/chromium", "args": args}),
        );
        caps.insert("acceptInsecureCerts".into(), json!(true));
        ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(caps)
            .connect(&self.url)
            .await
            .expect("a Chromium session")
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn js(c: &Client, script: &str) -> Value {
    c.execute(script, vec![]).await.unwrap()
}

/// Polls `script` until `ok` holds for its value.
async fn wait_js(c: &Client, script: &str, secs: u64, ok: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let v = js(c, script).await;
        if ok(&v) {
            return v;
        }
        if Instant::now() > deadline {
            let html = c.source().await.unwrap_or_default();
            panic!("{script} → {v} after {secs} s; page:\n{html}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn log_in(c: &Client, base: &str, user: &str) {
    c.goto(&format!("{base}/console/login")).await.unwrap();
    for (field, text) in [("#user", user), ("#password", PASSWORD)] {
        c.find(Locator::Css(field))
            .await
            .unwrap()
            .send_keys(text)
            .await
            .unwrap();
    }
    c.find(Locator::Css("#login"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    wait_js(c, "return location.pathname", 20, |v| v == "/console").await;
}

/// Presses Disconnect on the screen page; waits for the home page. On
/// failure the broker's audit log says who ended what.
async fn disconnect(c: &Client, env: &Env) -> String {
    let action = js(
        c,
        "return document.querySelector('#disconnect').form.action",
    )
    .await;
    let id = action
        .as_str()
        .and_then(|a| a.rsplit('/').nth(1))
        .unwrap()
        .to_owned();
    c.find(Locator::Css("#disconnect"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while js(c, "return location.pathname").await != "/console" {
        if Instant::now() > deadline {
            let audit = env.run(&["--json", "audit", "ls"]);
            let html = c.source().await.unwrap_or_default();
            panic!(
                "Disconnect did not return home; audit:\n{}\npage:\n{html}",
                String::from_utf8_lossy(&audit.stdout)
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Ended by its user's Disconnect, not by anything before it.
    let audit = env.json(&["audit", "ls"]);
    let released = audit["entries"]
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["action"] == "release" && e["detail"].as_str().unwrap_or("").contains(&id));
    assert!(
        released,
        "session {id} ended by its Disconnect; audit:\n{audit}"
    );
    id
}

/// What the page's noVNC canvas shows: `[width, height, distinct colours
/// sampled, CSS width, CSS height]`, or null.
const CANVAS: &str = "const cv=document.querySelector('#screen canvas');\
if(!cv||document.body.dataset.state!=='connected')return null;\
const d=cv.getContext('2d').getImageData(0,0,cv.width,cv.height).data;\
const seen=new Set();for(let i=0;i<d.length;i+=4*61){seen.add((d[i]<<16)|(d[i+1]<<8)|d[i+2]);}\
return [cv.width,cv.height,seen.size,cv.clientWidth,cv.clientHeight];";

/// Connects to `pool` from the home page; waits for the guest's colour
/// bars; saves a screenshot as `name`. Returns the canvas figures.
async fn connect(c: &Client, base: &str, pool: &str, shots: &[PathBuf], name: &str) -> Vec<u64> {
    c.goto(&format!("{base}/console")).await.unwrap();
    let button = c
        .find(Locator::Css(&format!("#connect-{pool}")))
        .await
        .unwrap();
    // From the click to the guest's screen in the canvas: printed, never
    // asserted.
    let clicked = Instant::now();
    button.click().await.unwrap();
    wait_js(c, "return location.pathname", 180, |v| {
        v.as_str()
            .is_some_and(|p| p.starts_with("/console/screen/"))
    })
    .await;
    // Connected, and the fixture guest's 8 colour bars drawn.
    let v = wait_js(c, CANVAS, 240, |v| v[2].as_u64().unwrap_or(0) >= 6).await;
    eprintln!(
        "connect to first frame, pool {pool}: {:.2} s",
        clicked.elapsed().as_secs_f64()
    );
    let png = c.screenshot().await.unwrap();
    for dir in shots {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join(name), &png).unwrap();
    }
    eprintln!("screenshot {name}: {v}");
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect()
}

/// Distinct colours of a PNG (sampled).
fn png_colours(path: &Path) -> usize {
    let dec = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(path).unwrap()));
    let mut r = dec.read_info().unwrap();
    let mut buf = vec![0; r.output_buffer_size().unwrap()];
    let info = r.next_frame(&mut buf).unwrap();
    let px = info.color_type.samples();
    let mut seen = std::collections::HashSet::new();
    for p in buf[..info.buffer_size()].chunks(px).step_by(53) {
        seen.insert((p[0], p[1], p[2]));
    }
    seen.len()
}

/// A request with curl (HTTP/1.1): status, headers, body.
fn raw(ca: &Path, args: &[&str]) -> (u16, String, String) {
    let out = Command::new("curl")
        .args(["-sS", "-i", "--http1.1", "--max-time", "5", "--cacert"])
        .arg(ca)
        .args(args)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, head.to_owned(), body.to_owned())
}

fn cookie_of(headers: &str) -> String {
    headers
        .lines()
        .find_map(|l| {
            l.strip_prefix("set-cookie: ")
                .or_else(|| l.strip_prefix("Set-Cookie: "))
        })
        .and_then(|c| c.split(';').next())
        .unwrap()
        .to_owned()
}

/// A WebSocket handshake for a screen (curl stops after the answer).
fn ws_args(url: &str, origin: &str) -> Vec<String> {
    [
        "-H",
        "Connection: Upgrade",
        "-H",
        "Upgrade: websocket",
        "-H",
        "Sec-WebSocket-Version: 13",
        "-H",
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        "-H",
        &format!("Origin: {origin}"),
        url,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// A second QEMU with a VNC TCP display behind a password: the "other VDI
/// product".
struct External {
    child: Child,
    port: u16,
}

impl External {
    fn start(g: &Path, dir: &Path) -> External {
        let disk = dir.join("ext-disk.raw");
        std::fs::copy(g.join("disk.raw"), &disk).unwrap();
        let display = loop {
            let d = 40 + rand::random::<u16>() % 50;
            if std::net::TcpListener::bind(("127.0.0.1", 5900 + d)).is_ok() {
                break d;
            }
        };
        let child = Command::new("qemu-system-x86_64")
            .args([
                "-accel",
                "tcg",
                "-m",
                "160",
                "-no-reboot",
                "-serial",
                "null",
            ])
            .args(["-object", "secret,id=vncpw,data=vdi-pw1"])
            .args([
                "-vnc",
                &format!("127.0.0.1:{display},password-secret=vncpw"),
            ])
            .arg("-kernel")
            .arg(g.join("vmlinuz"))
            .arg("-initrd")
            .arg(g.join("initrd.img"))
            .args(["-append", APPEND])
            .arg("-drive")
            .arg(format!("file={},format=raw,if=virtio", disk.display()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let port = 5900 + display;
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "the external desktop's VNC did not listen"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        External { child, port }
    }
}

impl Drop for External {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What a browser sent to [`FakeVnc`].
#[derive(Debug, Clone, PartialEq)]
enum Input {
    Key { down: bool, keysym: u32 },
    Pointer { buttons: u8, x: u16, y: u16 },
}

/// A minimal RFB 3.8 server on TCP (no authentication, raw encoding,
/// 640×480 colour bars) that records the key and pointer events it gets:
/// the proof that keyboard and pointer reach a desktop through the browser,
/// noVNC, the WebSocket and the broker.
struct FakeVnc {
    port: u16,
    inputs: std::sync::Arc<std::sync::Mutex<Vec<Input>>>,
}

impl FakeVnc {
    fn start() -> FakeVnc {
        use std::io::{Read, Write};
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let inputs = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let rec = inputs.clone();
        std::thread::spawn(move || {
            for conn in l.incoming() {
                let Ok(mut c) = conn else { return };
                let rec = rec.clone();
                std::thread::spawn(move || {
                    let mut b = [0u8; 64];
                    let (w, h) = (640u16, 480u16);
                    let step = |c: &mut std::net::TcpStream, b: &mut [u8]| c.read_exact(b).is_ok();
                    c.write_all(b"RFB 003.008\n").unwrap();
                    if !step(&mut c, &mut b[..12]) {
                        return;
                    }
                    c.write_all(&[1, 1]).unwrap();
                    if !step(&mut c, &mut b[..1]) {
                        return;
                    }
                    c.write_all(&[0, 0, 0, 0]).unwrap();
                    if !step(&mut c, &mut b[..1]) {
                        return;
                    }
                    let mut init = Vec::new();
                    init.extend_from_slice(&w.to_be_bytes());
                    init.extend_from_slice(&h.to_be_bytes());
                    init.extend_from_slice(&[
                        32, 24, 0, 1, 0, 255, 0, 255, 0, 255, 16, 8, 0, 0, 0, 0,
                    ]);
                    init.extend_from_slice(&4u32.to_be_bytes());
                    init.extend_from_slice(b"fake");
                    c.write_all(&init).unwrap();
                    // Pixel layout: shifts and byte order as the client asks.
                    let (mut rs, mut gs, mut bs, mut big) = (16u32, 8u32, 0u32, false);
                    let colours: [u32; 8] = [
                        0xffffff, 0xffff00, 0x00ffff, 0x00ff00, 0xff00ff, 0xff0000, 0x0000ff,
                        0x000000,
                    ];
                    loop {
                        if !step(&mut c, &mut b[..1]) {
                            return;
                        }
                        match b[0] {
                            0 => {
                                if !step(&mut c, &mut b[..19]) {
                                    return;
                                }
                                big = b[5] != 0;
                                rs = u32::from(b[13]);
                                gs = u32::from(b[14]);
                                bs = u32::from(b[15]);
                            }
                            2 => {
                                if !step(&mut c, &mut b[..3]) {
                                    return;
                                }
                                let n = usize::from(u16::from_be_bytes([b[1], b[2]]));
                                let mut e = vec![0u8; n * 4];
                                if c.read_exact(&mut e).is_err() {
                                    return;
                                }
                            }
                            3 => {
                                if !step(&mut c, &mut b[..9]) {
                                    return;
                                }
                                if b[0] != 0 {
                                    continue; // incremental: nothing changed
                                }
                                let mut u = vec![0u8, 0, 0, 1];
                                for v in [0u16, 0, w, h] {
                                    u.extend_from_slice(&v.to_be_bytes());
                                }
                                u.extend_from_slice(&0i32.to_be_bytes());
                                for _y in 0..h {
                                    for x in 0..w {
                                        let rgb = colours[usize::from(x / (w / 8))];
                                        let px = ((rgb >> 16) & 255) << rs
                                            | ((rgb >> 8) & 255) << gs
                                            | (rgb & 255) << bs;
                                        if big {
                                            u.extend_from_slice(&px.to_be_bytes());
                                        } else {
                                            u.extend_from_slice(&px.to_le_bytes());
                                        }
                                    }
                                }
                                if c.write_all(&u).is_err() {
                                    return;
                                }
                            }
                            4 => {
                                if !step(&mut c, &mut b[..7]) {
                                    return;
                                }
                                let keysym = u32::from_be_bytes([b[3], b[4], b[5], b[6]]);
                                rec.lock().unwrap().push(Input::Key {
                                    down: b[0] != 0,
                                    keysym,
                                });
                            }
                            5 => {
                                if !step(&mut c, &mut b[..5]) {
                                    return;
                                }
                                rec.lock().unwrap().push(Input::Pointer {
                                    buttons: b[0],
                                    x: u16::from_be_bytes([b[1], b[2]]),
                                    y: u16::from_be_bytes([b[3], b[4]]),
                                });
                            }
                            6 => {
                                if !step(&mut c, &mut b[..7]) {
                                    return;
                                }
                                let n = u32::from_be_bytes([b[3], b[4], b[5], b[6]]) as usize;
                                let mut t = vec![0u8; n.min(1 << 20)];
                                if c.read_exact(&mut t).is_err() {
                                    return;
                                }
                            }
                            _ => return,
                        }
                    }
                });
            }
        });
        FakeVnc { port, inputs }
    }
}

#[test]
fn users_reach_their_desktops_in_a_real_browser() {
    let Some(s) = Setup::new(2) else { return };
    let Some(driver) = Driver::start() else {
        return;
    };
    let g = common::guest::guest().unwrap();
    let env = &s.central.env;
    let base = s.srv().url();
    let ca = s.central.certs.ca.clone();
    let shots = vec![
        env.path("screens"),
        PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("console"),
    ];

    // Pools: PCs (2, one VM per host), phones, an external desktop's, a
    // pool with no idle VM (a connect starts one: a cold start, timed beside
    // the idle pool's) and the recording RFB server's.
    for (pool, template, min, max) in [
        ("pcs", "fixture", "2", "2"),
        ("phones", "fixture-phone", "1", "1"),
        ("vdi", "fixture", "0", "1"),
        ("cold", "fixture", "0", "1"),
        ("toy", "fixture", "0", "1"),
    ] {
        env.ok(&[
            "pool",
            "create",
            pool,
            "--template",
            template,
            "--base",
            "os/guest",
            "--min-idle",
            min,
            "--max",
            max,
        ]);
    }
    let ext = External::start(g, &env.path(""));
    let pw = env.path("vnc.pw");
    std::fs::write(&pw, "vdi-pw1\n").unwrap();
    env.ok(&[
        "desktop",
        "add",
        "ext1",
        "--vnc",
        &format!("127.0.0.1:{}", ext.port),
        "--password-file",
        pw.to_str().unwrap(),
        "--pool",
        "vdi",
    ]);
    let fake = FakeVnc::start();
    env.ok(&[
        "desktop",
        "add",
        "toy1",
        "--vnc",
        &format!("127.0.0.1:{}", fake.port),
        "--pool",
        "toy",
    ]);
    let listed = env.json(&["desktop", "ls"]);
    assert_eq!(listed["desktops"][0]["password"], true);
    assert!(
        !env.ok(&["--json", "desktop", "ls"]).contains("vdi-pw1"),
        "the password is never listed"
    );

    // Users with console passwords.
    let alice_token = s.central.user("alice", &[]);
    let _bob_token = s.central.user("bob", &[]);
    s.central.user("root", &["--admin"]);
    let pwf = env.path("pw");
    std::fs::write(&pwf, format!("{PASSWORD}\n")).unwrap();
    for u in ["alice", "bob", "root"] {
        env.ok(&[
            "user",
            "passwd",
            u,
            "--password-file",
            pwf.to_str().unwrap(),
        ]);
    }
    let short = env.path("short");
    std::fs::write(&short, "short\n").unwrap();
    let (code, err) = env.fail(&[
        "user",
        "passwd",
        "alice",
        "--password-file",
        short.to_str().unwrap(),
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("at least 8"), "{err}");
    for pool in ["pcs", "phones", "vdi", "cold", "toy"] {
        env.ok(&["pool", "subscribe", pool, "alice"]);
    }
    s.wait("pcs", "2 idle", 180, |v| idle(v) == 2);
    s.wait("phones", "1 idle", 180, |v| idle(v) == 1);

    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        // A PC browser: the pc pool fits it, 1280×800 scaled to the window.
        let pc = driver.browser(1280, 900, None).await;
        log_in(&pc, &base, "alice").await;
        let home = pc.source().await.unwrap();
        assert!(home.contains("id=\"device\">pc<"), "a PC browser is a pc device");
        let v = connect(&pc, &base, "pcs", &shots, "pc.png").await;
        assert_eq!((v[0], v[1]), (1280, 800), "the pc profile's screen");
        assert!(v[3] <= 1280 && v[3] >= 600, "scaled to the viewport: {v:?}");
        assert!(png_colours(&shots[0].join("pc.png")) >= 6, "the screenshot shows the guest's bars");

        // Disconnect ends the session; the audit log has login, connect and
        // disconnect.
        let id = disconnect(&pc, env).await;
        // Sent again (a double click, a browser's retry of the POST): the
        // user lands home as well, not on an error.
        let again = js(
            &pc,
            &format!(
                "const f=new URLSearchParams();f.set('csrf',document.querySelector('input[name=csrf]').value);\
return fetch('/console/sessions/{id}/end',{{method:'POST',body:f}}).then(r=>[r.status,new URL(r.url).pathname])"
            ),
        )
        .await;
        assert_eq!(again, json!([200, "/console"]), "a second Disconnect");

        // Keyboard and pointer reach the desktop: a click and "lamina"
        // typed into the canvas arrive as RFB pointer and key events.
        connect(&pc, &base, "toy", &shots, "toy.png").await;
        let canvas = pc.find(Locator::Css("#screen canvas")).await.unwrap();
        canvas.click().await.unwrap();
        canvas.send_keys("lamina").await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        let typed: Vec<u32> = "lamina".bytes().map(u32::from).collect();
        loop {
            let got = fake.inputs.lock().unwrap().clone();
            let downs: Vec<u32> = got
                .iter()
                .filter_map(|i| match i {
                    Input::Key { down: true, keysym } => Some(*keysym),
                    _ => None,
                })
                .collect();
            let clicked = got
                .iter()
                .any(|i| matches!(i, Input::Pointer { buttons, .. } if buttons & 1 == 1));
            if downs == typed && clicked {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "keys and a click reach the desktop: {got:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        disconnect(&pc, env).await;

        // A cold start: the VM is created and booted for the connect.
        let v = connect(&pc, &base, "cold", &shots, "cold.png").await;
        assert_eq!((v[0], v[1]), (1280, 800));
        disconnect(&pc, env).await;

        // The external desktop, through the same console: the broker
        // answered its VNC password challenge.
        let v = connect(&pc, &base, "vdi", &shots, "external.png").await;
        assert!(v[0] >= 640 && v[1] >= 400, "the desktop's own screen: {v:?}");
        disconnect(&pc, env).await;

        // A network printer on one PC VM, added on its host: the admin
        // console shows it with the VM.
        let vms = s.vms("pcs");
        let on = vms.iter().find(|m| m["host"] == "h1" || m["host"] == "h2").unwrap();
        let host = &s.hosts[if on["host"] == "h1" { 0 } else { 1 }];
        let vm = on["name"].as_str().unwrap();
        host.env.ok(&["vm", "peripheral", "add", vm, "lp", "--kind", "printer", "--connect", "tcp:127.0.0.1:9"]);
        let want = "lp: printer lp0, connect tcp:127.0.0.1:9";

        // The admin console: hosts with load, pools with their VMs, audit.
        let admin = driver.browser(1280, 1000, None).await;
        log_in(&admin, &base, "root").await;
        let deadline = Instant::now() + Duration::from_secs(30);
        let page = loop {
            admin.goto(&format!("{base}/console/admin")).await.unwrap();
            let page = admin.source().await.unwrap();
            if page.contains(want) || Instant::now() > deadline {
                break page;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        };
        assert!(page.contains(want), "the admin page shows {vm}'s printer");
        for want in ["h1", "h2", "up · load", "pcs-", "ext1", "127.0.0.1:", "alice"] {
            assert!(page.contains(want), "admin page shows {want}");
        }
        // Each running VM's RSS (MiB) from its host's last report.
        let rss = js(&admin, "return [...document.querySelectorAll('table.vms tr')].slice(1).filter(r=>r.cells[1].textContent==='running'&&r.cells[2].textContent!=='external').map(r=>r.cells[5].textContent)").await;
        assert!(
            rss.as_array().unwrap().iter().all(|c| c.as_str().unwrap().parse::<u64>().unwrap_or(0) > 10),
            "RSS of every running VM: {rss}"
        );
        let png = admin.screenshot().await.unwrap();
        for d in &shots {
            std::fs::write(d.join("admin.png"), &png).unwrap();
        }
        let wants = [">login<", ">connect<", ">disconnect<", ">allocate<", ">release<"];
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            admin.goto(&format!("{base}/console/admin/audit")).await.unwrap();
            let page = admin.source().await.unwrap();
            let missing: Vec<&str> = wants.iter().copied().filter(|w| !page.contains(w)).collect();
            if missing.is_empty() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the audit page lists {missing:?}: {}",
                &page[page.len().saturating_sub(6000)..]
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        // Rules from the console: one that cannot hold is refused, shown.
        admin.goto(&format!("{base}/console/admin/pools/phones/rules")).await.unwrap();
        let area = admin.find(Locator::Css("#rules")).await.unwrap();
        area.clear().await.unwrap();
        area.send_keys("min_idle = 3\nmax = 1\n").await.unwrap();
        admin.find(Locator::Css("#save")).await.unwrap().click().await.unwrap();
        let err = wait_js(&admin, "const e=document.getElementById('error');return e?e.textContent:null", 20, |v| v.is_string()).await;
        assert!(err.as_str().unwrap().contains("min_idle"), "{err}");
        admin.close().await.unwrap();

        pc.close().await.unwrap();

        // A phone: the phones pool comes first and fits; 720×1280 portrait,
        // scaled down into a 390-pixel-wide viewport.
        let phone = driver.browser(390, 844, Some(PHONE_UA)).await;
        log_in(&phone, &base, "alice").await;
        let home = phone.source().await.unwrap();
        assert!(home.contains("id=\"device\">phone<"), "a phone is a phone device");
        let first = home.find("data-pool=\"phones\"").unwrap();
        assert!(first < home.find("data-pool=\"pcs\"").unwrap(), "pools that fit the device first");
        let v = connect(&phone, &base, "phones", &shots, "phone.png").await;
        assert_eq!((v[0], v[1]), (720, 1280), "the phone profile's screen");
        assert!(v[3] <= 390 && v[4] <= 844, "scaled into the phone's viewport: {v:?}");
        phone.close().await.unwrap();
    });
    let audit = s.audit();
    eprintln!("{} audit entries", audit.len());
    for (action, ok) in [("login", true), ("connect", true), ("disconnect", true)] {
        assert!(
            audit
                .iter()
                .any(|e| e["action"] == action && e["ok"] == ok && e["actor"] == "alice"),
            "audit has {action} by alice"
        );
    }

    // --- The console's security, with raw requests. ---
    // Login: cookie flags; wrong passwords are counted and rate-limited.
    let login = |user: &str, pw: &str, origin: &str| {
        raw(
            &ca,
            &[
                "-H",
                &format!("Origin: {origin}"),
                "--data-urlencode",
                &format!("user={user}"),
                "--data-urlencode",
                &format!("password={pw}"),
                &format!("{base}/console/login"),
            ],
        )
    };
    let (st, head, _) = login("alice", PASSWORD, &base);
    assert_eq!(st, 303, "{head}");
    let lower = head.to_lowercase();
    for flag in ["httponly", "secure", "samesite=strict"] {
        assert!(lower.contains(flag), "cookie flag {flag}: {head}");
    }
    let cookie = cookie_of(&head);
    let (st, _, body) = login("alice", PASSWORD, "https://evil.example");
    assert_eq!(st, 403, "a login posted from another site: {body}");
    // CSRF: a form without the token, or from another origin, is refused.
    let (st, _, body) = raw(
        &ca,
        &[
            "-H",
            &format!("Cookie: {cookie}"),
            "-H",
            &format!("Origin: {base}"),
            "-d",
            "x=1",
            &format!("{base}/console/pools/pcs/connect"),
        ],
    );
    assert_eq!(st, 403, "{body}");
    assert!(body.contains("CSRF"), "{body}");
    let (st, _, _) = raw(
        &ca,
        &[
            "-H",
            &format!("Cookie: {cookie}"),
            "-H",
            "Origin: https://evil.example",
            "-d",
            "csrf=x",
            &format!("{base}/console/logout"),
        ],
    );
    assert_eq!(st, 403);
    // Pages need a login; admin pages an admin.
    let (st, head, _) = raw(&ca, &[&format!("{base}/console")]);
    assert_eq!(st, 303);
    assert!(head.contains("/console/login"));
    let (st, _, _) = raw(
        &ca,
        &[
            "-H",
            &format!("Cookie: {cookie}"),
            &format!("{base}/console/admin"),
        ],
    );
    assert_eq!(st, 403, "alice is no admin");
    // The pages carry a strict CSP.
    let (_, head, _) = raw(
        &ca,
        &[
            "-H",
            &format!("Cookie: {cookie}"),
            &format!("{base}/console"),
        ],
    );
    assert!(
        head.to_lowercase()
            .contains("content-security-policy: default-src 'self'"),
        "{head}"
    );

    // Tickets: only for one's own session, single use, own origin only.
    let alice = Env::new();
    alice.ok(&[
        "remote",
        "add",
        "central",
        &base,
        "--token-file",
        alice_token.to_str().unwrap(),
        "--ca",
        ca.to_str().unwrap(),
    ]);
    let d = alice.json(&["session", "open", "central", "pcs"]);
    let sid = d["session"]["id"].as_str().unwrap().to_owned();
    let tok = std::fs::read_to_string(&alice_token).unwrap();
    let bob_tok = std::fs::read_to_string(s.central.env.path("bob.token")).unwrap();
    let ticket = |t: &str| {
        let (st, _, body) = raw(
            &ca,
            &[
                "-X",
                "POST",
                "-H",
                &format!("Authorization: Bearer {t}"),
                &format!("{base}/api/v1/sessions/{sid}/ticket"),
            ],
        );
        (
            st,
            serde_json::from_str::<Value>(&body).unwrap_or(Value::Null),
        )
    };
    let (st, v) = ticket(&bob_tok);
    assert_eq!(st, 404, "bob gets no ticket for alice's screen: {v}");
    let (st, v) = ticket(&tok);
    assert_eq!(st, 200, "{v}");
    let ws = format!("{base}{}", v["websocket"].as_str().unwrap());
    let a = ws_args(&ws, "https://evil.example");
    let (st, _, body) = raw(&ca, &a.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(st, 403, "a foreign Origin: {body}");
    let a = ws_args(&ws, &base);
    let (st, head, _) = raw(&ca, &a.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(st, 101, "the ticket opens the screen once: {head}");
    let (st, _, body) = raw(&ca, &a.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(st, 403, "a reused ticket: {body}");
    assert!(body.contains("already used"), "{body}");
    let bad = format!("{base}/console/ws?ticket=0000");
    let a = ws_args(&bad, &base);
    let (st, _, _) = raw(&ca, &a.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(st, 403, "a made-up ticket");
    // A new password (through the API, the user's own token) ends the
    // user's console logins; another user may not set it.
    let body = env.path("newpw.json");
    std::fs::write(&body, r#"{"password":"another long one"}"#).unwrap();
    let put = |t: &str| {
        raw(
            &ca,
            &[
                "-X",
                "PUT",
                "-H",
                &format!("Authorization: Bearer {t}"),
                "-H",
                "Content-Type: application/json",
                "--data-binary",
                &format!("@{}", body.display()),
                &format!("{base}/api/v1/users/alice/password"),
            ],
        )
    };
    let (st, _, b) = put(&bob_tok);
    assert_eq!(st, 403, "{b}");
    let (st, _, b) = put(&tok);
    assert_eq!(st, 200, "{b}");
    let (st, head, _) = raw(
        &ca,
        &[
            "-H",
            &format!("Cookie: {cookie}"),
            &format!("{base}/console"),
        ],
    );
    assert_eq!(st, 303, "the old login ended: {head}");
    let (st, _, _) = login("alice", "another long one", &base);
    assert_eq!(st, 303, "the new password logs in");
    // Wrong passwords are counted and rate-limited (per name and per
    // address: last, since it locks this address out for a while).
    for _ in 0..5 {
        let (st, _, _) = login("carol", "wrong-password", &base);
        assert_eq!(st, 401);
    }
    let (st, head, body) = login("carol", "wrong-password", &base);
    assert_eq!(st, 429, "{body}");
    assert!(head.to_lowercase().contains("retry-after"), "{head}");
    assert!(s
        .audit()
        .iter()
        .any(|e| e["action"] == "login" && e["ok"] == false && e["actor"] == "carol"));
    eprintln!("screenshots in {}", shots[0].display());
}
