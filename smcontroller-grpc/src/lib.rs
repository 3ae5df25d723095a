//! The wire side of the SM controller: code generated from `proto/`, the conversions between
//! the protocol messages and the domain types of `smcontroller-api`, and the tonic `SMService`.
//!
//! Start reading at [`convert`] (every message in and out of the controller) and [`service`].
//! Nothing outside this crate sees a prost or tonic type.

pub mod codec;
pub mod connections;
pub mod convert;
pub mod guard;
pub mod ids;
pub mod network;
pub mod proto;
pub mod server;
pub mod service;
pub mod tls;
