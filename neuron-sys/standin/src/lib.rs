//! Test-only stand-in for libnrt (placeholder; being written).
