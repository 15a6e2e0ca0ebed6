//! `lamina bench broker`: allocation latency of a real `lamina server`
//! (TLS, tokens, the allocator, catalog writes) when many distinct users
//! ask a pool for desktops at once. The pool's VMs run on a stand-in host
//! agent in this process (it answers the agent API and "creates" VMs at
//! once): the figure is the broker's, not QEMU's.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::extract::{Path as UrlPath, State};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use lamina_broker::agent::{CreateVm, HostReport, VmReport};
use lamina_broker::rules::Rules;
use lamina_broker::BrokerCatalog;
use lamina_sync::{Access, OpenOptions, Principal, Store};
use serde::Serialize;

use super::{make_certs, Proc};

/// What the run measured.
#[derive(Debug, Serialize)]
pub struct Report {
    /// Users asking at once.
    pub users: usize,
    /// Answers that were a desktop.
    pub desktops: usize,
    /// Errors.
    pub errors: usize,
    /// Distinct VMs handed out.
    pub distinct_vms: usize,
    /// Latency percentiles, ms.
    pub p50_ms: f64,
    /// 99th percentile, ms.
    pub p99_ms: f64,
    /// Slowest, ms.
    pub max_ms: f64,
    /// All requests, from the first sent to the last answered, ms.
    pub wall_ms: f64,
    /// The first error, if any.
    pub first_error: Option<String>,
    /// The screen proxy beside websockify.
    pub screens: Option<super::screens::Screens>,
}

type Vms = Arc<Mutex<Vec<VmReport>>>;

/// The stand-in agent's state: its VMs and the display they all show.
#[derive(Clone)]
struct StandIn {
    vms: Vms,
    display: PathBuf,
}

fn vms_lock(v: &Vms) -> std::sync::MutexGuard<'_, Vec<VmReport>> {
    v.lock().unwrap_or_else(|p| p.into_inner())
}

/// The stand-in agent: every VM it is asked for runs at once.
fn stand_in(vms: Vms, display: PathBuf) -> Router {
    async fn host(State(s): State<StandIn>) -> Json<HostReport> {
        let v = s.vms;
        Json(HostReport {
            cpus: 2,
            load1: 0.0,
            mem_total: 1 << 40,
            mem_available: 1 << 40,
            mem_capacity: 1 << 40,
            mem_committed: 0,
            mem_free: 1 << 40,
            vms: {
                let list = vms_lock(&v).clone();
                list
            },
        })
    }
    async fn create(State(s): State<StandIn>, Json(r): Json<CreateVm>) -> Json<VmReport> {
        let v = s.vms;
        let vm = VmReport {
            name: r.name,
            state: "running".into(),
            profile: Some("pc".into()),
            template: r.template,
            cpu_percent: Some(0.0),
            rss_bytes: Some(0),
            peripherals: Vec::new(),
        };
        vms_lock(&v).push(vm.clone());
        Json(vm)
    }
    async fn action(UrlPath((name, what)): UrlPath<(String, String)>) -> Json<serde_json::Value> {
        Json(serde_json::json!({"vm": name, "done": what}))
    }
    async fn destroy(
        State(s): State<StandIn>,
        UrlPath(name): UrlPath<String>,
    ) -> Json<serde_json::Value> {
        let v = s.vms;
        vms_lock(&v).retain(|x| x.name != name);
        Json(serde_json::json!({"vm": name, "done": "destroy"}))
    }
    Router::new()
        .route("/agent/v1/host", get(host))
        .route("/agent/v1/vms", post(create))
        .route("/agent/v1/vms/{name}/{action}", post(action))
        .route("/agent/v1/vms/{name}", delete(destroy))
        .route("/agent/v1/vms/{name}/vnc", get(vnc))
        .with_state(StandIn { vms, display })
}

/// Every VM's display is the stand-in display, raw over an upgrade as the
/// real agent does.
async fn vnc(
    State(s): State<StandIn>,
    mut req: axum::extract::Request,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let Ok(display) = tokio::net::UnixStream::connect(&s.display).await else {
        return axum::http::StatusCode::BAD_GATEWAY.into_response();
    };
    let up = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        if let Ok(u) = up.await {
            let mut u = hyper_util::rt::TokioIo::new(u);
            let mut d = display;
            let _ = tokio::io::copy_bidirectional(&mut u, &mut d).await;
        }
    });
    let mut r = axum::http::StatusCode::SWITCHING_PROTOCOLS.into_response();
    r.headers_mut().insert(
        axum::http::header::CONNECTION,
        axum::http::HeaderValue::from_static("upgrade"),
    );
    r.headers_mut().insert(
        axum::http::header::UPGRADE,
        axum::http::HeaderValue::from_static(lamina_broker::agent::VNC_UPGRADE),
    );
    r
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Runs the benchmark in `work` with `users` users.
///
/// # Errors
/// A part fails to start.
pub fn run(exe: &Path, work: &Path, users: usize, note: &dyn Fn(&str)) -> anyhow::Result<Report> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .worker_threads(2)
        .build()?;
    let vms: Vms = Arc::default();
    let agent = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
    let agent_url = format!("http://{}", agent.local_addr()?);
    let display = work.join("display.sock");
    super::screens::display(&rt, &display)?;
    let d = display.clone();
    rt.spawn(async move {
        let _ = axum::serve(agent, stand_in(vms, d)).await;
    });

    let (ca, cert, key) = make_certs(&work.join("certs"))?;
    let root = work.join("central");
    Store::init(&root)?;
    let tokens = {
        let store = Store::open(&root, &OpenOptions::new(Access::Write))?;
        store.add_group("crowd")?;
        let mut tokens = Vec::new();
        for i in 0..users {
            let name = format!("user{i:04}");
            store.add_user(&name, false, &["crowd".to_owned()])?;
            tokens.push(store.create_token(&name, None)?.0);
        }
        store.add_host("standin", &agent_url, "unused", None)?;
        let n = u32::try_from(users).unwrap_or(u32::MAX);
        let rules = Rules {
            min_idle: n,
            max: n.saturating_add(10),
            per_user: 1,
            stateless: true,
            idle_timeout: None,
            windows: Vec::new(),
        };
        store.create_pool("bench", "t", "os/none", rules)?;
        store.subscribe("bench", &Principal::Group("crowd".into()))?;
        tokens
    };
    note(&format!("{users} users; starting the server"));
    let mut child = Command::new(exe)
        .arg("--store")
        .arg(&root)
        .args([
            "--json",
            "server",
            "--listen",
            "127.0.0.1:0",
            "--rules-interval",
            "1s",
            "--tls-cert",
        ])
        .arg(&cert)
        .arg("--tls-key")
        .arg(&key)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let mut line = String::new();
    BufReader::new(child.stdout.take().context("server stdout")?).read_line(&mut line)?;
    let server = Proc(child);
    let v: serde_json::Value = serde_json::from_str(&line).context("the server did not start")?;
    let url = v["url"].as_str().context("server url")?.to_owned();

    // Wait until the rule engine has the pool's idle VMs.
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let store = Store::open(&root, &OpenOptions::new(Access::Read))?;
        let idle = store.members()?.iter().filter(|m| m.is_idle()).count();
        if idle >= users {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the pool did not fill: {idle} of {users} idle"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    note("pool filled; every user asks at once");

    let pem = std::fs::read(&ca)?;
    let http = reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(&pem)?)
        .pool_max_idle_per_host(users)
        .build()?;
    let target = format!("{url}/api/v1/pools/bench/desktop");
    let t0 = Instant::now();
    let results: Vec<(f64, Result<String, String>)> = rt.block_on(async {
        // One task per user, all started before any is awaited.
        let tasks: Vec<_> = tokens
            .iter()
            .map(|tok| {
                let http = http.clone();
                let target = target.clone();
                let tok = tok.clone();
                tokio::spawn(async move {
                    let t = Instant::now();
                    let r = match http.post(&target).bearer_auth(&tok).send().await {
                        Ok(resp) if resp.status().is_success() => {
                            let body = resp.bytes().await.unwrap_or_default();
                            let v: serde_json::Value =
                                serde_json::from_slice(&body).unwrap_or_default();
                            Ok(v["session"]["vm"].as_str().unwrap_or("").to_owned())
                        }
                        Ok(resp) => Err(format!(
                            "HTTP {}: {}",
                            resp.status(),
                            resp.text().await.unwrap_or_default()
                        )),
                        Err(e) => Err(e.to_string()),
                    };
                    (t.elapsed().as_secs_f64() * 1000.0, r)
                })
            })
            .collect();
        let mut out = Vec::with_capacity(tasks.len());
        for t in tasks {
            out.push(t.await.unwrap_or((0.0, Err("task failed".into()))));
        }
        out
    });
    let wall_ms = t0.elapsed().as_secs_f64() * 1000.0;
    let screens = match screens_of(
        &rt, &http, &url, &server, &tokens, &ca, &cert, &key, &display, note,
    ) {
        Ok(s) => Some(s),
        Err(e) => {
            note(&format!("screens not measured: {e:#}"));
            None
        }
    };
    drop(server);
    let mut ms: Vec<f64> = results.iter().map(|r| r.0).collect();
    ms.sort_by(f64::total_cmp);
    let got: Vec<&String> = results.iter().filter_map(|r| r.1.as_ref().ok()).collect();
    let distinct: std::collections::HashSet<&&String> = got.iter().collect();
    Ok(Report {
        users,
        desktops: got.len(),
        errors: results.iter().filter(|r| r.1.is_err()).count(),
        distinct_vms: distinct.len(),
        p50_ms: percentile(&ms, 0.5),
        p99_ms: percentile(&ms, 0.99),
        max_ms: ms.last().copied().unwrap_or(0.0),
        wall_ms,
        first_error: results.iter().find_map(|r| r.1.as_ref().err().cloned()),
        screens,
    })
}

#[allow(clippy::too_many_arguments)]
fn screens_of(
    rt: &tokio::runtime::Runtime,
    http: &reqwest::Client,
    url: &str,
    server: &Proc,
    tokens: &[String],
    ca: &Path,
    cert: &Path,
    key: &Path,
    display: &Path,
    note: &dyn Fn(&str),
) -> anyhow::Result<super::screens::Screens> {
    let token = tokens.first().context("no users")?;
    let sessions: serde_json::Value = rt
        .block_on(async {
            http.get(format!("{url}/api/v1/sessions"))
                .bearer_auth(token)
                .send()
                .await?
                .error_for_status()?
                .bytes()
                .await
        })
        .map(|b| serde_json::from_slice(&b).unwrap_or_default())?;
    let session = sessions[0]["id"].as_str().context("the user's session")?;
    let t = super::screens::Target {
        url,
        pid: server.0.id(),
        token,
        session,
        ca,
        cert,
        key,
        display,
    };
    super::screens::run(rt, http, &t, note)
}

/// The report as a table.
pub fn render(r: &Report) -> String {
    let mut s = format!(
        "broker allocation, {} distinct users at once, idle VMs ready (stand-in host agent)\n\
         desktops {}  errors {}  distinct VMs {}\n\
         latency p50 {:.1} ms  p99 {:.1} ms  max {:.1} ms  (all answered in {:.0} ms)\n",
        r.users, r.desktops, r.errors, r.distinct_vms, r.p50_ms, r.p99_ms, r.max_ms, r.wall_ms
    );
    if let Some(e) = &r.first_error {
        s += &format!("first error: {e}\n");
    }
    if let Some(sc) = &r.screens {
        s += &super::screens::render(sc);
    }
    s
}
