//! The mount daemon's control socket, `STORE/compositions/<id>/control.sock`:
//! how `lamina commit` reaches a composition that is mounted.
//!
//! One request per connection, one JSON line each way. The daemon commits
//! with its namespace frozen (no lookup, create, rename or unlink runs
//! meanwhile; reads and writes of open files go on) so the tree it reads is
//! the tree the mount showed at that moment; a file that changes while it
//! is read is left for the next commit (see `commit`). The socket is only
//! reachable by whoever can reach the store directory.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use lamina_sync::{Access, LockWait, NoProgress, OpenOptions, Store};
use serde::{Deserialize, Serialize};

use crate::commit::{commit_uppers, CommitReport};
use crate::compose::{self, Composition};
use crate::error::{Error, IoContext, Result};
use crate::view::View;

/// Longest a commit request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(900);

#[derive(Serialize, Deserialize)]
struct Request {
    op: String,
    message: Option<String>,
    author: String,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Answer {
    Ok(CommitReport),
    Error(String),
}

/// Path of a composition's control socket.
pub(crate) fn socket_path(store_root: &Path, comp: &Composition) -> PathBuf {
    comp.dir(store_root).join("control.sock")
}

/// Serves commit requests for the mount of `comp` until the process ends.
pub(crate) fn serve(store_root: PathBuf, comp: Composition, view: Arc<View>) -> Result<()> {
    let path = socket_path(&store_root, &comp);
    // A socket left by a daemon that died: nobody listens on it.
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).ctx(&path, "listen on the control socket")?;
    std::thread::Builder::new()
        .name("lamina-control".into())
        .spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                if let Err(e) = answer(&store_root, &comp, &view, conn) {
                    tracing::warn!(error = %e, "control request failed");
                }
            }
        })
        .map_err(|e| Error::io(&path, "start the control thread", e))?;
    Ok(())
}

fn answer(
    store_root: &Path,
    comp: &Composition,
    view: &View,
    conn: UnixStream,
) -> std::io::Result<()> {
    let mut line = String::new();
    BufReader::new(&conn).read_line(&mut line)?;
    let answer = match serde_json::from_str::<Request>(&line) {
        Ok(r) if r.op == "commit" => match commit_live(store_root, comp, view, &r) {
            Ok(report) => Answer::Ok(report),
            Err(e) => Answer::Error(e.to_string()),
        },
        Ok(r) => Answer::Error(format!("unknown request `{}`", r.op)),
        Err(e) => Answer::Error(format!("malformed request: {e}")),
    };
    let mut out = serde_json::to_vec(&answer).map_err(std::io::Error::other)?;
    out.push(b'\n');
    (&conn).write_all(&out)
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
    tracing::info!(
        composition = %comp.name,
        busy = report.busy.len(),
        "committed while mounted"
    );
    Ok(report)
}

/// Asks the daemon of mounted composition `comp` to commit.
///
/// # Errors
/// The daemon cannot be reached, or its commit failed.
pub(crate) fn request_commit(
    store_root: &Path,
    comp: &Composition,
    message: Option<&str>,
    author: &str,
) -> Result<CommitReport> {
    let path = socket_path(store_root, comp);
    let conn = UnixStream::connect(&path).ctx(&path, "reach the mount daemon")?;
    conn.set_read_timeout(Some(REQUEST_TIMEOUT))
        .ctx(&path, "set a timeout")?;
    let req = Request {
        op: "commit".into(),
        message: message.map(str::to_owned),
        author: author.to_owned(),
    };
    let mut bytes = serde_json::to_vec(&req).map_err(|e| Error::Invalid(e.to_string()))?;
    bytes.push(b'\n');
    (&conn)
        .write_all(&bytes)
        .ctx(&path, "send to the mount daemon")?;
    let mut line = String::new();
    BufReader::new(&conn)
        .read_line(&mut line)
        .ctx(&path, "read the mount daemon's answer")?;
    match serde_json::from_str::<Answer>(&line) {
        Ok(Answer::Ok(r)) => Ok(r),
        Ok(Answer::Error(e)) => Err(Error::Daemon(format!(
            "the mount daemon of {} could not commit: {e}",
            comp.name
        ))),
        Err(e) => Err(Error::Daemon(format!(
            "the mount daemon of {} answered {line:?}: {e}",
            comp.name
        ))),
    }
}
