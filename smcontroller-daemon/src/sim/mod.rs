//! SM simulator (in progress).
