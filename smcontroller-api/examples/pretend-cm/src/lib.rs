//! A pretend CM module, written as a CM module author would: against `smcontroller-api` alone.
//!
//! It is the node-facing half of a launcher: it puts the desired service instances on each node
//! through [`InstanceRunner`](smcontroller_api::InstanceRunner), checking first with
//! [`NodeConfigHandler`](smcontroller_api::NodeConfigHandler) that the node's configuration is
//! installed, and it listens to the nodes' instance statuses through
//! [`InstanceStatusReceiver`](smcontroller_api::InstanceStatusReceiver).
//!
//! It exists to show, and to check in CI, that such a module needs no transport, routing or
//! daemon crate: its dependencies are the api crate and `async-trait`, and its tests (in
//! `tests/`) use the mockall fakes of the api's `mock` feature.
//!
//! Start reading at [`Launcher::apply`].

pub mod launcher;

pub use launcher::{Desired, Launcher, NodeOutcome, Report};
