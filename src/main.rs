//! The `neuron-worker` command line: serve, inspect, bench.

fn main() {}
