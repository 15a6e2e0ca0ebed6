//! `lamina-broker`: the VMI half of Lamina (DESIGN §9).
//!
//! * [`agent`]: the host agent — one host's VM runner behind an
//!   authenticated HTTPS API (`lamina host-agent`) — and the broker's client
//!   of it.
//! * [`model`]: hosts, pools, subscriptions, the pools' VMs and sessions, as
//!   records in the server store's catalog ([`BrokerCatalog`]).
//! * [`rules`]: a pool's rules (TOML), with time windows.
//! * [`Broker`]: the shared state; its rule engine ([`Broker::run`]) keeps
//!   every pool within its rules, its allocator ([`Broker::allocate`])
//!   hands subscribed users desktops.
//! * [`api`]: the JSON API, served by `lamina server` beside the sync API
//!   on the same listener, with the same users and tokens.
//! * [`audit`]: every allocation, release, admin and engine action.
//!
//! # Threads
//!
//! Everything runs on the server's tokio runtime; catalog work goes to the
//! blocking pool. Decisions over VMs and sessions are taken under one async
//! lock and recorded before it is released; work on hosts (seconds) runs
//! outside it on members marked pending.

pub mod agent;
mod alloc;
pub mod api;
pub mod audit;
mod broker;
pub mod console;
pub mod desktop;
mod engine;
mod error;
pub mod model;
pub mod password;
pub mod rules;

pub use alloc::Desktop;
pub use audit::AuditEntry;
pub use broker::{Broker, HostStatus};
pub use engine::ACTOR as ENGINE_ACTOR;
pub use error::{Error, Result};
pub use model::BrokerCatalog;
