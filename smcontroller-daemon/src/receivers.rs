//! Default receivers (in progress).
