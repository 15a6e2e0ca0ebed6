//! The mount daemon's control socket, `STORE/compositions/<id>/control.sock`
//! (see `lamina_sync::control`): how `lamina commit` reaches a composition
//! that is mounted.
//!
//! The daemon commits with its namespace frozen (no lookup, create, rename
//! or unlink runs meanwhile; reads and writes of open files go on), so the
//! tree it reads is the tree the mount showed at that moment; a file that
//! changes while it is read is left for the next commit (see `commit`).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use lamina_sync::{Access, LockWait, NoProgress, OpenOptions, Store};
use serde::{Deserialize, Serialize};

use crate::commit::{commit_uppers, CommitReport};
use crate::compose::{self, Composition};
use crate::error::{Error, Result};
use crate::view::View;

/// Longest a commit request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(900);

#[derive(Serialize, Deserialize)]
struct Request {
    message: Option<String>,
    author: String,
}

/// Path of a composition's control socket.
pub(crate) fn socket_path(store_root: &Path, comp: &Composition) -> PathBuf {
    comp.dir(store_root).join("control.sock")
}

/// Serves commit requests for the mount of `comp` until the process ends.
pub(crate) fn serve(store_root: PathBuf, comp: Composition, view: Arc<View>) -> Result<()> {
    let path = socket_path(&store_root, &comp);
    lamina_sync::control::serve(&path, "lamina-control", move |r: Request| {
        commit_live(&store_root, &comp, &view, &r).map_err(|e| e.to_string())
    })?;
    Ok(())
}

fn commit_live(
    store_root: &Path,
    comp: &Composition,
    view: &View,
    r: &Request,
) -> Result<CommitReport> {
    // The writer lock first: waiting for it must not freeze the mount.
    let store = Store::open(
        store_root,
        &OpenOptions {
            access: Access::Write,
            wait: LockWait::Wait(Some(Duration::from_secs(120))),
            notice: &|holder| tracing::info!(holder, "commit waits for the store lock"),
            command: format!("lamina mount {} (commit)", comp.name),
        },
    )?;
    let comp = compose::get(&store, &comp.name)?;
    let _frozen = view.lock();
    let report = commit_uppers(
        &store,
        &comp,
        r.message.as_deref(),
        &r.author,
        &NoProgress,
        true,
    )?;
    tracing::info!(composition = %comp.name, busy = report.busy.len(), "committed while mounted");
    Ok(report)
}

/// Asks the daemon of mounted composition `comp` to commit.
///
/// # Errors
/// [`Error::Daemon`]: the daemon is gone or its commit failed.
pub(crate) fn request_commit(
    store_root: &Path,
    comp: &Composition,
    message: Option<&str>,
    author: &str,
) -> Result<CommitReport> {
    let req = Request {
        message: message.map(str::to_owned),
        author: author.to_owned(),
    };
    match lamina_sync::control::request(&socket_path(store_root, comp), &req, REQUEST_TIMEOUT)? {
        Some(Ok(r)) => Ok(r),
        Some(Err(e)) => Err(Error::Daemon(format!(
            "the mount daemon of {} could not commit: {e}",
            comp.name
        ))),
        None => Err(Error::Daemon(format!(
            "the mount daemon of {} does not answer on its control socket",
            comp.name
        ))),
    }
}
