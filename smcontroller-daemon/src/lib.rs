//! The SM controller as a program: `smcontrollerd` (the daemon) and `sm-sim` (a simulator of
//! Service Managers that speaks the wire protocol, for demos, tests and benchmarks).
//!
//! Start reading at [`config`] (what an operator sets) and [`sim`] (what a simulated SM does).

pub mod app;
pub mod config;
pub mod network;
pub mod ready;
pub mod receivers;
pub mod sim;
