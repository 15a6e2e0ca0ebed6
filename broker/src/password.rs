//! Console passwords: argon2id hashes (PHC strings) in the catalog, one
//! record per user. The JSON API keeps using bearer tokens.

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use lamina_sync::Store;

use crate::error::{Error, Result};

const PASSWORD: &str = "console-password";

/// Shortest password accepted.
pub const MIN_LEN: usize = 8;

/// Sets (or replaces) `user`'s console password.
///
/// # Errors
/// No such user, a password shorter than [`MIN_LEN`], catalog failures.
pub fn set(store: &Store, user: &str, password: &str) -> Result<()> {
    if store.user(user)?.is_none() {
        return Err(Error::NotFound(format!("no user named {user:?}")));
    }
    if password.chars().count() < MIN_LEN {
        return Err(Error::InvalidInput(format!(
            "a password needs at least {MIN_LEN} characters"
        )));
    }
    let salt = SaltString::encode_b64(&rand::random::<[u8; 16]>())
        .map_err(|e| Error::InvalidInput(format!("salt: {e}")))?;
    let hash = Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map_err(|e| Error::InvalidInput(format!("cannot hash the password: {e}")))?
        .to_string();
    let mut batch = store.batch()?;
    batch.put_record(PASSWORD, user, hash.as_bytes())?;
    store.commit(batch)?;
    Ok(())
}

/// Removes `user`'s console password (they can no longer log in to the
/// console); whether there was one.
///
/// # Errors
/// Catalog failures.
pub fn clear(store: &Store, user: &str) -> Result<bool> {
    if store.record(PASSWORD, user)?.is_none() {
        return Ok(false);
    }
    let mut batch = store.batch()?;
    batch.delete_record(PASSWORD, user)?;
    store.commit(batch)?;
    Ok(true)
}

/// Whether `user` has a console password.
///
/// # Errors
/// Catalog failures.
pub fn has(store: &Store, user: &str) -> Result<bool> {
    Ok(store.record(PASSWORD, user)?.is_some())
}

/// Whether `password` is `user`'s. A user without a password, or unknown,
/// never matches; a hash is computed anyway, so that the answer takes as
/// long either way.
///
/// # Errors
/// Catalog failures, a stored hash that does not parse.
pub fn verify(store: &Store, user: &str, password: &str) -> Result<bool> {
    let stored = store.record(PASSWORD, user)?;
    let Some(stored) = stored else {
        let salt = SaltString::encode_b64(&[0u8; 16]).ok();
        if let Some(salt) = salt {
            let _ = Argon2::default().hash_password(password.as_bytes(), &salt);
        }
        return Ok(false);
    };
    let text = String::from_utf8_lossy(&stored).into_owned();
    let hash = PasswordHash::new(&text).map_err(|e| Error::Corrupt {
        kind: PASSWORD,
        name: user.to_owned(),
        reason: e.to_string(),
    })?;
    Ok(Argon2::default()
        .verify_password(password.as_bytes(), &hash)
        .is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_verify_clear() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("s");
        Store::init(&root).unwrap();
        let opts = lamina_sync::OpenOptions::new(lamina_sync::Access::Write);
        let store = Store::open(&root, &opts).unwrap();
        store.add_user("alice", false, &[]).unwrap();
        assert!(matches!(
            set(&store, "bob", "long enough"),
            Err(Error::NotFound(_))
        ));
        assert!(matches!(
            set(&store, "alice", "short"),
            Err(Error::InvalidInput(_))
        ));
        assert!(!verify(&store, "alice", "long enough").unwrap());
        set(&store, "alice", "long enough").unwrap();
        assert!(verify(&store, "alice", "long enough").unwrap());
        assert!(!verify(&store, "alice", "long enougH").unwrap());
        assert!(!verify(&store, "bob", "long enough").unwrap());
        let raw = store.record(PASSWORD, "alice").unwrap().unwrap();
        assert!(String::from_utf8(raw).unwrap().starts_with("$argon2id$"));
        assert!(clear(&store, "alice").unwrap());
        assert!(!verify(&store, "alice", "long enough").unwrap());
    }
}
