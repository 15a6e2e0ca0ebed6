//! The admin's network policy over a VM's disk: a VM whose disk is a disk
//! of this store (served over NBD) takes the policy its base layer carries
//! from the server (`lamina layer set LAYER --net …`), kept with the layer,
//! so an offline laptop's VM still reaches only what the admin allows.

use lamina_sync::Store;
use lamina_vm::{Disk, Net, Vm};
use serde::Serialize;

/// The policy that narrows a VM's network, and where it came from.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct AdminNet {
    /// The layer that carries it (the base of the VM's disk).
    pub layer: String,
    /// `this store` or `remote NAME`.
    pub source: String,
    /// The policy.
    pub net: Net,
}

/// The export name of an NBD URI (`nbd://HOST[:PORT]/NAME`,
/// `nbd+unix:///NAME?socket=…`, and their TLS forms).
fn export_name(uri: &str) -> Option<&str> {
    let rest = ["nbd://", "nbds://", "nbd+unix://", "nbds+unix://"]
        .iter()
        .find_map(|s| uri.strip_prefix(s))?;
    let (_, path) = rest.split_once('/')?;
    let name = path.split(['?', '#']).next().unwrap_or_default();
    (!name.is_empty()).then_some(name)
}

/// The admin's network policy for `vm`, if its disk is a disk of `store`
/// whose base layer carries one.
///
/// # Errors
/// A policy that does not parse (named), store failures.
pub(crate) fn admin_net(store: &Store, vm: &Vm) -> anyhow::Result<Option<AdminNet>> {
    let Disk::Nbd { uri } = &vm.disk else {
        return Ok(None);
    };
    let Some(name) = export_name(uri) else {
        return Ok(None);
    };
    let disk = match lamina_nbd::disk::get(store, name) {
        Ok(d) => d,
        Err(lamina_nbd::Error::DiskNotFound(_)) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let Some(base) = disk.base else {
        return Ok(None);
    };
    let Some((source, text)) = store.effective_net_policy(&base.layer)? else {
        return Ok(None);
    };
    let net = text.parse::<Net>().map_err(|e| {
        anyhow::anyhow!(
            "the network policy of layer {} ({source}) is not valid: {e}",
            base.layer
        )
    })?;
    Ok(Some(AdminNet {
        layer: base.layer,
        source,
        net,
    }))
}

#[cfg(test)]
mod tests {
    use super::export_name;

    #[test]
    fn export_names_of_nbd_uris() {
        assert_eq!(
            export_name("nbd+unix:///desk?socket=/run/x.sock"),
            Some("desk")
        );
        assert_eq!(export_name("nbd://127.0.0.1:10809/desk"), Some("desk"));
        assert_eq!(export_name("nbds://h/desk#x"), Some("desk"));
        assert_eq!(export_name("nbd://h"), None);
        assert_eq!(export_name("nbd://h/"), None);
        assert_eq!(export_name("/path/to.qcow2"), None);
    }
}
