//! `lamina server` and `lamina host-agent`: this store over HTTPS. The
//! routers come from library crates (the sync API from `lamina-sync`, the
//! broker's API and the host agent from `lamina-broker`); this file only
//! wires them to a listener.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use lamina_broker::agent::{self, AgentState, HostOps};
use lamina_broker::api::BrokerState;
use lamina_broker::console::ConsoleState;
use lamina_broker::Broker;
use lamina_sync::api::{self, ApiState};

use crate::cli::{Cli, HostAgentArgs, ServerArgs, TlsArgs};
use crate::cmd::store_path;
use crate::output::{Out, UsageError};

/// The address and TLS set-up of a listener, checked.
fn listener_config(
    listen: &str,
    t: &TlsArgs,
) -> anyhow::Result<(SocketAddr, Option<Arc<rustls::ServerConfig>>)> {
    let addr: SocketAddr = listen
        .parse()
        .map_err(|e| UsageError(format!("bad --listen `{listen}`: {e} (expected HOST:PORT)")))?;
    let tls = match (t.tls_cert.as_deref(), t.tls_key.as_deref(), t.insecure) {
        (Some(c), Some(k), false) => Some(api::tls_config(c, k)?),
        (None, None, true) => {
            if !addr.ip().is_loopback() {
                return Err(UsageError(format!(
                    "--insecure serves plain HTTP, which is only allowed on a loopback address, not {}",
                    addr.ip()
                ))
                .into());
            }
            None
        }
        _ => {
            return Err(UsageError(
                "give --tls-cert and --tls-key (or --insecure for plain HTTP on loopback)".into(),
            )
            .into())
        }
    };
    Ok((addr, tls))
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .worker_threads(cores.max(2))
        .max_blocking_threads(cores * 8)
        .thread_name("lamina-server")
        .build()?)
}

/// Binds, says where (one JSON line with `--json`), serves until SIGTERM.
async fn listen_and_serve(
    router: axum::Router,
    addr: SocketAddr,
    tls: Option<Arc<rustls::ServerConfig>>,
    json: bool,
    what: &str,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e}"))?;
    let bound = listener.local_addr()?;
    let url = format!("{}://{bound}", if tls.is_some() { "https" } else { "http" });
    if json {
        println!(
            "{}",
            serde_json::json!({"listening": bound, "url": url, "tls": tls.is_some()})
        );
    } else {
        println!("serving {what} on {url}");
    }
    api::serve(router, listener, tls, super::serve::stop_signal()).await?;
    Ok(())
}

fn open_state(root: &Path) -> anyhow::Result<ApiState> {
    ApiState::open(root)
        .map_err(|e| anyhow::anyhow!(e).context(format!("opening store {}", root.display())))
}

pub fn run(cli: &Cli, out: &Out, a: &ServerArgs) -> anyhow::Result<ExitCode> {
    let (addr, tls) = listener_config(&a.listen, &a.tls)?;
    let every = humantime::parse_duration(&a.rules_interval)
        .map_err(|e| UsageError(format!("bad --rules-interval {:?}: {e}", a.rules_interval)))?;
    let mirror_every = humantime::parse_duration(&a.mirror_interval).map_err(|e| {
        UsageError(format!(
            "bad --mirror-interval {:?}: {e}",
            a.mirror_interval
        ))
    })?;
    let root = store_path(cli)?;
    let state = open_state(&root)?;
    let rt = runtime()?;
    let broker = Broker::new(state.gate.clone());
    let bstate = BrokerState {
        api: state.clone(),
        broker: broker.clone(),
    };
    let console = ConsoleState::new(bstate.clone(), a.novnc_dir.clone(), tls.is_some());
    if !a.novnc_dir.join("core/rfb.js").is_file() {
        tracing::warn!(dir = %a.novnc_dir.display(), "no noVNC here (core/rfb.js): the console cannot show screens; apt-get install novnc or give --novnc-dir");
    }
    let router = api::router(state.clone())
        .merge(lamina_broker::api::router(bstate))
        .merge(lamina_broker::console::router(console));
    let json = out.json;
    let what = root.display().to_string();
    let stop_mirrors = Arc::new(AtomicBool::new(false));
    let mirrors = super::mirror::spawn_loop(
        state.gate.clone(),
        mirror_every.max(Duration::from_millis(100)),
        stop_mirrors.clone(),
    )?;
    let result = rt.block_on(async move {
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let engine = tokio::spawn(broker.run(every.max(Duration::from_millis(100)), async {
            let _ = stop_rx.await;
        }));
        let served = listen_and_serve(router, addr, tls, json, &what).await;
        let _ = stop_tx.send(());
        let _ = engine.await;
        served
    });
    // A pass cut here is resumed by the next server's first round.
    stop_mirrors.store(true, Ordering::Relaxed);
    let _ = mirrors.join();
    state.gate.close();
    result?;
    Ok(ExitCode::SUCCESS)
}

pub fn host_agent(cli: &Cli, out: &Out, a: &HostAgentArgs) -> anyhow::Result<ExitCode> {
    let (addr, tls) = listener_config(&a.listen, &a.tls)?;
    let root = store_path(cli)?;
    let state = open_state(&root)?;
    let lamina: PathBuf = std::env::current_exe()?;
    let ops = HostOps::new(lamina, root.clone(), a.memory.map(|m| m * 1024 * 1024));
    let router = agent::router(AgentState::new(state.clone(), ops));
    let rt = runtime()?;
    let what = format!("the VMs of {}", root.display());
    let result = rt.block_on(listen_and_serve(router, addr, tls, out.json, &what));
    state.gate.close();
    result?;
    Ok(ExitCode::SUCCESS)
}
