//! The SM controller's admin API (`smcontroller.admin.v1`, in `proto/smcontroller/admin/`):
//! what an operator sees of the controller and drives through it, from outside the process.
//!
//! - [`server`]: the [`AdminService`](server::AdminService) on top of the router
//!   ([`smcontroller_routing::Controller`]), served on a local endpoint of its own (a Unix
//!   socket by default, or a loopback TCP port), never on the SM listener.
//! - [`events`]: the [`EventHub`](events::EventHub) that fans what nodes send out to admin
//!   subscribers without ever slowing the SMs down.
//! - [`directory`]: what the server asks the daemon's receiver about each node.
//! - [`client`]: connecting to the admin endpoint; [`json`]: the protobuf JSON mapping `smctl`
//!   prints and reads.
//! - The `smctl` binary: the command line on this API.
//!
//! It depends on the router and the grpc crate (whose `servicemanager.v5` messages the admin
//! API reuses); the daemon depends on it, never the other way. Start reading at
//! [`server::AdminService`].

pub mod client;
pub mod directory;
pub mod events;
pub mod json;
pub mod proto;
pub mod server;
