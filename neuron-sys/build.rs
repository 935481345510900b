//! Build script: regenerates bindings when asked (being written).
fn main() {}
