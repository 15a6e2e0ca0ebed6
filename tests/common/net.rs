//! Helpers for sync tests: certificates made with openssl, a `lamina
//! server` process, and a TCP fault proxy (delay, cut after N bytes, flip
//! a byte) with byte counters.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{bin, Env};

/// A CA, a server certificate it signed (for 127.0.0.1 and localhost), and
/// an unrelated CA.
pub struct Certs {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub other_ca: PathBuf,
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("openssl runs");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Certs {
    pub fn new(dir: &Path) -> Certs {
        std::fs::create_dir_all(dir).unwrap();
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        for (name, cn) in [("ca", "Lamina test CA"), ("other", "Someone else's CA")] {
            let mut a = vec!["req", "-x509"];
            a.extend(ec);
            let key = format!("{name}.key");
            let pem = format!("{name}.pem");
            let subj = format!("/CN={cn}");
            a.extend(["-keyout", &key, "-out", &pem, "-days", "2", "-subj", &subj]);
            openssl(dir, &a);
        }
        let mut a = vec!["req"];
        a.extend(ec);
        a.extend([
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=localhost",
        ]);
        openssl(dir, &a);
        std::fs::write(
            dir.join("ext.cnf"),
            "subjectAltName=DNS:localhost,IP:127.0.0.1\n",
        )
        .unwrap();
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                "server.csr",
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                "server.pem",
                "-days",
                "2",
                "-extfile",
                "ext.cnf",
            ],
        );
        Certs {
            ca: dir.join("ca.pem"),
            cert: dir.join("server.pem"),
            key: dir.join("server.key"),
            other_ca: dir.join("other.pem"),
        }
    }
}

/// A running `lamina server`.
pub struct Server {
    pub child: Child,
    pub addr: SocketAddr,
    pub store: PathBuf,
    pub log: PathBuf,
}

impl Server {
    /// Starts a server on `store` (TLS with `certs`) at `listen`
    /// (`127.0.0.1:0` for any port) and waits until it listens.
    pub fn start(store: &Path, certs: &Certs, listen: &str) -> Server {
        Server::spawn(store, certs, listen, &["server"])
    }

    /// Starts `lamina --json COMMAND… --listen LISTEN` with TLS (`server`
    /// with options, `host-agent`) and waits until it listens.
    pub fn spawn(store: &Path, certs: &Certs, listen: &str, command: &[&str]) -> Server {
        let log = store.with_extension(format!("server-{}.log", rand::random::<u16>()));
        let mut child = Command::new(bin())
            .arg("--store")
            .arg(store)
            .arg("--json")
            .args(command)
            .args(["--listen", listen, "--tls-cert"])
            .arg(&certs.cert)
            .arg("--tls-key")
            .arg(&certs.key)
            .env_remove("LAMINA_STORE")
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_else(|e| {
            panic!(
                "server did not start ({e}): {line}\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            )
        });
        let addr = v["listening"].as_str().unwrap().parse().unwrap();
        Server {
            child,
            addr,
            store: store.to_owned(),
            log,
        }
    }

    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// SIGTERM, then waits for a clean exit; returns the exit status.
    pub fn stop(mut self) -> std::process::ExitStatus {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(40);
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(Instant::now() < deadline, "server did not stop on SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `kill -9`.
    pub fn kill9(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The server side of a test: a store with users, tokens and layers.
pub struct Central {
    pub env: Env,
    pub certs: Certs,
}

impl Central {
    pub fn new() -> Central {
        let env = Env::new();
        let certs = Certs::new(&env.path("certs"));
        Central { env, certs }
    }

    /// Adds a user (and its groups, created as needed) and writes a token
    /// file for it; returns the file.
    pub fn user(&self, name: &str, args: &[&str]) -> PathBuf {
        let mut a = vec!["user", "add", name];
        a.extend(args);
        for (i, w) in args.iter().enumerate() {
            if *w == "--group" {
                let g = args[i + 1];
                let _ = self.env.run(&["group", "add", g]);
            }
        }
        self.env.ok(&a);
        let tok = self.env.json(&["token", "create", name]);
        let path = self.env.path(&format!("{name}.token"));
        std::fs::write(&path, tok["token"].as_str().unwrap()).unwrap();
        path
    }

    pub fn start(&self) -> Server {
        Server::start(&self.env.store, &self.certs, "127.0.0.1:0")
    }

    pub fn start_at(&self, addr: SocketAddr) -> Server {
        // The old listener's port may take a moment to be free again.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if TcpListener::bind(addr).is_ok() || Instant::now() > deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Server::start(&self.env.store, &self.certs, &addr.to_string())
    }
}

/// A laptop: a store of its own with remote `origin`.
pub struct Laptop {
    pub env: Env,
    pub host: String,
}

impl Laptop {
    pub fn new(host: &str, url: &str, token: &Path, ca: &Path) -> Laptop {
        let env = Env::new();
        env.ok(&[
            "remote".as_ref(),
            "add".as_ref(),
            "origin".as_ref(),
            url.as_ref(),
            "--token-file".as_ref(),
            token.as_os_str(),
            "--ca".as_ref(),
            ca.as_os_str(),
        ]);
        Laptop {
            env,
            host: host.to_owned(),
        }
    }

    /// Runs a sync command (`pull`, `push`, `sync`) with `--json`.
    pub fn sync(&self, verb: &str, args: &[&str]) -> serde_json::Value {
        let mut a = vec!["--json", verb, "origin"];
        a.extend(args);
        let out = self
            .env
            .cmd()
            .env("LAMINA_HOST", &self.host)
            .args(&a)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{verb} {args:?} on {}: {}",
            self.host,
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// Runs a sync command expected to fail: (exit code, stderr).
    pub fn sync_fails(&self, verb: &str, args: &[&str]) -> (i32, String) {
        let mut a = vec![verb, "origin"];
        a.extend(args);
        let out = self
            .env
            .cmd()
            .env("LAMINA_HOST", &self.host)
            .args(&a)
            .output()
            .unwrap();
        assert!(
            !out.status.success(),
            "{verb} {args:?} succeeded: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

/// What the proxy does to the bytes going through it.
#[derive(Debug, Clone, Copy, Default)]
pub struct Faults {
    /// Close the connection once this many bytes went client → server
    /// (counted over all connections; happens once).
    pub cut_upstream_at: Option<u64>,
    /// The same, server → client.
    pub cut_downstream_at: Option<u64>,
    /// XOR one byte at this server → client offset with 0x40 (once).
    pub flip_downstream_at: Option<u64>,
    /// Sleep this long before forwarding each read.
    pub delay: Option<Duration>,
}

/// A TCP proxy in front of a server, for fault tests.
pub struct Proxy {
    pub addr: SocketAddr,
    target: Arc<Mutex<SocketAddr>>,
    faults: Arc<Mutex<Faults>>,
    pub up: Arc<AtomicU64>,
    pub down: Arc<AtomicU64>,
    /// Set once a cut or flip has happened.
    pub fired: Arc<AtomicBool>,
    refuse: Arc<AtomicBool>,
}

impl Proxy {
    pub fn new(target: SocketAddr) -> Proxy {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let p = Proxy {
            addr,
            target: Arc::new(Mutex::new(target)),
            faults: Arc::new(Mutex::new(Faults::default())),
            up: Arc::new(AtomicU64::new(0)),
            down: Arc::new(AtomicU64::new(0)),
            fired: Arc::new(AtomicBool::new(false)),
            refuse: Arc::new(AtomicBool::new(false)),
        };
        let (target, faults, up, down, fired, refuse) = (
            p.target.clone(),
            p.faults.clone(),
            p.up.clone(),
            p.down.clone(),
            p.fired.clone(),
            p.refuse.clone(),
        );
        std::thread::spawn(move || {
            for client in l.incoming() {
                let Ok(client) = client else { continue };
                if refuse.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                let Ok(server) = TcpStream::connect(*target.lock().unwrap()) else {
                    continue;
                };
                let f = *faults.lock().unwrap();
                let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                let (u, d, fu, fd) = (up.clone(), down.clone(), fired.clone(), fired.clone());
                std::thread::spawn(move || {
                    pipe(client, server, u, f.cut_upstream_at, None, f.delay, fu)
                });
                std::thread::spawn(move || {
                    pipe(
                        s2,
                        c2,
                        d,
                        f.cut_downstream_at,
                        f.flip_downstream_at,
                        f.delay,
                        fd,
                    )
                });
            }
        });
        p
    }

    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    pub fn set_target(&self, t: SocketAddr) {
        *self.target.lock().unwrap() = t;
    }

    /// Faults for connections made from now on; counters restart.
    pub fn set_faults(&self, f: Faults) {
        *self.faults.lock().unwrap() = f;
        self.up.store(0, Ordering::SeqCst);
        self.down.store(0, Ordering::SeqCst);
        self.fired.store(false, Ordering::SeqCst);
    }

    /// Refuse (close at once) new connections, as if the server were down.
    pub fn set_down(&self, down: bool) {
        self.refuse.store(down, Ordering::SeqCst);
    }
}

fn pipe(
    mut from: TcpStream,
    mut to: TcpStream,
    count: Arc<AtomicU64>,
    cut_at: Option<u64>,
    flip_at: Option<u64>,
    delay: Option<Duration>,
    fired: Arc<AtomicBool>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if let Some(d) = delay {
            std::thread::sleep(d);
        }
        let start = count.fetch_add(n as u64, Ordering::SeqCst);
        let end = start + n as u64;
        if let Some(at) = flip_at {
            if start <= at && at < end && !fired.swap(true, Ordering::SeqCst) {
                buf[(at - start) as usize] ^= 0x40;
            }
        }
        if let Some(at) = cut_at {
            if end >= at && !fired.swap(true, Ordering::SeqCst) {
                let keep = (at.saturating_sub(start)) as usize;
                let _ = to.write_all(&buf[..keep.min(n)]);
                break;
            }
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
}

/// `curl` trusting `ca`: (HTTP status, body and stderr). `method` may end
/// in ` --http1.1`; `body` is a file sent as it is.
pub fn curl(
    ca: &Path,
    token: Option<&str>,
    method: &str,
    url: &str,
    body: Option<&Path>,
) -> (u16, String) {
    let mut cmd = Command::new("curl");
    let (method, http1) = match method.strip_suffix(" --http1.1") {
        Some(m) => (m, true),
        None => (method, false),
    };
    cmd.args([
        "-sS",
        "-o",
        "-",
        "-w",
        "\n%{http_code}",
        "-X",
        method,
        "--cacert",
    ])
    .arg(ca);
    if http1 {
        cmd.arg("--http1.1");
    }
    if let Some(t) = token {
        cmd.args(["-H", &format!("Authorization: Bearer {t}")]);
    }
    if let Some(b) = body {
        cmd.arg("--data-binary").arg(format!("@{}", b.display()));
    }
    let out = cmd.arg(url).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    (code.trim().parse().unwrap_or(0), format!("{body}{err}"))
}
