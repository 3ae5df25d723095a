//! sm-sim (in progress).
fn main() {}
