//! `lamina server`: this store over HTTPS. The routers come from library
//! crates (the sync API from `lamina-sync`); this file only wires them to a
//! listener.

use std::net::SocketAddr;
use std::process::ExitCode;

use lamina_sync::api::{self, ApiState};

use crate::cli::{Cli, ServerArgs};
use crate::cmd::store_path;
use crate::output::{Out, UsageError};

pub fn run(cli: &Cli, out: &Out, a: &ServerArgs) -> anyhow::Result<ExitCode> {
    let addr: SocketAddr = a.listen.parse().map_err(|e| {
        UsageError(format!(
            "bad --listen `{}`: {e} (expected HOST:PORT)",
            a.listen
        ))
    })?;
    let tls = match (&a.tls_cert, &a.tls_key, a.insecure) {
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
    let root = store_path(cli)?;
    let state = ApiState::open(&root)
        .map_err(|e| anyhow::anyhow!(e).context(format!("opening store {}", root.display())))?;
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .worker_threads(cores.max(2))
        .max_blocking_threads(cores * 8)
        .thread_name("lamina-server")
        .build()?;
    let router = api::router(state.clone());
    let json = out.json;
    let result = rt.block_on(async move {
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
            println!("serving {} on {url}", root.display());
        }
        api::serve(router, listener, tls, super::serve::stop_signal()).await?;
        anyhow::Ok(())
    });
    state.gate.close();
    result?;
    Ok(ExitCode::SUCCESS)
}
