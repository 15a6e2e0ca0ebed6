//! The VDI socket: desktops of other VDI products (any VNC server) as
//! members of a pool (`lamina desktop add`). The allocator hands them out
//! like the pool's own VMs and the console proxy reaches them over TCP; the
//! rule engine leaves them alone. A VNC password stays in the catalog: the
//! broker answers the desktop's challenge itself and the browser never
//! sees it.

use lamina_sync::{now_ns, Store};
use serde::Serialize;

use crate::error::{Error, Result};
use crate::model::{self, Member, MemberState, Pool, MEMBER, POOL, VNC_SECRET};

/// The host name external desktops are listed under.
pub const EXTERNAL: &str = "external";

/// An external desktop as listed.
#[derive(Debug, Clone, Serialize)]
pub struct ExternalDesktop {
    /// Name.
    pub name: String,
    /// Pool.
    pub pool: String,
    /// `HOST:PORT` of its VNC server.
    pub vnc: String,
    /// Whether a VNC password is kept for it.
    pub password: bool,
    /// Its user, if any.
    pub owner: Option<String>,
    /// Its session, if any.
    pub session: Option<String>,
}

/// Checks a `HOST:PORT`.
fn check_addr(addr: &str) -> Result<()> {
    let bad = || {
        Error::InvalidInput(format!(
            "VNC address {addr:?} must be HOST:PORT (e.g. 10.0.0.5:5901)"
        ))
    };
    let (host, port) = addr.rsplit_once(':').ok_or_else(bad)?;
    if host.is_empty() || host.chars().any(char::is_whitespace) {
        return Err(bad());
    }
    port.parse::<u16>()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(bad)?;
    Ok(())
}

/// Registers an external desktop in `pool`.
///
/// # Errors
/// A bad name or address, no such pool, the name in use, a password longer
/// than VNC's 8 characters, catalog failures.
pub fn add(
    store: &Store,
    name: &str,
    vnc: &str,
    password: Option<&str>,
    pool: &str,
) -> Result<Member> {
    lamina_sync::check_name("desktop name", name)?;
    check_addr(vnc)?;
    if let Some(pw) = password {
        if pw.is_empty() || pw.len() > 8 {
            return Err(Error::InvalidInput(
                "a VNC password has 1 to 8 bytes (VNC authentication uses no more)".into(),
            ));
        }
    }
    let mut batch = store.batch()?;
    if model::get::<Pool>(store, POOL, pool)?.is_none() {
        return Err(Error::NotFound(format!("no pool named {pool:?}")));
    }
    if store.record(MEMBER, name)?.is_some() {
        return Err(Error::Exists(format!(
            "a VM or desktop named {name} already exists"
        )));
    }
    let m = Member {
        name: name.to_owned(),
        pool: pool.to_owned(),
        host: EXTERNAL.to_owned(),
        state: MemberState::Running,
        owner: None,
        session: None,
        created_ns: now_ns(),
        cpu_percent: None,
        rss_bytes: None,
        profile: None,
        vnc: Some(vnc.to_owned()),
    };
    model::put(&mut batch, MEMBER, name, &m)?;
    match password {
        Some(pw) => batch.put_record(VNC_SECRET, name, pw.as_bytes())?,
        None => batch.delete_record(VNC_SECRET, name)?,
    }
    store.commit(batch)?;
    Ok(m)
}

/// Removes an external desktop, refused while a session uses it.
///
/// # Errors
/// Not found, in use, catalog failures.
pub fn remove(store: &Store, name: &str) -> Result<Member> {
    let mut batch = store.batch()?;
    let m: Member = model::get(store, MEMBER, name)?
        .filter(|m: &Member| m.vnc.is_some())
        .ok_or_else(|| Error::NotFound(format!("no external desktop named {name:?}")))?;
    if let Some(s) = &m.session {
        return Err(Error::InvalidInput(format!(
            "desktop {name} is in session {s}: end it first (`lamina session end {s}`)"
        )));
    }
    batch.delete_record(MEMBER, name)?;
    batch.delete_record(VNC_SECRET, name)?;
    store.commit(batch)?;
    Ok(m)
}

/// Every external desktop.
///
/// # Errors
/// Catalog failures.
pub fn list(store: &Store) -> Result<Vec<ExternalDesktop>> {
    let members: Vec<Member> = model::all(store, MEMBER)?;
    let mut out = Vec::new();
    for m in members {
        let Some(vnc) = m.vnc else { continue };
        out.push(ExternalDesktop {
            password: store.record(VNC_SECRET, &m.name)?.is_some(),
            name: m.name,
            pool: m.pool,
            vnc,
            owner: m.owner,
            session: m.session,
        });
    }
    Ok(out)
}

/// The VNC password kept for desktop `name`.
pub(crate) fn password(store: &Store, name: &str) -> Result<Option<Vec<u8>>> {
    Ok(store.record(VNC_SECRET, name)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        assert!(check_addr("10.0.0.5:5901").is_ok());
        assert!(check_addr("[::1]:5900").is_ok());
        assert!(check_addr("vdi.example:5900").is_ok());
        for bad in ["", "host", ":5900", "host:0", "host:99999", "a b:1"] {
            assert!(check_addr(bad).is_err(), "{bad}");
        }
    }
}
