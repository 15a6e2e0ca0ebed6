//! A broker set-up of real processes shared by the broker's tests: a
//! `lamina server` over a central store, host agents over their own stores
//! holding the fixture guest's disk layer and templates (`fixture`: the
//! `pc` profile; `fixture-phone`: the `phone` profile).

use std::collections::HashSet;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::guest::guest;
use super::net::{Central, Certs, Server};
use super::Env;

pub const APPEND: &str = "console=ttyS0 quiet panic=-1";

/// A host: its store (with the fixture guest's disk layer and template)
/// and its agent.
pub struct HostAgent {
    pub env: Env,
    pub agent: Option<Server>,
    pub token: std::path::PathBuf,
}

impl HostAgent {
    pub fn new(certs: &Certs, g: &Path) -> HostAgent {
        let env = Env::new();
        env.create("os/guest", "os", "disk");
        env.import("os/guest", &g.join("disk.raw"));
        for (name, profile) in [("fixture", "pc"), ("fixture-phone", "phone")] {
            env.ok(&[
                "vm",
                "template",
                "create",
                name,
                "--profile",
                profile,
                "--memory",
                "192",
                "--accel",
                "tcg",
                "--kernel",
                g.join("vmlinuz").to_str().unwrap(),
                "--initrd",
                g.join("initrd.img").to_str().unwrap(),
                "--append",
                APPEND,
            ]);
        }
        env.ok(&["user", "add", "broker", "--admin"]);
        let tok = env.json(&["token", "create", "broker"]);
        let token = env.path("broker.token");
        std::fs::write(&token, tok["token"].as_str().unwrap()).unwrap();
        let agent = Server::spawn(&env.store, certs, "127.0.0.1:0", &["host-agent"]);
        HostAgent {
            env,
            agent: Some(agent),
            token,
        }
    }

    pub fn url(&self) -> String {
        self.agent.as_ref().unwrap().url()
    }

    /// The names of the VMs running on this host.
    pub fn running(&self) -> HashSet<String> {
        let v = self.env.json(&["vm", "ls"]);
        v.as_array()
            .unwrap()
            .iter()
            .filter(|x| x["state"] == "running")
            .map(|x| x["name"].as_str().unwrap().to_owned())
            .collect()
    }
}

impl Drop for HostAgent {
    fn drop(&mut self) {
        let v = self.env.run(&["--json", "vm", "ls"]);
        if let Ok(list) = serde_json::from_slice::<Value>(&v.stdout) {
            for x in list.as_array().into_iter().flatten() {
                let _ = self.env.run(&["vm", "kill", x["name"].as_str().unwrap()]);
            }
        }
        // The disks' servers live in their own process groups.
        let dir = self.env.store.join("broker");
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            if e.path().extension().is_some_and(|x| x == "pid") {
                if let Ok(pid) = std::fs::read_to_string(e.path())
                    .unwrap_or_default()
                    .trim()
                    .parse::<i32>()
                {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
        }
    }
}

/// The broker's store and server, with an admin, and laptops of users.
pub struct Setup {
    pub central: Central,
    pub server: Option<Server>,
    pub hosts: Vec<HostAgent>,
}

impl Setup {
    pub fn new(hosts: usize) -> Option<Setup> {
        let g = guest()?;
        let central = Central::new();
        let hosts: Vec<HostAgent> = (0..hosts)
            .map(|_| HostAgent::new(&central.certs, g))
            .collect();
        for (i, h) in hosts.iter().enumerate() {
            central.env.ok(&[
                "host",
                "add",
                &format!("h{}", i + 1),
                &h.url(),
                "--token-file",
                h.token.to_str().unwrap(),
                "--ca",
                central.certs.ca.to_str().unwrap(),
            ]);
        }
        let server = Server::spawn(
            &central.env.store,
            &central.certs,
            "127.0.0.1:0",
            &["server", "--rules-interval", "500ms"],
        );
        Some(Setup {
            central,
            server: Some(server),
            hosts,
        })
    }

    /// A laptop store of `user` (added to the server) with remote `central`.
    pub fn laptop(&self, user: &str, args: &[&str]) -> Env {
        let token = self.central.user(user, args);
        let env = Env::new();
        env.ok(&[
            "remote",
            "add",
            "central",
            &self.srv().url(),
            "--token-file",
            token.to_str().unwrap(),
            "--ca",
            self.central.certs.ca.to_str().unwrap(),
        ]);
        env
    }

    pub fn srv(&self) -> &Server {
        self.server.as_ref().unwrap()
    }

    /// Stops the server (SIGTERM, clean exit) and starts it again on the
    /// same address and store.
    pub fn restart(&mut self) {
        let old = self.server.take().unwrap();
        let addr = old.addr;
        assert!(old.stop().success(), "a clean exit on SIGTERM");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpListener::bind(addr).is_err() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        self.server = Some(Server::spawn(
            &self.central.env.store,
            &self.central.certs,
            &addr.to_string(),
            &["server", "--rules-interval", "1s"],
        ));
    }

    pub fn vms(&self, pool: &str) -> Vec<Value> {
        let v = self.central.env.json(&["pool", "show", pool]);
        v["vms"].as_array().unwrap().clone()
    }

    /// Waits until `pool` satisfies `cond` (its VMs), or fails with them.
    pub fn wait(
        &self,
        pool: &str,
        what: &str,
        secs: u64,
        cond: impl Fn(&[Value]) -> bool,
    ) -> Vec<Value> {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let vms = self.vms(pool);
            if cond(&vms) {
                return vms;
            }
            if Instant::now() > deadline {
                panic!(
                    "pool {pool}: {what} not reached in {secs} s: {vms:#?}\naudit: {}\nserver log: {}",
                    self.central.env.ok(&["audit", "ls"]),
                    self.srv().log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    pub fn audit(&self) -> Vec<Value> {
        self.central.env.json(&["audit", "ls"])["entries"]
            .as_array()
            .unwrap()
            .clone()
    }
}

pub fn idle(vms: &[Value]) -> usize {
    vms.iter()
        .filter(|m| m["state"] == "running" && m["session"].is_null() && m["owner"].is_null())
        .count()
}
