//! The SM controller as a program: `smcontrollerd`, the daemon, and `smcontroller-demo`, which
//! runs it on loopback with simulated SMs (the `sm-sim` binary) and drives it with `smctl`.
//!
//! This crate wires the library crates together and holds what only a process needs: the
//! configuration and command line ([`config`]), the start and stop of the router, the SM
//! server, the admin API and the metrics exporter as one ([`app`]), and the receivers that log
//! what nodes send ([`receivers`]). It is the top of the workspace: no library crate depends on
//! it (the simulator, `smcontroller-sim`, and the bench harness, `smcontroller-bench`, are
//! crates of their own), so what it depends on (admin, metrics exporter, sd-notify, PKCS#11)
//! stays out of everyone else's build.
//!
//! Start reading at [`config`] (what an operator sets), then [`app`] (how it is wired).

pub mod app;
pub mod config;
pub mod memory;
pub mod ready;
pub mod receivers;
