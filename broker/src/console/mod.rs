//! The web console, served by `lamina server` beside the APIs: users log in
//! with a password, see their pools, connect (noVNC in the page, over the
//! broker's WebSocket proxy) and disconnect; admins see hosts, pools and
//! their VMs, sessions (force disconnect), users, subscriptions, rules,
//! the device table and the audit log.
//!
//! | route | who | does |
//! |---|---|---|
//! | `GET /console/login`, `POST /console/login` | anyone | log in (rate-limited) |
//! | `POST /console/logout` | logged in | log out |
//! | `GET /console` | logged in | pools and open sessions |
//! | `POST /console/pools/{pool}/connect` | subscribed | allocate, then the screen |
//! | `GET /console/screen/{session}` | its user | noVNC with a fresh ticket |
//! | `POST /console/sessions/{id}/end` | its user, admin | disconnect |
//! | `GET /console/ws?ticket=T` | the ticket's | WebSocket to the VM's VNC |
//! | `GET /console/novnc/…` | anyone | noVNC's files (`--novnc-dir`) |
//! | `GET /console/admin`, `/console/admin/audit` | admin | the admin pages |
//! | `GET`, `POST /console/admin/pools/{pool}/rules` | admin | edit rules |
//! | `POST /console/admin/pools/{pool}/subscribe` · `unsubscribe` | admin | subscriptions |
//! | `POST /console/admin/devices` | admin | the device table |
//! | `POST /api/v1/sessions/{id}/ticket` | its user (bearer) | a screen ticket |
//! | `PUT /api/v1/users/{name}/password` | the user, admin (bearer) | the console password; ends the user's logins |
//!
//! Every POST needs the login's CSRF token and an `Origin` of the console
//! itself; responses carry a strict Content-Security-Policy (scripts and
//! styles by nonce only) and `X-Frame-Options: DENY`.

mod admin;
mod device;
mod login;
mod pages;
mod proxy;
mod rfb;
mod routes;

use std::path::PathBuf;
use std::sync::Arc;

use axum::extract::FromRef;
use lamina_sync::api::ApiState;

pub use device::{Device, DeviceRule, DeviceTable};
pub use login::{Logins, FAIL_WINDOW, MAX_FAILURES};
pub use proxy::{Tickets, TICKET_TTL};
pub use routes::router;

use crate::api::BrokerState;

/// Where noVNC is found unless told (Debian's `novnc` package).
pub const NOVNC_DIR: &str = "/usr/share/novnc";

/// What the console's handlers share.
#[derive(Clone)]
pub struct ConsoleState {
    /// The broker and the store.
    pub b: BrokerState,
    logins: Arc<Logins>,
    tickets: Arc<Tickets>,
    novnc: PathBuf,
    secure: bool,
}

impl FromRef<ConsoleState> for ApiState {
    fn from_ref(s: &ConsoleState) -> ApiState {
        s.b.api.clone()
    }
}

impl ConsoleState {
    /// The console over `b`, serving noVNC from `novnc`; `secure`: the
    /// listener speaks TLS (origins are `https://`).
    pub fn new(b: BrokerState, novnc: PathBuf, secure: bool) -> ConsoleState {
        ConsoleState {
            b,
            logins: Arc::new(Logins::default()),
            tickets: Arc::new(Tickets::default()),
            novnc,
            secure,
        }
    }
}

/// Reads the device table.
///
/// # Errors
/// Catalog failures, a stored table that does not parse.
pub fn devices(store: &lamina_sync::Store) -> crate::Result<DeviceTable> {
    device::load(store)
}

/// Replaces the device table.
///
/// # Errors
/// Catalog failures.
pub fn set_devices(store: &lamina_sync::Store, table: &DeviceTable) -> crate::Result<()> {
    device::save(store, table)
}
