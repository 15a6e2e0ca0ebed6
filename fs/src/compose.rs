//! Compositions: named stacks of tree layers with redirection rules and a
//! mode, recorded in the store's catalog.
//!
//! ```text
//! STORE/compositions/<id>/upper/<slot>/   pending changes of each writable slot
//! STORE/compositions/<id>/work/           scratch on the same file system
//! STORE/compositions/<id>/lock            held by the mount daemon
//! STORE/compositions/<id>/mount.json      where it is mounted, by which pid
//! STORE/compositions/<id>/daemon.log      the daemon's log
//! ```
//!
//! Slots are ordered bottom to top by kind (`os`, `group`…, `personal`,
//! `system`, `data`); several group layers keep the order they were given
//! in. A slot pinned to a version is read-only, and the ref
//! `compose/<name>/<slot>` keeps that version from gc.

use std::fs;
use std::path::{Path, PathBuf};

use lamina_sync::{now_ns, LayerFormat, LayerKind, Store, VersionId};
use serde::{Deserialize, Serialize};

use crate::error::{Error, IoContext, Result};
use crate::rules::{self, RuleSpec, Rules, Target};

/// Catalog record kind of compositions.
pub const RECORD_KIND: &str = "composition";

/// What happens to a session's writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Mode {
    /// Writes stay pending until `lamina commit` (or `compose reset`).
    Persistent,
    /// Writes are dropped at unmount (and at the next mount after a crash).
    Revert,
}

impl Mode {
    /// Lower-case name as on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Persistent => "persistent",
            Mode::Revert => "revert",
        }
    }
}

impl std::str::FromStr for Mode {
    type Err = Error;
    fn from_str(s: &str) -> Result<Mode> {
        match s {
            "persistent" => Ok(Mode::Persistent),
            "revert" => Ok(Mode::Revert),
            _ => Err(Error::Invalid(format!(
                "unknown mode {s:?} (expected persistent or revert)"
            ))),
        }
    }
}

/// One layer of a composition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Slot {
    /// Its kind (position in the stack).
    pub kind: LayerKind,
    /// Layer name.
    pub layer: String,
    /// Version it is pinned to (read-only); `None` follows the head.
    pub pin: Option<VersionId>,
}

impl Slot {
    /// Whether writes may land in this slot.
    pub fn writable(&self) -> bool {
        self.pin.is_none()
    }
}

/// A composition as recorded in the catalog.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Composition {
    /// Name.
    pub name: String,
    /// Directory name under `STORE/compositions`.
    pub id: String,
    /// Layers, bottom to top.
    pub slots: Vec<Slot>,
    /// Redirection rules; empty sends every write to the topmost writable
    /// slot.
    pub rules: Vec<RuleSpec>,
    /// The rules file as given at creation, for messages.
    pub rules_file: Option<String>,
    /// Persistent or revert.
    pub mode: Mode,
    /// Creation time, ns since the epoch.
    pub created_ns: i64,
}

/// Ref keeping a pinned slot's version alive.
pub fn pin_ref(name: &str, slot: usize) -> String {
    format!("compose/{name}/{slot}")
}

/// Directory holding every composition's files.
pub fn compositions_dir(store_root: &Path) -> PathBuf {
    store_root.join("compositions")
}

impl Composition {
    /// The composition's directory.
    pub fn dir(&self, store_root: &Path) -> PathBuf {
        compositions_dir(store_root).join(&self.id)
    }

    /// Pending changes of `slot`.
    pub fn upper_dir(&self, store_root: &Path, slot: usize) -> PathBuf {
        self.dir(store_root).join("upper").join(slot.to_string())
    }

    /// Scratch directory beside the uppers.
    pub fn work_dir(&self, store_root: &Path) -> PathBuf {
        self.dir(store_root).join("work")
    }

    /// Index of the topmost writable slot, if any.
    pub fn top_writable(&self) -> Option<usize> {
        (0..self.slots.len())
            .rev()
            .find(|&i| self.slots[i].writable())
    }

    /// The compiled rules.
    ///
    /// # Errors
    /// A rule the slots no longer satisfy (never for a stored composition).
    pub fn compiled_rules(&self) -> Result<Option<Rules>> {
        if self.rules.is_empty() {
            return Ok(self.top_writable().map(Rules::single));
        }
        let kinds: Vec<&str> = self.slots.iter().map(|s| s.kind.as_str()).collect();
        let targets: Vec<Target<'_>> = self
            .slots
            .iter()
            .zip(&kinds)
            .map(|(s, k)| Target {
                kind: k,
                layer: &s.layer,
                writable: s.writable(),
            })
            .collect();
        let file = self.rules_file.as_deref().unwrap_or("rules");
        Rules::compile(&self.rules, &targets, file).map(Some)
    }

    fn encode(&self) -> Vec<u8> {
        // Serialising plain data into a Vec cannot fail.
        #[allow(clippy::expect_used)]
        postcard::to_allocvec(self).expect("postcard serialises into a Vec")
    }

    fn decode(bytes: &[u8]) -> Result<Composition> {
        postcard::from_bytes(bytes).map_err(|e| {
            Error::Store(lamina_sync::Error::RecordCorrupt {
                what: "composition record".into(),
                reason: e.to_string(),
            })
        })
    }
}

/// A `--layer KIND=LAYER[@V]` argument.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerArg {
    /// Kind.
    pub kind: LayerKind,
    /// Layer name.
    pub layer: String,
    /// Version spec to pin, if given.
    pub version: Option<String>,
}

impl std::str::FromStr for LayerArg {
    type Err = Error;
    fn from_str(s: &str) -> Result<LayerArg> {
        let (kind, rest) = s.split_once('=').ok_or_else(|| {
            Error::Invalid(format!(
                "--layer {s:?}: expected KIND=LAYER[@VERSION], e.g. os=os/debian12"
            ))
        })?;
        let kind: LayerKind = kind
            .parse()
            .map_err(|e: lamina_sync::Error| Error::Invalid(format!("--layer {s:?}: {e}")))?;
        let (layer, version) = lamina_sync::split_layer_spec(rest);
        if layer.is_empty() {
            return Err(Error::Invalid(format!("--layer {s:?}: no layer name")));
        }
        Ok(LayerArg {
            kind,
            layer: layer.to_owned(),
            version: version.map(str::to_owned),
        })
    }
}

/// What `compose create` is given.
#[derive(Debug, Clone)]
pub struct CreateOptions {
    /// Composition name.
    pub name: String,
    /// Layers in any order (several group layers keep their order).
    pub layers: Vec<LayerArg>,
    /// Rules file text and how to name it in errors.
    pub rules: Option<(String, String)>,
    /// Mode.
    pub mode: Mode,
    /// Versions streamed from a remote (`compose create --stream`): a
    /// `--layer` naming one of their layers becomes a read-only slot on
    /// that version, whose data is fetched as it is read.
    pub streamed: Vec<lamina_sync::remote::StreamedVersion>,
}

/// The streamed version a slot shows, if it is one this store does not
/// hold: its record, its root, and its manifest nodes attached to `store`
/// so that reads through the store find them.
///
/// # Errors
/// Damaged stream files, store failures.
pub(crate) fn streamed_slot(
    store: &Store,
    slot: &Slot,
) -> Result<
    Option<(
        lamina_sync::remote::StreamedVersion,
        lamina_sync::manifest::Meta,
        lamina_sync::ManifestId,
    )>,
> {
    let Some(v) = slot.pin else {
        return Ok(None);
    };
    if store.has_version(v)? {
        return Ok(None);
    }
    let Some((meta, nodes)) = lamina_sync::remote::load_streamed(store.root(), v)? else {
        return Ok(None);
    };
    let root = nodes.root(meta.root)?;
    store.attach_streamed(std::sync::Arc::new(nodes));
    match root {
        lamina_sync::manifest::Root::Tree { meta: m, dir } => Ok(Some((meta, m, dir))),
        lamina_sync::manifest::Root::Disk(_) => Err(Error::Invalid(format!(
            "streamed version {} of {} is a disk",
            v.short(),
            slot.layer
        ))),
    }
}

fn check_name(name: &str) -> Result<()> {
    lamina_sync::check_layer_name(name).map_err(|e| match e {
        lamina_sync::Error::InvalidName { reason, .. } => {
            Error::Invalid(format!("composition name {name:?}: {reason}"))
        }
        other => other.into(),
    })
}

/// Creates a composition.
///
/// # Errors
/// [`Error::Exists`], [`Error::Invalid`] (unknown or disk layer, a kind
/// that doesn't match the layer's, a duplicate kind or layer, an unknown
/// version), [`Error::Rules`], store failures.
pub fn create(store: &Store, opts: &CreateOptions) -> Result<Composition> {
    check_name(&opts.name)?;
    if store.record(RECORD_KIND, &opts.name)?.is_some() {
        return Err(Error::Exists {
            name: opts.name.clone(),
        });
    }
    if opts.layers.is_empty() {
        return Err(Error::Invalid(
            "a composition needs at least one --layer KIND=LAYER".into(),
        ));
    }
    let mut slots = Vec::with_capacity(opts.layers.len());
    for arg in &opts.layers {
        if let Some(sv) = opts.streamed.iter().find(|s| s.layer == arg.layer) {
            if sv.kind.is_some_and(|k| k != arg.kind) {
                return Err(Error::Invalid(format!(
                    "layer {} is a {} layer, not {}",
                    arg.layer,
                    sv.kind.map_or("?", |k| k.as_str()),
                    arg.kind
                )));
            }
            if slots.iter().any(|s: &Slot| s.layer == arg.layer)
                || (arg.kind != LayerKind::Group && slots.iter().any(|s: &Slot| s.kind == arg.kind))
            {
                return Err(Error::Invalid(format!(
                    "layer {} or its kind {} is given twice",
                    arg.layer, arg.kind
                )));
            }
            slots.push(Slot {
                kind: arg.kind,
                layer: arg.layer.clone(),
                pin: Some(sv.version),
            });
            continue;
        }
        let layer = store.layer(&arg.layer).map_err(|e| match e {
            lamina_sync::Error::LayerNotFound { name } => {
                Error::Invalid(format!("--layer {}={name}: no such layer", arg.kind))
            }
            other => other.into(),
        })?;
        if layer.format != LayerFormat::Tree {
            return Err(Error::Invalid(format!(
                "layer {} is a {} layer; a composition stacks tree layers",
                layer.name, layer.format
            )));
        }
        if layer.kind != arg.kind {
            return Err(Error::Invalid(format!(
                "layer {} is a {} layer, not {}",
                layer.name, layer.kind, arg.kind
            )));
        }
        let pin = match &arg.version {
            Some(spec) => Some(store.resolve(&layer, spec)?),
            None => None,
        };
        if slots.iter().any(|s: &Slot| s.layer == layer.name) {
            return Err(Error::Invalid(format!(
                "layer {} is given twice",
                layer.name
            )));
        }
        if arg.kind != LayerKind::Group && slots.iter().any(|s: &Slot| s.kind == arg.kind) {
            return Err(Error::Invalid(format!(
                "a composition holds at most one {} layer (only group may repeat)",
                arg.kind
            )));
        }
        slots.push(Slot {
            kind: arg.kind,
            layer: layer.name,
            pin,
        });
    }
    // Stable: group layers keep the order given.
    slots.sort_by_key(|s| s.kind);
    let (rules, rules_file) = match &opts.rules {
        Some((text, file)) => (rules::parse(text, file)?, Some(file.clone())),
        None => (Vec::new(), None),
    };
    let comp = Composition {
        name: opts.name.clone(),
        id: hex::encode(rand::random::<[u8; 8]>()),
        slots,
        rules,
        rules_file,
        mode: opts.mode,
        created_ns: now_ns(),
    };
    comp.compiled_rules()?;

    let root = store.root();
    let dir = comp.dir(root);
    let made = (|| -> Result<()> {
        fs::create_dir_all(comp.work_dir(root)).ctx(&dir, "create composition directory")?;
        for (i, s) in comp.slots.iter().enumerate() {
            if s.writable() {
                let u = comp.upper_dir(root, i);
                fs::create_dir_all(&u).ctx(&u, "create upper directory")?;
            }
        }
        Ok(())
    })();
    let committed = made.and_then(|()| {
        let mut batch = store.batch()?;
        batch.put_record(RECORD_KIND, &comp.name, &comp.encode())?;
        for (i, s) in comp.slots.iter().enumerate() {
            // A streamed version is not in the store: nothing to keep.
            if let Some(v) = s.pin.filter(|v| store.has_version(*v).unwrap_or(false)) {
                batch.move_ref(&pin_ref(&comp.name, i), None, Some(v), "compose create")?;
            }
        }
        store.commit(batch)?;
        Ok(())
    });
    if let Err(e) = committed {
        let _ = fs::remove_dir_all(&dir);
        return Err(e);
    }
    Ok(comp)
}

/// Every composition, by name.
///
/// # Errors
/// Store failures, a corrupt record.
pub fn list(store: &Store) -> Result<Vec<Composition>> {
    store
        .records(RECORD_KIND)?
        .iter()
        .map(|(_, v)| Composition::decode(v))
        .collect()
}

/// The composition `name`.
///
/// # Errors
/// [`Error::NotFound`], store failures.
pub fn get(store: &Store, name: &str) -> Result<Composition> {
    match store.record(RECORD_KIND, name)? {
        Some(v) => Composition::decode(&v),
        None => Err(Error::NotFound {
            name: name.to_owned(),
        }),
    }
}

/// Removes a composition, its pins and its pending changes.
///
/// # Errors
/// [`Error::NotFound`], [`Error::Mounted`], store failures.
pub fn remove(store: &Store, name: &str) -> Result<()> {
    let comp = get(store, name)?;
    let _lock = crate::mount::lock_unmounted(store.root(), &comp, "unmount it first")?;
    let mut batch = store.batch()?;
    batch.delete_record(RECORD_KIND, name)?;
    for i in 0..comp.slots.len() {
        if let Some(v) = store.ref_target(&pin_ref(name, i))? {
            batch.move_ref(&pin_ref(name, i), Some(v), None, "compose rm")?;
        }
    }
    store.commit(batch)?;
    let dir = comp.dir(store.root());
    if let Err(e) = fs::remove_dir_all(&dir) {
        tracing::warn!(dir = %dir.display(), %e, "could not remove the composition's directory");
    }
    // Streamed manifests no other composition shows go too.
    let others = list(store)?;
    for v in comp.slots.iter().filter_map(|s| s.pin) {
        let used = others
            .iter()
            .any(|c| c.slots.iter().any(|s| s.pin == Some(v)));
        if !used && !store.has_version(v)? {
            lamina_sync::remote::remove_streamed(store.root(), v)?;
        }
    }
    Ok(())
}

/// Re-stacks composition `name` on another `os` layer (hotelling): the
/// other slots and their pending changes stay. A pinned `os` slot is
/// pinned to the new layer's current version (its pin, else its head); a
/// slot following the head follows the new layer's head. Refused while the
/// composition is mounted, and when the `os` slot has pending changes of
/// its own (they were made against the old layer).
///
/// # Errors
/// [`Error::NotFound`], [`Error::Mounted`], [`Error::Invalid`] (no `os`
/// slot, a layer that is not an `os` tree layer or has no version, pending
/// changes in the slot), [`Error::Rules`], store failures.
pub fn switch_os(store: &Store, name: &str, layer: &str) -> Result<Composition> {
    let mut comp = get(store, name)?;
    let _lock = crate::mount::lock_unmounted(store.root(), &comp, "unmount it first")?;
    let new = store.layer(layer).map_err(|e| match e {
        lamina_sync::Error::LayerNotFound { name } => Error::Invalid(format!(
            "layer {name} is not cached here (lamina hotel add REMOTE:{name} first)"
        )),
        other => other.into(),
    })?;
    if new.format != LayerFormat::Tree || new.kind != LayerKind::Os {
        return Err(Error::Invalid(format!(
            "layer {} is a {} {} layer; a composition's os slot takes an os tree layer",
            new.name, new.kind, new.format
        )));
    }
    let Some(i) = comp.slots.iter().position(|s| s.kind == LayerKind::Os) else {
        return Err(Error::Invalid(format!(
            "composition {name} has no os layer to switch"
        )));
    };
    let old = comp.slots[i].clone();
    if old.layer == new.name {
        return Ok(comp);
    }
    if old.writable() {
        let upper = comp.upper_dir(store.root(), i);
        let pending = fs::read_dir(&upper)
            .ctx(&upper, "read the os slot's pending changes")?
            .next()
            .is_some();
        if pending {
            return Err(Error::Invalid(format!(
                "the os slot of {name} ({}) has pending changes: commit or reset them before switching",
                old.layer
            )));
        }
    }
    let current = store
        .current(&new)?
        .ok_or_else(|| Error::Invalid(format!("layer {} has no version yet", new.name)))?;
    store.check_usable(&new, current)?;
    let pin = old.pin.map(|_| current);
    comp.slots[i] = Slot {
        kind: LayerKind::Os,
        layer: new.name.clone(),
        pin,
    };
    comp.compiled_rules()?;
    let mut batch = store.batch()?;
    batch.put_record(RECORD_KIND, name, &comp.encode())?;
    let held = store.ref_target(&pin_ref(name, i))?;
    if held != pin {
        batch.move_ref(&pin_ref(name, i), held, pin, "hotel switch")?;
    }
    store.commit(batch)?;
    Ok(comp)
}

/// Writes `bytes` to `path` through a temporary file and a rename, synced.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    Ok(lamina_sync::write_atomic(path, bytes)?)
}
