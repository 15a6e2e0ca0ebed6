//! The device table: which display profile fits the device a request comes
//! from. Rules are tried in order; the first whose User-Agent words or
//! largest viewport match gives the profile; none matching means `pc`.
//! Admins edit it as TOML (`[[device]] name, ua = [...], max_width,
//! profile`) on the console's admin page or with `PUT /api/v1/devices`.

use lamina_sync::Store;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

const DEVICES: &str = "broker-devices";
const TABLE: &str = "table";

/// One row of the table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceRule {
    /// Name shown to users (`phone`, `tablet`, …).
    pub name: String,
    /// Words of the User-Agent, any of which matches.
    #[serde(default)]
    pub ua: Vec<String>,
    /// A viewport at most this wide (CSS pixels) matches.
    #[serde(default)]
    pub max_width: Option<u32>,
    /// Display profile (`pc`, `phone`).
    pub profile: String,
}

/// The table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceTable {
    /// The rows, tried in order.
    #[serde(default)]
    pub device: Vec<DeviceRule>,
}

impl Default for DeviceTable {
    fn default() -> DeviceTable {
        DeviceTable {
            device: vec![DeviceRule {
                name: "phone".into(),
                ua: vec!["Mobile".into(), "Android".into(), "iPhone".into()],
                max_width: Some(600),
                profile: "phone".into(),
            }],
        }
    }
}

/// The device a request was matched to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Device {
    /// Its row's name, or `pc`.
    pub name: String,
    /// The profile that fits it.
    pub profile: String,
}

impl DeviceTable {
    /// Parses and checks a table.
    ///
    /// # Errors
    /// Malformed TOML, an unknown profile, a row that can never match.
    pub fn parse(text: &str) -> Result<DeviceTable> {
        let t: DeviceTable =
            toml::from_str(text).map_err(|e| Error::InvalidInput(format!("device table: {e}")))?;
        for d in &t.device {
            if d.profile != "pc" && d.profile != "phone" {
                return Err(Error::InvalidInput(format!(
                    "device {}: profile {:?} is not pc or phone",
                    d.name, d.profile
                )));
            }
            if d.ua.is_empty() && d.max_width.is_none() {
                return Err(Error::InvalidInput(format!(
                    "device {} matches nothing: give ua words or max_width",
                    d.name
                )));
            }
        }
        Ok(t)
    }

    /// The table as TOML.
    pub fn to_toml(&self) -> String {
        // Plain data: serialising it cannot fail.
        toml::to_string(self).unwrap_or_default()
    }

    /// The device of a request with User-Agent `ua` and viewport width `vw`.
    pub fn classify(&self, ua: &str, vw: Option<u32>) -> Device {
        self.device
            .iter()
            .find(|d| {
                d.ua.iter().any(|w| ua.contains(w.as_str()))
                    || matches!((d.max_width, vw), (Some(m), Some(w)) if w <= m)
            })
            .map_or(
                Device {
                    name: "pc".into(),
                    profile: "pc".into(),
                },
                |d| Device {
                    name: d.name.clone(),
                    profile: d.profile.clone(),
                },
            )
    }
}

/// The table in force.
///
/// # Errors
/// Catalog failures, a stored table that does not parse.
pub fn load(store: &Store) -> Result<DeviceTable> {
    match store.record(DEVICES, TABLE)? {
        None => Ok(DeviceTable::default()),
        Some(v) => DeviceTable::parse(&String::from_utf8_lossy(&v)),
    }
}

/// Replaces the table.
///
/// # Errors
/// Catalog failures.
pub fn save(store: &Store, table: &DeviceTable) -> Result<()> {
    let mut batch = store.batch()?;
    batch.put_record(DEVICES, TABLE, table.to_toml().as_bytes())?;
    store.commit(batch)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_table() {
        let t = DeviceTable::default();
        let phone = "Mozilla/5.0 (Linux; Android 14; Pixel 8) Mobile Safari/537.36";
        assert_eq!(t.classify(phone, None).profile, "phone");
        assert_eq!(
            t.classify("Mozilla/5.0 (X11; Linux x86_64)", Some(1280))
                .profile,
            "pc"
        );
        assert_eq!(
            t.classify("Mozilla/5.0 (X11; Linux x86_64)", Some(390))
                .profile,
            "phone"
        );
        assert_eq!(DeviceTable::parse(&t.to_toml()).unwrap(), t);
    }

    #[test]
    fn bad_tables() {
        assert!(DeviceTable::parse("[[device]]\nname='x'\nprofile='tv'\nua=['a']").is_err());
        assert!(DeviceTable::parse("[[device]]\nname='x'\nprofile='pc'").is_err());
        assert!(DeviceTable::parse("nonsense = [").is_err());
    }
}
