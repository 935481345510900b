//! Neuron backend over libnrt (being written).
