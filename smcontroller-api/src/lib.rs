//! Traits and domain types of the Aos SM controller, and nothing else.
//!
//! This crate names no transport, TLS or runtime type: no tonic, prost, rustls, hyper or h2
//! appears in its dependency tree (contract R-SHAPE-1). Its only runtime piece is
//! `tokio::sync::watch`, used to publish state (cloud connection, certificate renewals).
//! A CM module that needs to talk to nodes depends on this crate alone; with the `mock` feature
//! it gets a mockall fake of every trait for its own tests.
//!
//! Start reading at [`SmController`]: the five interfaces the controller provides to the CM.
//! The interfaces it requires from the CM (receivers of node data, certificate and blob
//! providers) are in [`required`]. The data they carry is in [`types`]; the one error type is
//! [`Error`].

mod error;
pub mod provided;
pub mod required;
pub mod types;

pub use error::{Error, Result};
pub use provided::*;
pub use required::*;
pub use types::*;
