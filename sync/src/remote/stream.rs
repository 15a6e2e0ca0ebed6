//! Versions streamed from a remote: their manifests here, their data on
//! demand (issue "client side", cache acceleration).
//!
//! `lamina disk create --base REMOTE:LAYER --stream` (and `lamina compose
//! create --layer KIND=REMOTE:LAYER --stream` for tree layers) fetches the
//! version record and every manifest node under it — a few KiB per GiB of
//! disk — but no data. They are kept in `STORE/stream/`, **outside** the store's
//! chunk backend: a node in the backend promises its whole subtree (the
//! fact pull, push, fsck and gc rely on), and a streamed version's data is
//! not there. The data arrives chunk by chunk through [`RemoteChunks`],
//! each verified against its id, and is cached by its reader (the disk
//! view's cluster cache, the file view's file cache; a mount attaches a
//! tree's nodes to its open store, see [`Store::attach_streamed`]). A `lamina pull` of the layer later makes the
//! version local the ordinary way.
//!
//! ```text
//! STORE/stream/<version>.json    what was streamed: remote, layer, root
//! STORE/stream/<version>.nodes   its manifest nodes: (id, length, bytes)…
//! STORE/stream/trees/…           the same for tree versions
//! ```

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::conn::{ConnectOptions, Connection};
use super::RemoteConfig;
use crate::catalog::now_ns;
use crate::error::{Error, Result};
use crate::id::{ChunkId, ManifestId, VersionId};
use crate::layer::LayerFormat;
use crate::manifest::{Node, NodeSource, Root};
use crate::store::Store;
use crate::transfer::{wire, NODE_BATCH};
use crate::write_atomic;

/// Most bytes of a node file read back (a 2 TiB disk's radix is ~20 MiB).
const MAX_NODES_BYTES: u64 = 256 << 20;

/// What was streamed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamedVersion {
    /// The remote it streams from.
    pub remote: String,
    /// The layer's name there.
    pub layer: String,
    /// The version.
    pub version: VersionId,
    /// Its root manifest node.
    pub root: ManifestId,
    /// Manifest nodes fetched.
    pub nodes: u64,
    /// Data chunks the version names (what streaming will fetch, at most).
    pub chunks: u64,
    /// When the manifests were fetched, ns since the epoch.
    pub fetched_ns: i64,
    /// The layer's kind there (files written before trees streamed lack it).
    #[serde(default)]
    pub kind: Option<crate::layer::LayerKind>,
    /// The layer's identity there.
    #[serde(default)]
    pub layer_id: Option<crate::id::LayerId>,
}

/// The directory of streamed versions.
pub fn stream_dir(store_root: &Path) -> PathBuf {
    store_root.join("stream")
}

/// Where the files of a streamed version of `format` live: disks in
/// [`stream_dir`] (beside the disk view's profiles), trees in its `trees/`
/// (the file view's, kept while a composition uses them).
fn dir_for(store_root: &Path, format: LayerFormat) -> PathBuf {
    match format {
        LayerFormat::Disk => stream_dir(store_root),
        LayerFormat::Tree => stream_dir(store_root).join("trees"),
    }
}

fn meta_path(store_root: &Path, format: LayerFormat, v: VersionId) -> PathBuf {
    dir_for(store_root, format).join(format!("{}.json", v.to_hex()))
}

fn nodes_path(store_root: &Path, format: LayerFormat, v: VersionId) -> PathBuf {
    dir_for(store_root, format).join(format!("{}.nodes", v.to_hex()))
}

/// Which format `version` was streamed as, if it was.
fn streamed_format(store_root: &Path, v: VersionId) -> Option<LayerFormat> {
    [LayerFormat::Disk, LayerFormat::Tree]
        .into_iter()
        .find(|f| meta_path(store_root, *f, v).exists())
}

/// The manifest nodes of a streamed version, held in memory.
pub struct StreamNodes {
    nodes: HashMap<ManifestId, Vec<u8>>,
}

impl NodeSource for StreamNodes {
    fn load(&self, id: ManifestId) -> Result<Node> {
        let bytes = self.nodes.get(&id).ok_or_else(|| Error::ManifestCorrupt {
            id,
            reason: "not among the streamed version's manifest nodes".into(),
        })?;
        Node::decode(id, bytes)
    }
}

impl StreamNodes {
    /// The version's root.
    ///
    /// # Errors
    /// A root node that is missing or not a root.
    pub fn root(&self, id: ManifestId) -> Result<Root> {
        match self.load(id)? {
            Node::Root(r) => Ok(r),
            _ => Err(Error::ManifestCorrupt {
                id,
                reason: "expected a root node".into(),
            }),
        }
    }
}

/// What was streamed for `version`, without its nodes (cheap: for
/// listings).
///
/// # Errors
/// A file that cannot be read or parsed.
pub fn streamed_meta(store_root: &Path, version: VersionId) -> Result<Option<StreamedVersion>> {
    let Some(format) = streamed_format(store_root, version) else {
        return Ok(None);
    };
    let mp = meta_path(store_root, format, version);
    let meta = match std::fs::read(&mp) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(&mp, "read", e)),
    };
    serde_json::from_slice(&meta)
        .map(Some)
        .map_err(|e| Error::RecordCorrupt {
            what: mp.display().to_string(),
            reason: e.to_string(),
        })
}

/// Reads what `lamina disk create --stream` fetched for `version`, if it
/// did; every node is checked against its id.
///
/// # Errors
/// Files that cannot be read or do not match.
pub fn load_streamed(
    store_root: &Path,
    version: VersionId,
) -> Result<Option<(StreamedVersion, StreamNodes)>> {
    let Some(meta) = streamed_meta(store_root, version)? else {
        return Ok(None);
    };
    let format = streamed_format(store_root, version).unwrap_or(LayerFormat::Disk);
    let np = nodes_path(store_root, format, version);
    let len = std::fs::metadata(&np)
        .map_err(|e| Error::io(&np, "stat", e))?
        .len();
    if len > MAX_NODES_BYTES {
        return Err(Error::RecordCorrupt {
            what: np.display().to_string(),
            reason: format!("{len} bytes, more than a node file holds"),
        });
    }
    let raw = std::fs::read(&np).map_err(|e| Error::io(&np, "read", e))?;
    let corrupt = |reason: String| Error::RecordCorrupt {
        what: np.display().to_string(),
        reason,
    };
    let mut nodes = HashMap::new();
    let mut rest = &raw[..];
    while !rest.is_empty() {
        if rest.len() < 36 {
            return Err(corrupt("truncated entry".into()));
        }
        let mut id = [0u8; 32];
        id.copy_from_slice(&rest[..32]);
        let n = u32::from_le_bytes([rest[32], rest[33], rest[34], rest[35]]) as usize;
        rest = &rest[36..];
        if rest.len() < n {
            return Err(corrupt("truncated node".into()));
        }
        let id = ManifestId(id);
        let bytes = &rest[..n];
        if ManifestId::of(bytes) != id {
            return Err(corrupt(format!(
                "node {} does not match its id",
                id.short()
            )));
        }
        nodes.insert(id, bytes.to_vec());
        rest = &rest[n..];
    }
    if !nodes.contains_key(&meta.root) {
        return Err(corrupt(format!(
            "the root {} is missing",
            meta.root.short()
        )));
    }
    Ok(Some((meta, StreamNodes { nodes })))
}

/// Removes what was streamed for `version` (its cached data is the
/// reader's to remove).
///
/// # Errors
/// Files that exist but cannot be removed.
pub fn remove_streamed(store_root: &Path, version: VersionId) -> Result<()> {
    let paths = [LayerFormat::Disk, LayerFormat::Tree]
        .into_iter()
        .flat_map(|f| {
            [
                meta_path(store_root, f, version),
                nodes_path(store_root, f, version),
            ]
        });
    for p in paths {
        match std::fs::remove_file(&p) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io(&p, "remove", e)),
        }
    }
    Ok(())
}

impl Store {
    /// Fetches from `remote` the version `spec` (`head`, or a version id or
    /// a prefix of one) of layer `layer`, which must be of `format`, and
    /// every manifest node under it, not its data, into `STORE/stream/`.
    /// Fetching a version already streamed only reads what is there.
    ///
    /// # Errors
    /// An unknown remote, layer or version, a layer of another format,
    /// transport failures, nodes that do not match their ids.
    pub fn stream_manifests(
        &self,
        remote: &str,
        layer: &str,
        spec: &str,
        format: LayerFormat,
    ) -> Result<(StreamedVersion, StreamNodes, crate::protocol::LayerInfo)> {
        let cfg = self.remote(remote)?;
        let conn = Connection::open(&cfg, &ConnectOptions::default())?;
        let info = conn.layer(layer)?.ok_or_else(|| Error::LayerNotFound {
            name: format!("{remote}:{layer}"),
        })?;
        if info.format != format {
            return Err(Error::InvalidInput(format!(
                "layer `{layer}` of remote {remote} is a {} layer: only {format} layers stream {}",
                info.format,
                match format {
                    LayerFormat::Disk => "into a disk",
                    LayerFormat::Tree => "into a composition",
                }
            )));
        }
        let head = info.head.ok_or_else(|| {
            Error::InvalidInput(format!(
                "layer `{layer}` of remote {remote} has no version yet"
            ))
        })?;
        let (history, sigs) = conn.signed_versions(layer, &[head], &[])?;
        let wanted = if spec == "head" {
            head
        } else {
            let spec_l = spec.to_ascii_lowercase();
            let hits: Vec<VersionId> = history
                .iter()
                .map(|(id, _)| *id)
                .filter(|id| id.to_hex().starts_with(&spec_l))
                .collect();
            match hits.as_slice() {
                [one] => *one,
                [] => {
                    return Err(Error::VersionNotFound {
                        layer: format!("{remote}:{layer}"),
                        spec: spec.to_owned(),
                    })
                }
                _ => {
                    return Err(Error::InvalidInput(format!(
                    "version `{spec}` of {remote}:{layer} is ambiguous: {} versions start with it",
                    hits.len()
                )))
                }
            }
        };
        if crate::sign::signed_kind(info.kind) {
            self.refresh_keys(&conn)?;
            let one: Vec<_> = history
                .iter()
                .filter(|(id, _)| *id == wanted)
                .cloned()
                .collect();
            self.check_pulled(&conn, layer, &one, sigs)?;
        }
        if let Some((m, n)) = load_streamed(self.root(), wanted)? {
            return Ok((m, n, info));
        }
        let (_, v) = history
            .iter()
            .find(|(id, _)| *id == wanted)
            .ok_or_else(|| Error::VersionNotFound {
                layer: format!("{remote}:{layer}"),
                spec: spec.to_owned(),
            })?;
        // Every node, level by level; the data is left where it is.
        let mut nodes: HashMap<ManifestId, Vec<u8>> = HashMap::new();
        let mut chunks: u64 = 0;
        let mut level = vec![v.root];
        while !level.is_empty() {
            let mut next = Vec::new();
            for batch in level.chunks(NODE_BATCH) {
                let ids: Vec<ChunkId> = batch.iter().map(ManifestId::chunk).collect();
                let mut got: HashMap<ChunkId, Vec<u8>> = HashMap::new();
                for r in conn.fetch(layer, &ids)? {
                    for (id, plain) in wire::open(&r)? {
                        got.insert(id, plain);
                    }
                }
                for id in batch {
                    let plain = got.remove(&id.chunk()).ok_or_else(|| {
                        Error::InvalidInput(format!(
                            "remote {remote} did not send manifest node {id}"
                        ))
                    })?;
                    let node = Node::decode(*id, &plain)?;
                    let fits = matches!(
                        (&node, format),
                        (Node::Root(Root::Disk(_)), LayerFormat::Disk)
                            | (Node::Root(Root::Tree { .. }), LayerFormat::Tree)
                    );
                    if *id == v.root && !fits {
                        return Err(Error::InvalidInput(format!(
                            "version {} of {remote}:{layer} is not a {format}",
                            wanted.short()
                        )));
                    }
                    for (child, is_node) in node.children() {
                        if is_node {
                            let m = ManifestId(child.0);
                            if !nodes.contains_key(&m) {
                                next.push(m);
                            }
                        } else {
                            chunks += 1;
                        }
                    }
                    nodes.insert(*id, plain);
                }
            }
            next.sort();
            next.dedup();
            level = next;
        }
        let meta = StreamedVersion {
            remote: remote.to_owned(),
            layer: layer.to_owned(),
            version: wanted,
            root: v.root,
            nodes: nodes.len() as u64,
            chunks,
            fetched_ns: now_ns(),
            kind: Some(info.kind),
            layer_id: Some(info.id),
        };
        let dir = dir_for(self.root(), format);
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, "create", e))?;
        let mut raw = Vec::new();
        for (id, bytes) in &nodes {
            raw.extend_from_slice(&id.0);
            raw.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
            raw.extend_from_slice(bytes);
        }
        // Nodes first: a meta file always has its nodes.
        write_atomic(&nodes_path(self.root(), format, wanted), &raw)?;
        // Plain data always serialises.
        #[allow(clippy::expect_used)]
        let json = serde_json::to_vec_pretty(&meta).expect("meta serialises");
        write_atomic(&meta_path(self.root(), format, wanted), &json)?;
        tracing::info!(remote, layer, version = %wanted.short(), nodes = meta.nodes, chunks, "streamed the manifests");
        Ok((meta, StreamNodes { nodes }, info))
    }
}

/// Counters of a [`RemoteChunks`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct FetchCounters {
    /// Requests answered.
    pub requests: u64,
    /// Requests that failed.
    pub failures: u64,
    /// Chunks received and verified.
    pub chunks: u64,
    /// Their plain bytes.
    pub bytes: u64,
}

/// Data chunks of one remote layer, fetched on demand.
///
/// Connects lazily and again after a failure, so a server that went away
/// is used again once it is back. A request that cannot be answered fails
/// within [`RemoteChunks::TIMEOUT`], retries included (connect and
/// answer), never hangs.
pub struct RemoteChunks {
    cfg: RemoteConfig,
    layer: String,
    conn: Mutex<Option<Arc<Connection>>>,
    counters: Mutex<FetchCounters>,
}

impl RemoteChunks {
    /// Longest a fetch request may take.
    pub const TIMEOUT: Duration = Duration::from_secs(15);

    /// Chunks of `layer` on the remote named `remote` of `store`.
    ///
    /// # Errors
    /// An unknown remote.
    pub fn new(store: &Store, remote: &str, layer: &str) -> Result<RemoteChunks> {
        Ok(RemoteChunks {
            cfg: store.remote(remote)?,
            layer: layer.to_owned(),
            conn: Mutex::new(None),
            counters: Mutex::new(FetchCounters::default()),
        })
    }

    /// The remote's name.
    pub fn remote(&self) -> &str {
        &self.cfg.name
    }

    /// What was fetched so far.
    pub fn counters(&self) -> FetchCounters {
        *self.counters.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn conn(&self) -> Result<Arc<Connection>> {
        let mut c = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = &*c {
            return Ok(c.clone());
        }
        let opts = ConnectOptions {
            // A blip of a few seconds is ridden out (1 + 2 + 4 s of
            // backoff); a demand read waits no longer than that.
            retries: 3,
            keep_alive: true,
            request_timeout: Self::TIMEOUT,
            // The retries too: a demand read gets its answer or its error
            // within TIMEOUT, even from a server that accepts and hangs.
            deadline: Some(Self::TIMEOUT),
        };
        let conn = Arc::new(Connection::open(&self.cfg, &opts)?);
        *c = Some(conn.clone());
        Ok(conn)
    }

    /// Fetches `ids`, each checked against its id; the answer holds every
    /// one of them (plain bytes).
    ///
    /// # Errors
    /// Transport failures ([`Error::RemoteUnreachable`] when the server
    /// cannot be reached), a chunk the server did not send or sent wrong.
    pub fn fetch(&self, ids: &[ChunkId]) -> Result<HashMap<ChunkId, Vec<u8>>> {
        let started = Instant::now();
        let result = (|| {
            let conn = self.conn()?;
            let mut out = HashMap::with_capacity(ids.len());
            for r in conn.fetch(&self.layer, ids)? {
                for (id, plain) in wire::open(&r)? {
                    out.insert(id, plain);
                }
            }
            if let Some(lost) = ids.iter().find(|c| !out.contains_key(c)) {
                return Err(Error::InvalidInput(format!(
                    "remote {} did not send chunk {lost}",
                    self.cfg.name
                )));
            }
            Ok(out)
        })();
        let mut c = self.counters.lock().unwrap_or_else(|p| p.into_inner());
        match &result {
            Ok(got) => {
                c.requests += 1;
                c.chunks += got.len() as u64;
                c.bytes += got.values().map(|b| b.len() as u64).sum::<u64>();
            }
            Err(e) => {
                c.failures += 1;
                // A fresh connection next time.
                *self.conn.lock().unwrap_or_else(|p| p.into_inner()) = None;
                tracing::warn!(remote = %self.cfg.name, layer = %self.layer, error = %e,
                    elapsed_ms = started.elapsed().as_millis() as u64, "fetching chunks failed");
            }
        }
        result
    }
}
