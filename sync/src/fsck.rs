//! `fsck`: verify everything the store holds and name each bad object.
//!
//! 1. The backend checks itself: pack headers, every index entry against the
//!    record it points at, and every chunk's bytes against its id.
//! 2. Every version reachable from refs and the reflog is decoded and its id
//!    checked; every manifest node under it is decoded (which checks its id
//!    and invariants); every data chunk it names must be in the index.
//! 3. Bad chunks are traced back to the versions and paths that use them.

use std::collections::{HashMap, HashSet};

use serde::Serialize;

use crate::backend::BackendProblem;
use crate::error::{Error, Result};
use crate::id::ChunkId;
use crate::progress::Progress;
use crate::reach::{roots, Reach, Visitor, Where};
use crate::store::Store;

/// One problem found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    /// The bad object: `chunk <id>`, `pack <id>`, `version <id>`,
    /// `manifest <id>`, `ref <name>`.
    pub object: String,
    /// What is wrong.
    pub message: String,
    /// Where it is used (versions and paths), when known.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub used_by: Vec<String>,
}

/// Result of a check.
#[derive(Debug, Clone, Default, Serialize)]
pub struct FsckReport {
    /// True when no problem was found.
    pub ok: bool,
    /// Versions verified.
    pub versions: u64,
    /// Manifest nodes verified.
    pub manifests: u64,
    /// Data chunks reachable.
    pub chunks_reachable: u64,
    /// Index entries checked (every stored chunk, reachable or not).
    pub chunks_checked: u64,
    /// Problems, in the order found.
    pub problems: Vec<Problem>,
}

/// Used-by lines kept per bad chunk.
const USED_BY_MAX: usize = 5;

struct Collect<'a> {
    problems: &'a mut Vec<Problem>,
    data: Vec<ChunkId>,
}

fn object_of(e: &Error) -> String {
    match e {
        Error::ManifestCorrupt { id, .. } => format!("manifest {id}"),
        Error::VersionCorrupt { id, .. } => format!("version {id}"),
        Error::ChunkCorrupt { id, .. } | Error::ChunkMissing { id } => format!("chunk {id}"),
        Error::PackCorrupt { pack, .. } => format!("pack {pack}"),
        Error::PackTruncated { chunk, .. } => format!("chunk {chunk}"),
        _ => "store".into(),
    }
}

impl Visitor for Collect<'_> {
    fn broken(&mut self, at: &Where<'_>, error: Error) {
        self.problems.push(Problem {
            object: object_of(&error),
            message: error.to_string(),
            used_by: vec![at.to_string()],
        });
    }

    fn data(&mut self, _at: &Where<'_>, id: ChunkId) {
        self.data.push(id);
    }
}

/// Finds where the `bad` chunks are used.
struct Trace<'a> {
    bad: &'a HashSet<ChunkId>,
    found: HashMap<ChunkId, Vec<String>>,
}

impl Visitor for Trace<'_> {
    fn broken(&mut self, _at: &Where<'_>, _error: Error) {}

    fn data(&mut self, at: &Where<'_>, id: ChunkId) {
        if self.bad.contains(&id) {
            let list = self.found.entry(id).or_default();
            if list.len() < USED_BY_MAX {
                list.push(at.to_string());
            }
        }
    }
}

impl Store {
    /// Verifies the whole store.
    ///
    /// # Errors
    /// Only failures that stop the check itself (the catalog cannot be
    /// read); damage is reported in [`FsckReport::problems`].
    pub fn fsck(&self, progress: &dyn Progress) -> Result<FsckReport> {
        let mut report = FsckReport::default();
        let mut backend_problems: Vec<BackendProblem> = Vec::new();
        let stats = self.backend.stats()?;
        progress.phase("verify chunks", Some(stats.plain_bytes));
        report.chunks_checked = self
            .backend
            .check(true, progress, &mut |p| backend_problems.push(p))?;

        progress.phase("verify versions", None);
        let mut problems = Vec::new();
        let mut refs_ok = Vec::new();
        for (name, target) in self.refs()? {
            refs_ok.push((name, target));
        }
        let roots = roots(self)?;
        let mut collect = Collect {
            problems: &mut problems,
            data: Vec::new(),
        };
        let reach = Reach::walk(self, &roots, &mut collect);
        let data = std::mem::take(&mut collect.data);
        report.versions = reach.versions.len() as u64;
        report.manifests = reach.nodes;
        report.chunks_reachable = data.len() as u64;
        for (name, target) in refs_ok {
            if let Err(e) = self.version(target) {
                problems.push(Problem {
                    object: format!("ref {name}"),
                    message: format!("points at an unreadable version: {e}"),
                    used_by: Vec::new(),
                });
            }
        }
        // Reachable data must be indexed (its bytes were verified above).
        for batch in data.chunks(4096) {
            let present = self.backend.has_many(batch)?;
            for (id, ok) in batch.iter().zip(present) {
                if !ok {
                    backend_problems.push(BackendProblem {
                        object: format!("chunk {id}"),
                        chunk: Some(*id),
                        message: format!("chunk {id} is missing from the store"),
                    });
                }
            }
        }
        let bad: HashSet<ChunkId> = backend_problems.iter().filter_map(|p| p.chunk).collect();
        let mut used = HashMap::new();
        if !bad.is_empty() {
            let mut trace = Trace {
                bad: &bad,
                found: HashMap::new(),
            };
            Reach::walk(self, &roots, &mut trace);
            used = trace.found;
        }
        report.problems = backend_problems
            .into_iter()
            .map(|p| Problem {
                used_by: p
                    .chunk
                    .and_then(|c| used.get(&c).cloned())
                    .unwrap_or_default(),
                object: p.object,
                message: p.message,
            })
            .chain(problems)
            .collect();
        report.ok = report.problems.is_empty();
        Ok(report)
    }
}
