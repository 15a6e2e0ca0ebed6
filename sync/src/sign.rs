//! Signed golden images: ed25519 signatures over versions of `os` and
//! `group` layers.
//!
//! * **Server keys** live in the server's catalog (record kind
//!   `signing-key`). `lamina key generate` makes one; a key made while
//!   another is active is **endorsed** by it (a signature over the new
//!   public key), so clients move to it by themselves. The newest key not
//!   revoked signs. Revoked keys stay listed, marked.
//! * **Signing**: the server signs each version of an `os`/`group` layer
//!   it sends (ed25519 is deterministic: the same version, the same
//!   signature), over the version id — which, through the Merkle ids,
//!   covers every byte of the version.
//! * **Clients** trust the keys the server had when the remote was added
//!   (`lamina remote trust` trusts its current keys again). On every pull
//!   they learn new keys endorsed by a trusted one, and revocations. A
//!   remote with trusted keys must sign: a pulled `os`/`group` version
//!   without a valid signature from a trusted, unrevoked key is refused,
//!   and so is mounting, booting or creating a disk over one (the
//!   signature is kept with the version, record kind `version-sig`).
//!   Layers not tracked from such a remote are unaffected.

use ring::signature::{Ed25519KeyPair, KeyPair, UnparsedPublicKey, ED25519};
use serde::{Deserialize, Serialize};

use crate::catalog::now_ns;
use crate::error::{Error, Result};
use crate::id::VersionId;
use crate::layer::{Layer, LayerKind};
use crate::store::Store;

/// Catalog record kind of the server's keys.
const KEY: &str = "signing-key";
/// Catalog record kind of the signatures kept with pulled versions.
const SIG: &str = "version-sig";

const VERSION_CONTEXT: &[u8] = b"lamina version signature v1\0";
const ENDORSE_CONTEXT: &[u8] = b"lamina key endorsement v1\0";

/// A server key as stored (with its secret).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct KeyRecord {
    key: PublicKey,
    /// The ed25519 seed, hex.
    seed: String,
}

/// A signing key as the server publishes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublicKey {
    /// Short id: the first 16 hex digits of the BLAKE3 hash of the key.
    pub id: String,
    /// The ed25519 public key, hex.
    pub public: String,
    /// When made, ns since the epoch.
    pub created_ns: i64,
    /// When revoked, if it was.
    pub revoked_ns: Option<i64>,
    /// The key that was active when this one was made, and its signature
    /// over this key's public bytes.
    pub endorsed_by: Option<Endorsement>,
}

/// One key vouching for the next.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endorsement {
    /// The endorsing key's id.
    pub key: String,
    /// Its signature, hex.
    pub sig: String,
}

/// A signature over a version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionSig {
    /// The version.
    pub version: VersionId,
    /// The signing key's id.
    pub key: String,
    /// The signature, hex.
    pub sig: String,
}

/// A key a client trusts for one remote.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrustedKey {
    /// Id.
    pub id: String,
    /// Public key, hex.
    pub public: String,
    /// Revoked since (the server said so).
    pub revoked: bool,
}

fn key_id(public: &[u8]) -> String {
    blake3::hash(public).to_hex()[..16].to_owned()
}

fn verify_raw(public_hex: &str, msg: &[u8], sig_hex: &str) -> bool {
    let (Ok(public), Ok(sig)) = (hex::decode(public_hex), hex::decode(sig_hex)) else {
        return false;
    };
    UnparsedPublicKey::new(&ED25519, public)
        .verify(msg, &sig)
        .is_ok()
}

fn version_msg(v: VersionId) -> Vec<u8> {
    [VERSION_CONTEXT, &v.0[..]].concat()
}

/// Whether versions of layers of `kind` are signed.
pub fn signed_kind(kind: LayerKind) -> bool {
    matches!(kind, LayerKind::Os | LayerKind::Group)
}

/// Checks `sig` over `version` against `trusted`: `Err` says why not, in
/// words that name the key.
pub fn check(
    trusted: &[TrustedKey],
    version: VersionId,
    sig: Option<&VersionSig>,
) -> std::result::Result<(), String> {
    let Some(sig) = sig else {
        return Err(format!("version {} is not signed", version.short()));
    };
    if sig.version != version {
        return Err(format!(
            "the signature is over version {}, not {}",
            sig.version.short(),
            version.short()
        ));
    }
    let Some(k) = trusted.iter().find(|k| k.id == sig.key) else {
        return Err(format!(
            "version {} is signed by key {}, which is not trusted",
            version.short(),
            sig.key
        ));
    };
    if k.revoked {
        return Err(format!(
            "version {} is signed by key {}, which was revoked",
            version.short(),
            sig.key
        ));
    }
    if !verify_raw(&k.public, &version_msg(version), &sig.sig) {
        return Err(format!(
            "the signature of version {} by key {} does not verify",
            version.short(),
            sig.key
        ));
    }
    Ok(())
}

/// Updates `trusted` from the keys a server offers: revocations of trusted
/// keys apply; a new key is trusted when a trusted, unrevoked key endorsed
/// it (in chains: A endorses B endorses C). Returns the ids added.
pub fn learn(trusted: &mut Vec<TrustedKey>, offered: &[PublicKey]) -> Vec<String> {
    let mut added = Vec::new();
    loop {
        let mut grew = false;
        for k in offered {
            if let Some(t) = trusted.iter_mut().find(|t| t.id == k.id) {
                if k.revoked_ns.is_some() && !t.revoked {
                    t.revoked = true;
                }
                continue;
            }
            let Some(e) = &k.endorsed_by else { continue };
            let Ok(public) = hex::decode(&k.public) else {
                continue;
            };
            if key_id(&public) != k.id {
                continue;
            }
            let endorser = trusted.iter().find(|t| t.id == e.key && !t.revoked);
            let ok = endorser.is_some_and(|t| {
                verify_raw(&t.public, &[ENDORSE_CONTEXT, &public[..]].concat(), &e.sig)
            });
            if ok {
                trusted.push(TrustedKey {
                    id: k.id.clone(),
                    public: k.public.clone(),
                    revoked: k.revoked_ns.is_some(),
                });
                added.push(k.id.clone());
                grew = true;
            }
        }
        if !grew {
            return added;
        }
    }
}

/// Trusts every key offered that is not revoked (on `remote add` and
/// `remote trust`); keys whose id does not match are left out.
pub fn trust_all(offered: &[PublicKey]) -> Vec<TrustedKey> {
    offered
        .iter()
        .filter(|k| k.revoked_ns.is_none())
        .filter(|k| hex::decode(&k.public).is_ok_and(|p| key_id(&p) == k.id))
        .map(|k| TrustedKey {
            id: k.id.clone(),
            public: k.public.clone(),
            revoked: false,
        })
        .collect()
}

impl Store {
    fn key_records(&self) -> Result<Vec<KeyRecord>> {
        let mut out: Vec<KeyRecord> = self
            .records(KEY)?
            .iter()
            .map(|(name, v)| {
                serde_json::from_slice(v).map_err(|e| Error::RecordCorrupt {
                    what: format!("{KEY} {name}"),
                    reason: e.to_string(),
                })
            })
            .collect::<Result<_>>()?;
        out.sort_by_key(|k| k.key.created_ns);
        Ok(out)
    }

    /// The server's signing keys, oldest first (public parts only).
    ///
    /// # Errors
    /// Store failures, corrupt records.
    pub fn signing_keys(&self) -> Result<Vec<PublicKey>> {
        Ok(self.key_records()?.into_iter().map(|k| k.key).collect())
    }

    /// Makes a new signing key, endorsed by the active one if any; it
    /// signs from now on.
    ///
    /// # Errors
    /// Store failures.
    pub fn generate_key(&self) -> Result<PublicKey> {
        self.require_write()?;
        let seed: [u8; 32] = rand::random();
        let pair = Ed25519KeyPair::from_seed_unchecked(&seed)
            .map_err(|e| Error::InvalidInput(format!("cannot make an ed25519 key: {e}")))?;
        let public = pair.public_key().as_ref().to_vec();
        let endorsed_by = match self.active_key()? {
            Some((k, signer)) => Some(Endorsement {
                key: k.id,
                sig: hex::encode(
                    signer
                        .sign(&[ENDORSE_CONTEXT, &public[..]].concat())
                        .as_ref(),
                ),
            }),
            None => None,
        };
        let key = PublicKey {
            id: key_id(&public),
            public: hex::encode(&public),
            created_ns: now_ns(),
            revoked_ns: None,
            endorsed_by,
        };
        let rec = KeyRecord {
            key: key.clone(),
            seed: hex::encode(seed),
        };
        let mut batch = self.batch()?;
        // Plain data always serialises.
        #[allow(clippy::expect_used)]
        batch.put_record(
            KEY,
            &key.id,
            &serde_json::to_vec(&rec).expect("key serialises"),
        )?;
        self.commit(batch)?;
        Ok(key)
    }

    /// Revokes key `id` (by its id or a prefix of it).
    ///
    /// # Errors
    /// No such key, or more than one with that prefix; store failures.
    pub fn revoke_key(&self, id: &str) -> Result<PublicKey> {
        self.require_write()?;
        let hits: Vec<KeyRecord> = self
            .key_records()?
            .into_iter()
            .filter(|k| k.key.id.starts_with(id))
            .collect();
        let mut rec = match hits.as_slice() {
            [one] => one.clone(),
            [] => return Err(Error::InvalidInput(format!("no signing key `{id}`"))),
            _ => {
                return Err(Error::InvalidInput(format!(
                    "`{id}` names {} signing keys; give more of the id",
                    hits.len()
                )))
            }
        };
        if rec.key.revoked_ns.is_none() {
            rec.key.revoked_ns = Some(now_ns());
            let mut batch = self.batch()?;
            // Plain data always serialises.
            #[allow(clippy::expect_used)]
            batch.put_record(
                KEY,
                &rec.key.id,
                &serde_json::to_vec(&rec).expect("key serialises"),
            )?;
            self.commit(batch)?;
        }
        Ok(rec.key)
    }

    fn active_key(&self) -> Result<Option<(PublicKey, Ed25519KeyPair)>> {
        let Some(rec) = self
            .key_records()?
            .into_iter()
            .rev()
            .find(|k| k.key.revoked_ns.is_none())
        else {
            return Ok(None);
        };
        let seed = hex::decode(&rec.seed).map_err(|e| Error::RecordCorrupt {
            what: format!("{KEY} {}", rec.key.id),
            reason: e.to_string(),
        })?;
        let pair =
            Ed25519KeyPair::from_seed_unchecked(&seed).map_err(|e| Error::RecordCorrupt {
                what: format!("{KEY} {}", rec.key.id),
                reason: e.to_string(),
            })?;
        Ok(Some((rec.key, pair)))
    }

    /// Signatures by the active key over `versions` (none without a key).
    ///
    /// # Errors
    /// Store failures.
    pub fn sign_versions(&self, versions: &[VersionId]) -> Result<Vec<VersionSig>> {
        let Some((k, pair)) = self.active_key()? else {
            return Ok(Vec::new());
        };
        Ok(versions
            .iter()
            .map(|v| VersionSig {
                version: *v,
                key: k.id.clone(),
                sig: hex::encode(pair.sign(&version_msg(*v)).as_ref()),
            })
            .collect())
    }

    /// The signature kept with `version`, if any.
    ///
    /// # Errors
    /// Store failures.
    pub fn version_sig(&self, version: VersionId) -> Result<Option<VersionSig>> {
        let Some(b) = self.record(SIG, &version.to_hex())? else {
            return Ok(None);
        };
        serde_json::from_slice(&b)
            .map(Some)
            .map_err(|e| Error::RecordCorrupt {
                what: format!("{SIG} {}", version.short()),
                reason: e.to_string(),
            })
    }

    /// Keeps `sig` with its version (in `batch`).
    pub(crate) fn put_version_sig(
        batch: &mut crate::catalog::Batch<'_>,
        sig: &VersionSig,
    ) -> Result<()> {
        // Plain data always serialises.
        #[allow(clippy::expect_used)]
        batch.put_record(
            SIG,
            &sig.version.to_hex(),
            &serde_json::to_vec(sig).expect("signature serialises"),
        )
    }

    /// Whether `version` of `layer` may be mounted, booted or put under a
    /// disk: its subscription has not ended
    /// ([`Store::check_subscription`]), and it is signed by a trusted,
    /// unrevoked key of every remote with trusted keys it is tracked from
    /// (`os` and `group` layers; others need no signature).
    ///
    /// # Errors
    /// [`Error::SubscriptionEnded`]; [`Error::Unsigned`] naming the layer,
    /// the version and the key; store failures.
    pub fn check_usable(&self, layer: &Layer, version: VersionId) -> Result<()> {
        self.check_subscription(&layer.name)?;
        if !signed_kind(layer.kind) {
            return Ok(());
        }
        for r in self.remote_configs()? {
            if r.keys.is_empty()
                || self
                    .ref_target(&crate::remote::tracking_ref(&r.name, &layer.name))?
                    .is_none()
            {
                continue;
            }
            let sig = self.version_sig(version)?;
            check(&r.keys, version, sig.as_ref()).map_err(|why| Error::Unsigned {
                layer: layer.name.clone(),
                remote: r.name.clone(),
                reason: why,
            })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn key(seed: u8) -> (Ed25519KeyPair, PublicKey) {
        let pair = Ed25519KeyPair::from_seed_unchecked(&[seed; 32]).unwrap();
        let public = pair.public_key().as_ref().to_vec();
        let k = PublicKey {
            id: key_id(&public),
            public: hex::encode(&public),
            created_ns: i64::from(seed),
            revoked_ns: None,
            endorsed_by: None,
        };
        (pair, k)
    }

    fn endorse(by: &(Ed25519KeyPair, PublicKey), k: &mut PublicKey) {
        let public = hex::decode(&k.public).unwrap();
        k.endorsed_by = Some(Endorsement {
            key: by.1.id.clone(),
            sig: hex::encode(by.0.sign(&[ENDORSE_CONTEXT, &public[..]].concat()).as_ref()),
        });
    }

    #[test]
    fn signatures_verify_only_for_their_version_and_trusted_keys() {
        let a = key(1);
        let trusted = trust_all(std::slice::from_ref(&a.1));
        let v = VersionId([9; 32]);
        let sig = VersionSig {
            version: v,
            key: a.1.id.clone(),
            sig: hex::encode(a.0.sign(&version_msg(v)).as_ref()),
        };
        assert_eq!(check(&trusted, v, Some(&sig)), Ok(()));
        assert!(check(&trusted, v, None).unwrap_err().contains("not signed"));
        let other = VersionId([8; 32]);
        let moved = VersionSig {
            version: other,
            ..sig.clone()
        };
        assert!(check(&trusted, other, Some(&moved))
            .unwrap_err()
            .contains("does not verify"));
        let mut bad = sig.clone();
        bad.sig
            .replace_range(0..2, if &bad.sig[0..2] == "00" { "01" } else { "00" });
        assert!(check(&trusted, v, Some(&bad))
            .unwrap_err()
            .contains("does not verify"));
        let b = key(2);
        let by_b = VersionSig {
            version: v,
            key: b.1.id.clone(),
            sig: hex::encode(b.0.sign(&version_msg(v)).as_ref()),
        };
        assert!(check(&trusted, v, Some(&by_b))
            .unwrap_err()
            .contains("not trusted"));
    }

    #[test]
    fn endorsed_keys_are_learned_in_chains_and_revocations_apply() {
        let a = key(1);
        let mut b = key(2);
        endorse(&a, &mut b.1);
        let mut c = key(3);
        endorse(&b, &mut c.1);
        let stranger = key(4);
        let mut trusted = trust_all(std::slice::from_ref(&a.1));
        let added = learn(
            &mut trusted,
            &[stranger.1.clone(), c.1.clone(), b.1.clone(), a.1.clone()],
        );
        assert_eq!(added.len(), 2, "{added:?}");
        assert!(trusted.iter().any(|t| t.id == b.1.id));
        assert!(trusted.iter().any(|t| t.id == c.1.id));
        assert!(
            !trusted.iter().any(|t| t.id == stranger.1.id),
            "not endorsed"
        );
        let mut revoked_a = a.1.clone();
        revoked_a.revoked_ns = Some(5);
        learn(&mut trusted, &[revoked_a]);
        assert!(trusted.iter().find(|t| t.id == a.1.id).unwrap().revoked);
        // A key endorsed only by a revoked key is not learned.
        let mut d = key(5);
        endorse(&a, &mut d.1);
        assert!(learn(&mut trusted, &[d.1]).is_empty());
    }
}
