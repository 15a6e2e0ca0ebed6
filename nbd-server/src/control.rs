//! A served disk's control socket, `STORE/disks/<id>/control.sock` (see
//! `lamina_sync::control`): how `lamina disk commit` reaches the process
//! serving the disk, which commits it while the VM keeps running (see
//! `commit`).

use std::path::PathBuf;
use std::sync::Weak;
use std::time::Duration;

use lamina_sync::{Access, LockWait, OpenOptions, Store};
use serde::{Deserialize, Serialize};

use crate::commit::{commit_served, CommitReport};
use crate::disk::{self, DiskRecord};
use crate::error::{Error, Result};
use crate::export::DiskExport;

/// Longest a commit request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(900);

#[derive(Serialize, Deserialize)]
struct Request {
    message: String,
    author: String,
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
    lamina_sync::control::serve(&socket, "lamina-disk-control", move |r: Request| {
        let export = export.upgrade().ok_or("the disk is no longer served")?;
        commit(&root, &rec, &export, &r).map_err(|e| e.to_string())
    })?;
    Ok(())
}

fn commit(
    root: &std::path::Path,
    rec: &DiskRecord,
    export: &DiskExport,
    r: &Request,
) -> Result<CommitReport> {
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
/// [`Error::Served`]: the serving process's commit failed.
pub fn request_commit(
    store: &Store,
    rec: &DiskRecord,
    message: &str,
    author: &str,
) -> Result<Option<CommitReport>> {
    let req = Request {
        message: message.to_owned(),
        author: author.to_owned(),
    };
    match lamina_sync::control::request(&rec.control_socket(store), &req, REQUEST_TIMEOUT)? {
        None => Ok(None),
        Some(Ok(r)) => Ok(Some(r)),
        Some(Err(reason)) => Err(Error::Served {
            name: rec.name.clone(),
            reason,
        }),
    }
}
