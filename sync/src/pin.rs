//! Holding this store on a version of a layer (`lamina layer pin`):
//! the ref `pin/LAYER` names the version that mounts and new disks use
//! instead of the head, while sync goes on fetching newer versions (an
//! admin's push-OS waits here until unpinned). The ref keeps the version
//! alive through gc.

use crate::error::{Error, Result};
use crate::id::VersionId;
use crate::store::Store;

fn pin_ref(layer: &str) -> String {
    format!("pin/{layer}")
}

impl Store {
    /// Pins `layer` at `version` (a version of that layer).
    ///
    /// # Errors
    /// An unknown layer, a version of another layer, store failures.
    pub fn pin_layer(&self, layer: &str, version: VersionId) -> Result<()> {
        let l = self.layer(layer)?;
        if self.version(version)?.layer != l.id {
            return Err(Error::InvalidInput(format!(
                "version {} is not a version of layer `{layer}`",
                version.short()
            )));
        }
        let name = pin_ref(layer);
        let old = self.ref_target(&name)?;
        let mut batch = self.batch()?;
        batch.move_ref(&name, old, Some(version), "layer pin")?;
        self.commit(batch)
    }

    /// Unpins `layer`; returns the version it was pinned at, if any.
    ///
    /// # Errors
    /// Store failures.
    pub fn unpin_layer(&self, layer: &str) -> Result<Option<VersionId>> {
        let name = pin_ref(layer);
        let Some(old) = self.ref_target(&name)? else {
            return Ok(None);
        };
        let mut batch = self.batch()?;
        batch.move_ref(&name, Some(old), None, "layer unpin")?;
        self.commit(batch)?;
        Ok(Some(old))
    }

    /// The version `layer` is pinned at, if it is.
    ///
    /// # Errors
    /// Store failures.
    pub fn layer_pin(&self, layer: &str) -> Result<Option<VersionId>> {
        self.ref_target(&pin_ref(layer))
    }

    /// Every pin: (layer, version).
    ///
    /// # Errors
    /// Store failures.
    pub fn layer_pins(&self) -> Result<Vec<(String, VersionId)>> {
        Ok(self
            .refs()?
            .into_iter()
            .filter_map(|(n, v)| n.strip_prefix("pin/").map(|l| (l.to_owned(), v)))
            .collect())
    }

    /// The version a mount or a new disk uses when none is named: the pin,
    /// else the head.
    ///
    /// # Errors
    /// Store failures.
    pub fn current(&self, layer: &crate::Layer) -> Result<Option<VersionId>> {
        match self.layer_pin(&layer.name)? {
            Some(v) => Ok(Some(v)),
            None => self.head(layer),
        }
    }
}
