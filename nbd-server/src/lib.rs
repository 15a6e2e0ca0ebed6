//! `lamina-nbd`: Lamina's disk view.
#![allow(missing_docs)]

pub mod error;
pub mod qcow;
pub mod source;

pub use error::{Error, Result};
