//! Pending conflicts (policy `manual`): what an admin sees and how a
//! choice becomes the merge.

use std::path::Path;

use serde::Serialize;

use super::conflict::{ConflictRecord, ConflictState};
use super::tree::{file_bytes, lookup};
use super::{Mediation, Take};
use crate::catalog::now_ns;
use crate::error::{Error, Result};
use crate::id::VersionId;
use crate::manifest::{EntryKind, Root};
use crate::progress::Progress;
use crate::store::Store;
use crate::version::Version;

/// Largest text file pre-merged for `conflicts show`.
const PREMERGE_LIMIT: u64 = 4 * 1024 * 1024;

/// How an admin settles a pending conflict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Choice {
    /// Take the server's side of every conflicting path.
    Server,
    /// Take the client's side of every conflicting path.
    Client,
    /// Take this file's content for the conflicting path.
    File(std::path::PathBuf),
}

/// One conflicting path as shown.
#[derive(Debug, Clone, Serialize)]
pub struct ShownItem {
    /// Path (or cluster range).
    pub path: String,
    /// How the sides differ.
    pub kind: super::ItemKind,
    /// For text files: the three-way merge, with diff3 conflict markers
    /// (`<<<<<<< ours` is the server, `>>>>>>> theirs` the client).
    pub premerged: Option<String>,
    /// Whether the pre-merge had no conflicting hunk.
    pub clean: bool,
}

fn tree_dir(store: &Store, v: VersionId) -> Result<Option<crate::id::ManifestId>> {
    Ok(match store.root_of(v)? {
        Root::Tree { dir, .. } => Some(dir),
        Root::Disk(_) => None,
    })
}

fn text_of(
    store: &Store,
    dir: Option<crate::id::ManifestId>,
    path: &str,
) -> Result<Option<String>> {
    let Some(dir) = dir else { return Ok(None) };
    let Some(entry) = lookup(store, dir, path)? else {
        return Ok(Some(String::new()));
    };
    let EntryKind::File { size, content, .. } = &entry.kind else {
        return Ok(None);
    };
    Ok(file_bytes(store, *size, content, PREMERGE_LIMIT)?.and_then(|b| String::from_utf8(b).ok()))
}

impl Store {
    /// The items of a conflict, text files pre-merged.
    ///
    /// # Errors
    /// Versions or manifests that cannot be read.
    pub fn show_conflict(&self, rec: &ConflictRecord) -> Result<Vec<ShownItem>> {
        let dirs = (
            match rec.base {
                Some(b) => tree_dir(self, b)?,
                None => None,
            },
            tree_dir(self, rec.server)?,
            tree_dir(self, rec.client)?,
        );
        let mut out = Vec::new();
        for item in &rec.items {
            let mut premerged = None;
            let mut clean = false;
            if dirs.1.is_some() {
                let base = match dirs.0 {
                    Some(_) => text_of(self, dirs.0, &item.path)?,
                    None => Some(String::new()),
                };
                let server = text_of(self, dirs.1, &item.path)?;
                let client = text_of(self, dirs.2, &item.path)?;
                if let (Some(b), Some(s), Some(c)) = (base, server, client) {
                    match diffy::merge(&b, &s, &c) {
                        Ok(text) => {
                            clean = true;
                            premerged = Some(text);
                        }
                        Err(text) => premerged = Some(text),
                    }
                }
            }
            out.push(ShownItem {
                path: item.path.clone(),
                kind: item.kind,
                premerged,
                clean,
            });
        }
        Ok(out)
    }

    /// Resolves pending conflict `id` on this store: merges the client's
    /// version into the layer's current head, every conflicting path taking
    /// `choice` (a file choice applies to `path`, or to the only
    /// conflicting path; the others take the server's side), and moves the
    /// head to the merge. Returns the new head.
    ///
    /// # Errors
    /// An unknown or settled conflict, a file choice without a path when
    /// several paths conflict, a head that moved meanwhile, store failures.
    pub fn resolve_conflict(
        &self,
        id: &str,
        choice: &Choice,
        path: Option<&str>,
        author: &str,
        progress: &dyn Progress,
    ) -> Result<(VersionId, ConflictRecord)> {
        let mut rec = self.conflict(id)?;
        if rec.state != ConflictState::Pending {
            return Err(Error::InvalidInput(format!(
                "conflict {} is already {}",
                rec.id,
                rec.state.as_str()
            )));
        }
        let layer = self.layer(&rec.layer)?;
        let head = self.head(&layer)?.ok_or_else(|| {
            Error::InvalidInput(format!("layer `{}` has no head to merge into", layer.name))
        })?;
        let file_path = match (choice, path) {
            (Choice::File(_), Some(p)) => Some(format!("/{}", p.trim_start_matches('/'))),
            (Choice::File(_), None) if rec.items.len() == 1 => Some(rec.items[0].path.clone()),
            (Choice::File(_), None) => {
                return Err(Error::InvalidInput(format!(
                "conflict {} has {} conflicting paths: name the one the file is for with --path",
                rec.id,
                rec.items.len()
            )))
            }
            _ => None,
        };
        if let Some(p) = &file_path {
            if !rec.items.iter().any(|i| &i.path == p) {
                return Err(Error::InvalidInput(format!(
                    "`{p}` is not a conflicting path of conflict {}",
                    rec.id
                )));
            }
        }
        let file = match choice {
            Choice::File(f) => Some(self.file_content(f, progress)?),
            _ => None,
        };
        let base = self.merge_base(head, rec.client)?;
        let now = now_ns();
        let merged = self.mediate(
            &Mediation {
                base,
                server: head,
                client: rec.client,
                host: &rec.host,
                now_ns: now,
            },
            &mut |c| {
                Ok(match (choice, &file) {
                    (Choice::Server, _) => Take::Server,
                    (Choice::Client, _) => Take::Client,
                    (Choice::File(_), Some(f)) if file_path.as_deref() == Some(c.path) => f.clone(),
                    _ => Take::Server,
                })
            },
        )?;
        let root = merged
            .root
            .ok_or_else(|| Error::InvalidInput("the resolution left a conflict open".into()))?;
        let how = match choice {
            Choice::Server => "server".to_owned(),
            Choice::Client => "client".to_owned(),
            Choice::File(f) => format!("file {}", f.display()),
        };
        let version = Version {
            layer: layer.id,
            parents: vec![head, rec.client],
            time_ns: now,
            author: author.to_owned(),
            message: format!("resolve conflict {} from {} (take {how})", rec.id, rec.host),
            root,
        };
        rec.state = ConflictState::Resolved;
        rec.items = merged.items;
        let mut batch = self.batch()?;
        let m = batch.put_version(&version)?;
        rec.merged = Some(m);
        batch.move_head(
            &layer,
            Some(head),
            m,
            &format!("resolve conflict {}", rec.id),
        )?;
        let kept = rec.kept_ref();
        if let Some(old) = self.ref_target(&kept)? {
            batch.move_ref(&kept, Some(old), None, "conflict resolved")?;
        }
        batch.put_conflict(&rec)?;
        self.commit(batch)?;
        Ok((m, rec))
    }

    fn file_content(&self, path: &Path, progress: &dyn Progress) -> Result<Take> {
        let meta = std::fs::metadata(path).map_err(|e| Error::io(path, "stat", e))?;
        if !meta.is_file() {
            return Err(Error::InvalidInput(format!(
                "{} is not a regular file",
                path.display()
            )));
        }
        let ((size, content), _) = self.write_tree(progress, |w| w.file(path))?;
        let now = now_ns();
        Ok(Take::File {
            size,
            content,
            mtime: (
                now.div_euclid(1_000_000_000),
                now.rem_euclid(1_000_000_000) as u32,
            ),
        })
    }
}
