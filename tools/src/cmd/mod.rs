//! Command implementations, one module per noun.

pub mod broker;
pub mod bundle;
pub mod compose;
pub mod conflicts;
pub mod desktop;
pub mod disk;
pub mod disseminate;
pub mod hotel;
pub mod identity;
pub mod layer;
pub mod mirror;
pub mod remote;
pub mod serve;
pub mod server;
pub mod store;
pub mod sync;
pub mod vm;

use std::path::PathBuf;

use anyhow::Context;
use lamina_sync::{Access, LockWait, OpenOptions, Store};

use crate::cli::Cli;
use crate::output::{Out, UsageError};

/// The store directory: `--store`, else `$LAMINA_STORE` (both via clap),
/// else `$XDG_DATA_HOME/lamina`, else `~/.local/share/lamina`.
pub fn store_path(cli: &Cli) -> anyhow::Result<PathBuf> {
    if let Some(p) = &cli.store {
        // `dir:PATH` names a store the way a mirror target does.
        return Ok(match p.to_str().and_then(|s| s.strip_prefix("dir:")) {
            Some(rest) => PathBuf::from(rest),
            None => p.clone(),
        });
    }
    if let Some(x) = std::env::var_os("XDG_DATA_HOME").filter(|x| !x.is_empty()) {
        return Ok(PathBuf::from(x).join("lamina"));
    }
    let home = std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .ok_or_else(|| {
            UsageError("no store given: pass --store or set LAMINA_STORE or HOME".into())
        })?;
    Ok(PathBuf::from(home).join(".local/share/lamina"))
}

/// `user@host` for version authors when none is given.
pub fn default_author() -> String {
    let user = std::env::var("USER")
        .ok()
        .filter(|u| !u.is_empty())
        .or_else(|| {
            nix::unistd::User::from_uid(nix::unistd::getuid())
                .ok()
                .flatten()
                .map(|u| u.name)
        })
        .unwrap_or_else(|| "unknown".into());
    let host = nix::unistd::gethostname()
        .ok()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_else(|| "localhost".into());
    format!("{user}@{host}")
}

/// Opens the store for `access`, waiting for (and saying who holds) a lock
/// unless `--no-wait`.
pub fn open(cli: &Cli, out: &Out, access: Access) -> anyhow::Result<Store> {
    let wait = if cli.no_wait {
        LockWait::Fail
    } else {
        LockWait::Wait(None)
    };
    open_with(cli, out, access, wait)
}

/// Opens the store for `access`, waiting for a lock as `wait` says.
pub fn open_with(cli: &Cli, out: &Out, access: Access, wait: LockWait) -> anyhow::Result<Store> {
    let path = store_path(cli)?;
    let quiet = out.quiet;
    let notice = move |holder: &str| {
        if !quiet {
            eprintln!("waiting for the store lock, held by {holder}");
        }
    };
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    let opts = OpenOptions {
        access,
        wait,
        notice: &notice,
        command,
    };
    Store::open(&path, &opts).with_context(|| format!("opening store {}", path.display()))
}

/// A token file's token (trimmed; an empty file is a usage error).
pub fn read_token_file(path: &std::path::Path) -> anyhow::Result<String> {
    let token = std::fs::read_to_string(path)
        .with_context(|| format!("reading the token file {}", path.display()))?
        .trim()
        .to_owned();
    if token.is_empty() {
        return Err(UsageError(format!("the token file {} is empty", path.display())).into());
    }
    Ok(token)
}

/// The PEM of a `--ca` file, if given.
pub fn read_ca(path: Option<&std::path::Path>) -> anyhow::Result<Option<String>> {
    path.map(|p| {
        std::fs::read_to_string(p)
            .with_context(|| format!("reading the CA certificate {}", p.display()))
    })
    .transpose()
}
