//! The router of the SM controller: the registry of connected nodes, one session per SM
//! stream, the matching of sync replies to their callers, and command fan-out.
//!
//! It knows no wire format: a transport hands it a stream of [`InboundEvent`]s per SM
//! connection and writes out the [`Outbound`] commands it gets back. Start reading at
//! [`Controller`].

pub mod message;

pub use message::{Inbound, InboundEvent, LogQuery, Outbound};
