//! Creating Neuron instances for a model version folder that holds NEFF files (one per bucket).

use std::path::Path;

use crate::backend::ModelInstance;
use crate::config::ModelSpec;
use crate::repository::BackendSelection;

/// One instance per NeuronCore, each with the model's NEFFs loaded on its core.
pub(crate) fn create_neuron_instances(
    spec: &ModelSpec,
    dir: &Path,
    _backend: &BackendSelection,
) -> Result<Vec<Box<dyn ModelInstance>>, String> {
    Err(format!("model '{}' ({}): the Neuron backend is not wired into the repository yet", spec.name, dir.display()))
}
