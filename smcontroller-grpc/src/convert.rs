//! Conversions between protocol messages and domain types (in progress).
