//! The broker's client of one host agent.

use std::time::Duration;

use serde::de::DeserializeOwned;

use super::{CreateVm, HostReport, VmReport};
use crate::error::{Error, Result};
use crate::model::Host;

/// How long a host may take to report.
const REPORT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a lifecycle change may take (a VM start waits for QMP).
const ACTION_TIMEOUT: Duration = Duration::from_secs(200);

/// The `Upgrade` protocol of the agent's VNC route.
pub const VNC_UPGRADE: &str = "lamina-vnc";

/// A connection to one host agent.
#[derive(Clone)]
pub struct AgentClient {
    host: String,
    base: String,
    token: String,
    http: reqwest::Client,
    /// HTTP/1.1 only, for upgrades (HTTP/2 has none).
    http1: reqwest::Client,
}

impl AgentClient {
    /// A client of `host`'s agent.
    ///
    /// # Errors
    /// A CA that is not PEM, TLS set-up failures.
    pub fn new(host: &Host) -> Result<AgentClient> {
        Ok(AgentClient {
            host: host.name.clone(),
            base: host.url.trim_end_matches('/').to_owned(),
            token: host.token.clone(),
            http: build(host, false)?,
            http1: build(host, true)?,
        })
    }

    /// The host's name.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// A raw byte stream to VM `vm`'s VNC display.
    ///
    /// # Errors
    /// Unreachable, refused (no such VM, not running).
    pub async fn vnc(&self, vm: &str) -> Result<reqwest::Upgraded> {
        let url = format!("{}/agent/v1/vms/{vm}/vnc", self.base);
        let unreachable = |e: reqwest::Error| Error::HostUnreachable {
            host: self.host.clone(),
            reason: chain(&e),
        };
        let resp = self
            .http1
            .get(&url)
            .bearer_auth(&self.token)
            .header(reqwest::header::CONNECTION, "upgrade")
            .header(reqwest::header::UPGRADE, VNC_UPGRADE)
            .timeout(REPORT_TIMEOUT)
            .send()
            .await
            .map_err(unreachable)?;
        let status = resp.status();
        if status != reqwest::StatusCode::SWITCHING_PROTOCOLS {
            let bytes = resp.bytes().await.map_err(unreachable)?;
            return Err(Error::Agent {
                host: self.host.clone(),
                status: status.as_u16(),
                message: agent_message(&bytes, status),
            });
        }
        resp.upgrade().await.map_err(unreachable)
    }

    async fn call<T: DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<serde_json::Value>,
        timeout: Duration,
    ) -> Result<T> {
        let url = format!("{}/agent/v1/{path}", self.base);
        let mut req = self
            .http
            .request(method, &url)
            .bearer_auth(&self.token)
            .timeout(timeout);
        if let Some(b) = body {
            req = req
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(b.to_string());
        }
        let unreachable = |e: reqwest::Error| Error::HostUnreachable {
            host: self.host.clone(),
            reason: chain(&e),
        };
        let resp = req.send().await.map_err(unreachable)?;
        let status = resp.status();
        let bytes = resp.bytes().await.map_err(unreachable)?;
        if !status.is_success() {
            return Err(Error::Agent {
                host: self.host.clone(),
                status: status.as_u16(),
                message: agent_message(&bytes, status),
            });
        }
        serde_json::from_slice(&bytes).map_err(|e| Error::Agent {
            host: self.host.clone(),
            status: status.as_u16(),
            message: format!("unexpected answer: {e}"),
        })
    }

    /// The host's figures and VMs.
    ///
    /// # Errors
    /// Unreachable, refused.
    pub async fn report(&self) -> Result<HostReport> {
        self.call(reqwest::Method::GET, "host", None, REPORT_TIMEOUT)
            .await
    }

    /// Creates and starts a VM.
    ///
    /// # Errors
    /// Unreachable, refused (bad template or base), QEMU failing.
    pub async fn create(&self, req: &CreateVm) -> Result<VmReport> {
        let body = serde_json::to_value(req).unwrap_or_default();
        self.call(reqwest::Method::POST, "vms", Some(body), ACTION_TIMEOUT)
            .await
    }

    /// `start`, `stop` or `reset` a VM.
    ///
    /// # Errors
    /// Unreachable, refused.
    pub async fn action(&self, vm: &str, action: &str) -> Result<()> {
        let _: serde_json::Value = self
            .call(
                reqwest::Method::POST,
                &format!("vms/{vm}/{action}"),
                None,
                ACTION_TIMEOUT,
            )
            .await?;
        Ok(())
    }

    /// Removes a VM and its disk.
    ///
    /// # Errors
    /// Unreachable, refused.
    pub async fn destroy(&self, vm: &str) -> Result<()> {
        let _: serde_json::Value = self
            .call(
                reqwest::Method::DELETE,
                &format!("vms/{vm}"),
                None,
                ACTION_TIMEOUT,
            )
            .await?;
        Ok(())
    }
}

/// The agent's error message in its JSON envelope, else the status.
fn agent_message(bytes: &[u8], status: reqwest::StatusCode) -> String {
    serde_json::from_slice::<serde_json::Value>(bytes)
        .ok()
        .and_then(|v| v["error"]["message"].as_str().map(str::to_owned))
        .unwrap_or_else(|| format!("HTTP {status}"))
}

/// An HTTP client of `host`'s agent; `http1`: HTTP/1.1 only.
fn build(host: &Host, http1: bool) -> Result<reqwest::Client> {
    let mut b = reqwest::Client::builder()
        .use_rustls_tls()
        .https_only(host.url.starts_with("https://"))
        .connect_timeout(Duration::from_secs(3))
        .pool_idle_timeout(Duration::from_secs(60))
        .tcp_nodelay(true);
    match &host.ca_pem {
        Some(pem) => {
            let ca = reqwest::Certificate::from_pem(pem.as_bytes()).map_err(|e| {
                Error::InvalidInput(format!("the CA of host {} is not PEM: {e}", host.name))
            })?;
            b = b.tls_built_in_root_certs(false).add_root_certificate(ca);
        }
        None => b = b.tls_built_in_native_certs(true),
    }
    if http1 {
        b = b.http1_only();
    }
    b.build().map_err(|e| Error::HostUnreachable {
        host: host.name.clone(),
        reason: chain(&e),
    })
}

/// An error with its causes, on one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        src = c.source();
    }
    s
}
