//! Kernel benchmarks (being written).
fn main() {}
