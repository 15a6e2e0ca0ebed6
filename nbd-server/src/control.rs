//! A served disk's control socket, `STORE/disks/<id>/control.sock`: how
//! `lamina disk commit` reaches the process serving the disk, which commits
//! it while the VM keeps running (see `commit`).
//!
//! One request per connection, one JSON line each way.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};
use std::time::Duration;

use lamina_sync::{Access, LockWait, OpenOptions, Store};
use serde::{Deserialize, Serialize};

use crate::commit::{commit_served, CommitReport};
use crate::disk::{self, DiskRecord};
use crate::error::{Error, IoContext, Result};
use crate::export::DiskExport;

/// Longest a commit request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(900);

#[derive(Serialize, Deserialize)]
struct Request {
    op: String,
    message: String,
    author: String,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Answer {
    Ok(Box<CommitReport>),
    Error(String),
}

/// Serves commit requests for `export` (disk `rec` of the store at
/// `root`) while the export lives.
///
/// # Errors
/// The socket cannot be made.
pub fn serve(
    root: PathBuf,
    rec: DiskRecord,
    socket: PathBuf,
    export: Weak<DiskExport>,
) -> Result<()> {
    // A socket left by a process that died: nobody listens on it.
    let _ = std::fs::remove_file(&socket);
    let listener = UnixListener::bind(&socket).ctx(&socket, "listen on the control socket")?;
    std::thread::Builder::new()
        .name("lamina-disk-control".into())
        .spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let Some(export) = export.upgrade() else {
                    return;
                };
                if let Err(e) = answer(&root, &rec, &export, conn) {
                    tracing::warn!(disk = %rec.name, error = %e, "control request failed");
                }
            }
        })
        .map_err(|e| Error::io(&socket, "start the control thread", e))?;
    Ok(())
}

fn answer(
    root: &Path,
    rec: &DiskRecord,
    export: &Arc<DiskExport>,
    conn: UnixStream,
) -> std::io::Result<()> {
    let mut line = String::new();
    BufReader::new(&conn).read_line(&mut line)?;
    let answer = match serde_json::from_str::<Request>(&line) {
        Ok(r) if r.op == "commit" => match commit(root, rec, export, &r) {
            Ok(report) => Answer::Ok(Box::new(report)),
            Err(e) => Answer::Error(e.to_string()),
        },
        Ok(r) => Answer::Error(format!("unknown request `{}`", r.op)),
        Err(e) => Answer::Error(format!("malformed request: {e}")),
    };
    let mut out = serde_json::to_vec(&answer).map_err(std::io::Error::other)?;
    out.push(b'\n');
    (&conn).write_all(&out)
}

fn commit(root: &Path, rec: &DiskRecord, export: &DiskExport, r: &Request) -> Result<CommitReport> {
    let store = Store::open(
        root,
        &OpenOptions {
            access: Access::Write,
            wait: LockWait::Wait(Some(Duration::from_secs(120))),
            notice: &|holder| tracing::info!(holder, "commit waits for the store lock"),
            command: format!("lamina serve (commit of {})", rec.name),
        },
    )?;
    let rec = disk::get(&store, &rec.name)?;
    let report = commit_served(&store, &rec, export, &r.message, &r.author)?;
    tracing::info!(disk = %rec.name, clusters = report.clusters, "committed while served");
    Ok(report)
}

/// Asks the process serving disk `rec` to commit it. `None` when no
/// process serves it.
///
/// # Errors
/// The serving process's commit failed or it could not be reached.
pub fn request_commit(
    store: &Store,
    rec: &DiskRecord,
    message: &str,
    author: &str,
) -> Result<Option<CommitReport>> {
    let path = rec.control_socket(store);
    let conn = match UnixStream::connect(&path) {
        Ok(c) => c,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(None)
        }
        Err(e) => return Err(Error::io(&path, "reach the serving process", e)),
    };
    conn.set_read_timeout(Some(REQUEST_TIMEOUT))
        .ctx(&path, "set a timeout")?;
    let req = Request {
        op: "commit".into(),
        message: message.to_owned(),
        author: author.to_owned(),
    };
    let mut bytes = serde_json::to_vec(&req).map_err(|e| Error::InvalidInput(e.to_string()))?;
    bytes.push(b'\n');
    (&conn)
        .write_all(&bytes)
        .ctx(&path, "send to the serving process")?;
    let mut line = String::new();
    BufReader::new(&conn)
        .read_line(&mut line)
        .ctx(&path, "read the serving process's answer")?;
    match serde_json::from_str::<Answer>(&line) {
        Ok(Answer::Ok(r)) => Ok(Some(*r)),
        Ok(Answer::Error(e)) => Err(Error::Served {
            name: rec.name.clone(),
            reason: e,
        }),
        Err(e) => Err(Error::Served {
            name: rec.name.clone(),
            reason: format!("unreadable answer {line:?}: {e}"),
        }),
    }
}
