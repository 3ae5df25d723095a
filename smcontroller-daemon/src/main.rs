//! smcontrollerd (in progress).
fn main() {}
