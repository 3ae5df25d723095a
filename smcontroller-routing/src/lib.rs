//! The router of the SM controller: the registry of connected nodes, one session per SM
//! stream, the matching of sync replies to their callers, and command fan-out.
//!
//! It knows no wire format and depends on no transport: a transport (`smcontroller-grpc`)
//! calls [`Controller::attach`] for each SM stream with the stream's messages converted to
//! [`InboundEvent`]s, and writes out the [`Outgoing`] items it gets back. CM modules use the
//! [`Controller`] through the provided traits of `smcontroller-api`.
//!
//! Read top-down: [`Controller`] (`controller.rs`: the api, cloud relay, shutdown), then
//! `session.rs` (one stream's reader and dispatcher), then `lifecycle.rs` (the one owner of each
//! node id: which stream its commands go to, and the order its streams are reported in), and
//! `waiters.rs` (sync replies matched by send order).

mod controller;
mod lifecycle;
pub mod message;
mod meters;
mod queue;
mod receivers;
mod session;
mod settings;
mod subscriptions;
mod waiters;

pub use controller::{AttachError, CommandLimit, Controller, NodeStatus};
pub use lifecycle::Commands;
pub use message::{EndCode, EndStatus, Inbound, InboundEvent, LogQuery, Outbound, Outgoing};
pub use receivers::Receivers;
pub use settings::Settings;
pub use smcontroller_limits::{Budget, Refusals};
pub use subscriptions::{SUBSCRIPTION_BACKLOG, SubscribeError, Subscription, Subscriptions};
