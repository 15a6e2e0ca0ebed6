//! `lamina serve`.

use std::process::ExitCode;
use std::sync::Arc;

use lamina_nbd::proto::handshake::Exports;
use lamina_nbd::server::{serve, tls_acceptor, FileExports, Listen, StoreExports};
use lamina_sync::Access;

use crate::cli::{Cli, ServeArgs};
use crate::cmd::open;
use crate::output::Out;

/// Default NBD address (the IANA port, loopback only).
const DEFAULT_LISTEN: &str = "127.0.0.1:10809";

pub fn run(cli: &Cli, out: &Out, a: &ServeArgs) -> anyhow::Result<ExitCode> {
    let listen = Listen {
        tcp: a
            .listen
            .clone()
            .or_else(|| a.socket.is_none().then(|| DEFAULT_LISTEN.to_owned())),
        unix: a.socket.clone(),
    };
    let tls = match (&a.tls_cert, &a.tls_key) {
        (Some(c), Some(k)) => Some(tls_acceptor(c, k)?),
        _ => None,
    };
    let (exports, close): (Arc<dyn Exports>, Box<dyn Fn()>) = match &a.file {
        Some(file) => {
            let e = Arc::new(FileExports::open(file, &a.export, !a.read_only)?);
            let c = e.clone();
            (e, Box::new(move || c.close_all()))
        }
        None => {
            crate::cmd::hotel::touch(cli, out, |store| {
                Ok(lamina_nbd::disk::list(store)?
                    .into_iter()
                    .filter_map(|d| d.base.map(|b| b.layer))
                    .collect())
            });
            let store = Arc::new(open(cli, out, Access::Serve)?);
            let e = Arc::new(StoreExports::new(store, a.read_only).prefetch(!a.no_prefetch));
            let c = e.clone();
            (e, Box::new(move || c.close_all()))
        }
    };
    // Export I/O runs on the blocking pool; a few threads per core keep the
    // disks busy without hundreds of idle threads holding memory.
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .max_blocking_threads(cores * 4)
        .build()?;
    let json = out.json;
    let result = rt.block_on(serve(
        exports,
        &listen,
        tls,
        |bound| {
            if json {
                println!("{}", serde_json::json!({"listening": bound}));
            } else {
                let mut places = Vec::new();
                if let Some(t) = bound.tcp {
                    places.push(format!("nbd://{t}/"));
                }
                if let Some(u) = &bound.unix {
                    places.push(format!("nbd+unix:///?socket={}", u.display()));
                }
                println!("serving on {}", places.join(" and "));
            }
        },
        stop_signal(),
    ));
    close();
    result?;
    Ok(ExitCode::SUCCESS)
}

/// Resolves on SIGINT or SIGTERM.
pub(crate) async fn stop_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
}
