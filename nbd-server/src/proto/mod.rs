//! The NBD protocol (NetworkBlockDevice/nbd `doc/proto.md`): constants,
//! the handshake, and transmission-phase messages.

pub mod consts;
pub mod handshake;
pub mod wire;
