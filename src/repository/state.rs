//! A model's state in the repository index (Triton's RepositoryIndex `state` strings).

use std::fmt;

/// Where a model stands in the repository.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ModelState {
    /// At least one version is serving.
    Ready,
    /// No version is serving: it failed to load, or was unloaded.
    Unavailable,
    /// Being unloaded: it finishes what it accepted and takes nothing new.
    Unloading,
}

impl ModelState {
    /// The protocol's name: `READY`, `UNAVAILABLE` or `UNLOADING`.
    pub fn as_str(self) -> &'static str {
        match self {
            ModelState::Ready => "READY",
            ModelState::Unavailable => "UNAVAILABLE",
            ModelState::Unloading => "UNLOADING",
        }
    }
}

impl fmt::Display for ModelState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<ModelState> for String {
    fn from(state: ModelState) -> String {
        state.as_str().to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_the_protocol_names() {
        assert_eq!(String::from(ModelState::Unloading), "UNLOADING");
        assert_eq!(serde_json::to_value(ModelState::Ready).ok(), Some(serde_json::json!("READY")));
    }
}
