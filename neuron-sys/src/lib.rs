//! Raw FFI bindings to libnrt (placeholder; being written).
