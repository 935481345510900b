//! Which backend runs a loaded model version.

use std::fmt;

/// The backend a model version runs on, as reported by ModelMetadata's `platform` and `/capacity`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// The CPU reference backend.
    Cpu,
    /// The Neuron runtime (libnrt).
    Neuron,
}

impl BackendKind {
    /// The name clients see: `cpu` or `neuron`.
    pub fn as_str(self) -> &'static str {
        match self {
            BackendKind::Cpu => "cpu",
            BackendKind::Neuron => "neuron",
        }
    }
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_the_protocol_names() {
        assert_eq!(BackendKind::Cpu.to_string(), "cpu");
        assert_eq!(serde_json::to_value(BackendKind::Neuron).ok(), Some(serde_json::json!("neuron")));
    }
}
