//! Test tooling: writes a model repository whose models are NEFFs the project's stand-in libnrt can
//! execute (the built-in `linear` and `mlp`, with their real weights, one NEFF per batch bucket).
//! These NEFFs carry a stand-in program, not Neuron machine code: they do not run on hardware.

use std::path::Path;

use super::writer::{Activation as NeffActivation, DenseLayer as NeffLayer, NeffBuilder};
use crate::backend::cpu::{Activation, builtin};

fn to_neff_layers(name: &str) -> Option<(Vec<NeffLayer>, usize, usize)> {
    let stack = builtin::builtin(name)?;
    let layers: Vec<NeffLayer> = stack
        .layers
        .iter()
        .map(|l| NeffLayer {
            weight: l.weight.clone(),
            bias: Some(l.bias.clone()),
            in_features: l.in_dim as u64,
            out_features: l.out_dim as u64,
            activation: match l.activation {
                Activation::None => NeffActivation::None,
                Activation::Relu => NeffActivation::Relu,
                Activation::Gelu => NeffActivation::Gelu,
                Activation::Tanh => NeffActivation::Tanh,
            },
        })
        .collect();
    Some((layers, stack.input_dim(), stack.output_dim()))
}

/// Writes `<root>/<model>/config.pbtxt` and `<root>/<model>/1/model_b{N}.neff` for each bucket, for
/// the built-in dense model `model` (`linear` or `mlp`). `extra_config` is appended to the config.
pub fn write_standin_model(root: &Path, model: &str, buckets: &[usize], extra_config: &str) -> Result<(), String> {
    let (layers, din, dout) = to_neff_layers(model).ok_or_else(|| format!("no built-in dense model '{model}'"))?;
    let vdir = root.join(model).join("1");
    std::fs::create_dir_all(&vdir).map_err(|e| format!("{}: {e}", vdir.display()))?;
    for b in buckets {
        let neff = NeffBuilder::dense_chain(format!("{model}_b{b}"), *b as u64, "INPUT0", "OUTPUT0", &layers);
        neff.write_to(vdir.join(format!("model_b{b}.neff"))).map_err(|e| e.to_string())?;
    }
    let bucket_list: Vec<String> = buckets.iter().map(|b| b.to_string()).collect();
    let config = format!(
        r#"name: "{model}"
backend: "neuron"
max_batch_size: 64
input [ {{ name: "INPUT0" data_type: TYPE_FP32 dims: [ {din} ] }} ]
output [ {{ name: "OUTPUT0" data_type: TYPE_FP32 dims: [ {dout} ] }} ]
parameters {{ key: "neuron_batch_buckets" value: {{ string_value: "{}" }} }}
{extra_config}
"#,
        bucket_list.join(",")
    );
    std::fs::write(root.join(model).join("config.pbtxt"), config).map_err(|e| e.to_string())
}
