//! Build script (proto compilation is being added).
fn main() {}
