//! `lamina`: the command line of Lamina.
//!
//! Data goes to stdout, diagnostics to stderr. With `--json` every command
//! prints exactly one JSON document on stdout (errors too:
//! `{"error":{"kind":…,"message":…}}`). Exit codes: 0 success, 1 the
//! operation failed, 2 a usage or configuration error (see [`exit_code`]).

mod bench;
mod cli;
mod cmd;
mod output;
mod progress;

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use lamina_sync::ErrorKind;

use crate::cli::{Cli, Command};
use crate::output::Out;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            // clap prints help/version on stdout (exit 0) and errors on
            // stderr (exit 2).
            let code = if e.use_stderr() { 2 } else { 0 };
            // Nothing useful to do if the terminal is gone.
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    // The mount daemon's stderr is its log file: colours only on a terminal.
    // fuser warns when the mount it would unmount at exit is already gone
    // (`lamina umount` removed it): not worth a line by default.
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
                // A server logs a line per request by default.
                tracing_subscriber::EnvFilter::new(match cli.command {
                    Command::Server(_) | Command::HostAgent(_) => {
                        "info,hyper=warn,h2=warn,rustls=warn"
                    }
                    _ => "warn,fuser=error",
                })
            }),
        )
        .init();
    let out = Out::new(cli.json, cli.quiet);
    let result = run(&cli, &out);
    match result {
        Ok(code) => code,
        Err(e) => {
            out.error(&e);
            ExitCode::from(exit_code(&e))
        }
    }
}

/// Maps an error to the process exit code: 2 for usage and configuration
/// errors, 1 for everything else.
pub(crate) fn exit_code(e: &anyhow::Error) -> u8 {
    let sync = e.downcast_ref::<lamina_sync::Error>().or_else(|| {
        match e.downcast_ref::<lamina_nbd::Error>() {
            Some(lamina_nbd::Error::Store(s)) => Some(s),
            _ => None,
        }
    });
    match (sync, e.downcast_ref::<lamina_nbd::Error>()) {
        (Some(lamina_sync::Error::NotAStore { .. }), _) => 2,
        // The remote refused or failed: the operation failed, the command
        // line was fine.
        (
            Some(
                lamina_sync::Error::RemoteRefused { .. }
                | lamina_sync::Error::RemoteUnreachable { .. },
            ),
            _,
        ) => 1,
        (Some(err), _) if err.kind() == ErrorKind::InvalidInput => 2,
        (None, Some(lamina_nbd::Error::InvalidInput(_))) => 2,
        _ if matches!(
            e.downcast_ref::<lamina_fs::Error>(),
            Some(
                lamina_fs::Error::Invalid(_)
                    | lamina_fs::Error::Rules { .. }
                    | lamina_fs::Error::MountPoint { .. }
            )
        ) =>
        {
            2
        }
        _ if e.downcast_ref::<output::UsageError>().is_some() => 2,
        _ if e
            .downcast_ref::<lamina_vm::Error>()
            .is_some_and(lamina_vm::Error::is_invalid_input) =>
        {
            2
        }
        _ => 1,
    }
}

fn run(cli: &Cli, out: &Out) -> anyhow::Result<ExitCode> {
    match &cli.command {
        Command::Init(args) => cmd::store::init(cli, args, out),
        Command::Layer(c) => cmd::layer::run(cli, out, c),
        Command::Disk(c) => cmd::disk::run(cli, out, c),
        Command::Serve(a) => cmd::serve::run(cli, out, a),
        Command::Compose(c) => cmd::compose::run(cli, out, c),
        Command::Mount(a) => cmd::compose::mount(cli, out, a),
        Command::Umount { dir } => cmd::compose::umount(cli, out, dir),
        Command::Status { name } => cmd::compose::status(cli, out, name),
        Command::Commit(a) => cmd::compose::commit(cli, out, a),
        Command::Fsck => cmd::store::fsck(cli, out),
        Command::Gc(args) => cmd::store::gc(cli, out, args),
        Command::Vm(c) => cmd::vm::run(cli, out, c),
        Command::Store(c) => cmd::store::store(cli, out, c),
        Command::Mirror(c) => cmd::mirror::run(cli, out, c),
        Command::Bench(c) => bench::run(cli, out, c),
        Command::Hotel(c) => cmd::hotel::run(cli, out, c),
        Command::Bundle(c) => cmd::bundle::run(cli, out, c),
        Command::Disseminate(a) => cmd::disseminate::disseminate(cli, out, a),
        Command::Collect(a) => cmd::disseminate::collect(cli, out, a),
        Command::Server(a) => cmd::server::run(cli, out, a),
        Command::User(c) => cmd::identity::user(cli, out, c),
        Command::Group(c) => cmd::identity::group(cli, out, c),
        Command::Token(c) => cmd::identity::token(cli, out, c),
        Command::Remote(c) => cmd::remote::run(cli, out, c),
        Command::Key(c) => cmd::remote::key(cli, out, c),
        Command::Pull(a) => cmd::sync::transfer(cli, out, a, lamina_sync::remote::Mode::Pull),
        Command::Push(a) => cmd::sync::transfer(cli, out, a, lamina_sync::remote::Mode::Push),
        Command::Sync(a) => cmd::sync::sync(cli, out, a),
        Command::Conflicts(c) => cmd::conflicts::run(cli, out, c),
        Command::HostAgent(a) => cmd::server::host_agent(cli, out, a),
        Command::Host(c) => cmd::broker::host(cli, out, c),
        Command::Pool(c) => cmd::broker::pool(cli, out, c),
        Command::Session(c) => cmd::broker::session(cli, out, c),
        Command::Audit(c) => cmd::broker::audit(cli, out, c),
        Command::Desktop(c) => cmd::desktop::run(cli, out, c),
    }
}
