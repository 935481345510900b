//! End-to-end benchmark: one ModelInfer round trip against an in-process worker (being written).

fn main() {}
