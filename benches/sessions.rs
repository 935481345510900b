//! Stateful sessions benchmark (filled in below).
fn main() {}
