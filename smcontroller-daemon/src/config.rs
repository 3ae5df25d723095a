//! Daemon configuration (in progress).
