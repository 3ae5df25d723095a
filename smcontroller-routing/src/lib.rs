//! The router of the SM controller: the registry of connected nodes, one session per SM
//! stream, the matching of sync replies to their callers, and command fan-out.
//!
//! It knows no wire format and depends on no transport: a transport (`smcontroller-grpc`)
//! calls [`Controller::attach`] for each SM stream with the stream's messages converted to
//! [`InboundEvent`]s, and writes out the [`Outgoing`] items it gets back. CM modules use the
//! [`Controller`] through the provided traits of `smcontroller-api`.
//!
//! Start reading at [`Controller`], then `session.rs` (one stream's reader and dispatcher).

mod controller;
pub mod message;
mod receivers;
mod session;
mod settings;
mod waiters;

pub use controller::{Controller, EndCode, EndStatus, Outgoing, ShuttingDown};
pub use message::{Inbound, InboundEvent, LogQuery, Outbound};
pub use receivers::Receivers;
pub use settings::Settings;
