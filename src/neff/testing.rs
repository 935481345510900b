//! Test tooling: writes a model repository whose models are NEFFs the project's stand-in libnrt can
//! execute (the built-in `linear` and `mlp`, with their real weights, one NEFF per batch bucket;
//! the stateful `accumulate` and `gru`, one NEFF with a row per sequence slot).
//! These NEFFs carry a stand-in program, not Neuron machine code: they do not run on hardware.

use std::path::Path;

use crate::backend::cpu::stateful::kernels::{GRU_HIDDEN, GRU_INPUT, GruCell, STATEFUL_BUILTIN_CONFIGS};
use crate::backend::cpu::{Activation, builtin};
use crate::backend::neuron::sequence::neuron_config;
use crate::config::SequenceSpec;
use crate::config::{ModelSpec, parse_model_config};
use crate::tensor::DataType;
use neff_format::writer::{Activation as NeffActivation, DenseLayer as NeffLayer, NeffBuilder, ProgramOp};

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

/// The NEFF of the built-in dense model `model` (`linear` or `mlp`, its real weights) compiled
/// for batch size `batch`: `INPUT0 [batch, in]` → `OUTPUT0 [batch, out]`.
pub fn builtin_dense_neff(model: &str, batch: usize) -> Result<NeffBuilder, String> {
    let (layers, _, _) = to_neff_layers(model).ok_or_else(|| format!("no built-in dense model '{model}'"))?;
    Ok(NeffBuilder::dense_chain(format!("{model}_b{batch}"), batch as u64, "INPUT0", "OUTPUT0", &layers))
}

/// Writes `<root>/<model>/config.pbtxt` and `<root>/<model>/1/model_b{N}.neff` for each bucket, for
/// the built-in dense model `model` (`linear` or `mlp`). `extra_config` is appended to the config.
pub fn write_standin_model(root: &Path, model: &str, buckets: &[usize], extra_config: &str) -> Result<(), String> {
    let (_, din, dout) = to_neff_layers(model).ok_or_else(|| format!("no built-in dense model '{model}'"))?;
    let vdir = root.join(model).join("1");
    std::fs::create_dir_all(&vdir).map_err(|e| format!("{}: {e}", vdir.display()))?;
    for b in buckets {
        let neff = builtin_dense_neff(model, *b)?;
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

/// Writes a per-token `linear` model with sequence buckets: `<root>/<name>/config.pbtxt` (input
/// `INPUT0` FP32 `[-1, 64]`, output `OUTPUT0` FP32 `[-1, 16]`, the first dimension the sequence) and
/// one NEFF `model_b{B}_s{S}.neff` per (batch, sequence) bucket, each the built-in `linear` applied
/// to every one of its B × S positions.
pub fn write_standin_seq_model(root: &Path, name: &str, batch: &[usize], seq: &[usize]) -> Result<(), String> {
    let vdir = root.join(name).join("1");
    std::fs::create_dir_all(&vdir).map_err(|e| format!("{}: {e}", vdir.display()))?;
    for b in batch {
        for s in seq {
            let neff = builtin_dense_neff("linear", b * s)?;
            neff.write_to(vdir.join(format!("model_b{b}_s{s}.neff"))).map_err(|e| e.to_string())?;
        }
    }
    let list = |v: &[usize]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>().join(",");
    let config = format!(
        r#"name: "{name}"
backend: "neuron"
max_batch_size: 64
input [ {{ name: "INPUT0" data_type: TYPE_FP32 dims: [ -1, 64 ] }} ]
output [ {{ name: "OUTPUT0" data_type: TYPE_FP32 dims: [ -1, 16 ] }} ]
parameters {{ key: "neuron_batch_buckets" value: {{ string_value: "{}" }} }}
parameters {{ key: "neuron_seq_buckets" value: {{ string_value: "{}" }} }}
"#,
        list(batch),
        list(seq)
    );
    std::fs::write(root.join(name).join("config.pbtxt"), config).map_err(|e| e.to_string())
}

fn neff_dtype(model: &str, dtype: DataType) -> Result<&'static str, String> {
    match dtype {
        DataType::Fp32 => Ok("float32"),
        DataType::Int32 => Ok("int32"),
        other => Err(format!("model '{model}': the stand-in runs float32 and int32 tensors, not {other}")),
    }
}

/// The stand-in program of a built-in stateful model: `accumulate` or `gru` (same weights as the
/// CPU kernel, [`GruCell::seeded`]). Rows not READY keep their state (`select`).
fn sequence_program(model: &str, builder: NeffBuilder) -> Result<NeffBuilder, String> {
    use NeffActivation as Activation;
    let op_bin = |op: fn(String, String, String) -> ProgramOp, a: &str, b: &str, out: &str| {
        op(a.to_owned(), b.to_owned(), out.to_owned())
    };
    let add = |a: String, b: String, output: String| ProgramOp::Add { a, b, output };
    let mul = |a: String, b: String, output: String| ProgramOp::Mul { a, b, output };
    let sub = |a: String, b: String, output: String| ProgramOp::Sub { a, b, output };
    let select = |a: &str, b: &str, output: &str| ProgramOp::Select {
        cond: "READY".into(),
        a: a.into(),
        b: b.into(),
        output: output.into(),
    };
    let copy = |input: &str, output: &str| ProgramOp::Copy { input: input.into(), output: output.into() };
    match model {
        "accumulate" => Ok(builder
            .op(op_bin(add, "ACC_IN", "INPUT", "sum"))
            .op(select("sum", "ACC_IN", "ACC_OUT"))
            .op(copy("sum", "OUTPUT"))),
        "gru" => {
            let cell = GruCell::seeded();
            let (hd, g) = (GRU_HIDDEN, 3 * GRU_HIDDEN);
            // Column block `k` (r = 0, z = 1, n = 2) of a row-major [rows][384] matrix.
            let block = |w: &[f32], rows: usize, k: usize| -> Vec<f32> {
                (0..rows).flat_map(|i| w[i * g + k * hd..i * g + (k + 1) * hd].to_vec()).collect()
            };
            let dense = |input: &str, weight: &str, bias: &str, output: &str| ProgramOp::Dense {
                input: input.into(),
                weight: weight.into(),
                bias: Some(bias.into()),
                activation: Activation::None,
                output: output.into(),
            };
            let act = |input: &str, function: Activation, output: &str| ProgramOp::Activation {
                input: input.into(),
                function,
                output: output.into(),
            };
            let mut b = builder;
            for (k, gate) in ["r", "z", "n"].iter().enumerate() {
                b = b
                    .blob(format!("wi_{gate}"), &[GRU_INPUT as u64, hd as u64], block(&cell.wi, GRU_INPUT, k))
                    .blob(format!("bi_{gate}"), &[hd as u64], cell.bi[k * hd..(k + 1) * hd].to_vec())
                    .blob(format!("wh_{gate}"), &[hd as u64, hd as u64], block(&cell.wh, hd, k))
                    .blob(format!("bh_{gate}"), &[hd as u64], cell.bh[k * hd..(k + 1) * hd].to_vec())
                    .op(dense("INPUT0", &format!("wi_{gate}"), &format!("bi_{gate}"), &format!("gi_{gate}")))
                    .op(dense("HIDDEN_IN", &format!("wh_{gate}"), &format!("bh_{gate}"), &format!("gh_{gate}")));
            }
            Ok(b.op(op_bin(add, "gi_r", "gh_r", "pre_r"))
                .op(act("pre_r", Activation::Sigmoid, "r"))
                .op(op_bin(add, "gi_z", "gh_z", "pre_z"))
                .op(act("pre_z", Activation::Sigmoid, "z"))
                .op(op_bin(mul, "r", "gh_n", "r_gh_n"))
                .op(op_bin(add, "gi_n", "r_gh_n", "pre_n"))
                .op(act("pre_n", Activation::Tanh, "n"))
                // h' = (1 − z) ⊙ n + z ⊙ h = n + z ⊙ (h − n)
                .op(op_bin(sub, "HIDDEN_IN", "n", "h_minus_n"))
                .op(op_bin(mul, "z", "h_minus_n", "z_h_minus_n"))
                .op(op_bin(add, "n", "z_h_minus_n", "h_new"))
                .op(select("h_new", "HIDDEN_IN", "HIDDEN_OUT"))
                .op(copy("h_new", "OUTPUT0")))
        }
        other => Err(format!("no built-in stateful model '{other}' (accumulate, gru)")),
    }
}

/// Writes `<root>/<model>/config.pbtxt` and `<root>/<model>/1/model.neff` for the built-in
/// stateful model `model` (`accumulate` or `gru`) served over the stand-in libnrt: the built-in
/// configuration with `backend: "neuron"` (and, for `gru`, the READY control a Neuron stateful
/// model needs), and a NEFF with one row per sequence slot of an instance (the built-ins ask for
/// 2 instances, so serve them with 2 visible cores). `extra_config` is appended to the config.
pub fn write_standin_sequence_model(root: &Path, model: &str, extra_config: &str) -> Result<(), String> {
    write_sequence_model(root, model, extra_config, None)
}

/// Like [`write_standin_sequence_model`], with one more NEFF output, `extra_output` (a copy of the
/// model's first output), that the configuration does not declare.
pub fn write_standin_sequence_model_with_extra_output(
    root: &Path,
    model: &str,
    extra_output: &str,
) -> Result<(), String> {
    write_sequence_model(root, model, "", Some(extra_output))
}

fn write_sequence_model(
    root: &Path,
    model: &str,
    extra_config: &str,
    extra_output: Option<&str>,
) -> Result<(), String> {
    let base = STATEFUL_BUILTIN_CONFIGS
        .iter()
        .find(|(n, _)| *n == model)
        .map(|(_, c)| *c)
        .ok_or_else(|| format!("no built-in stateful model '{model}' (accumulate, gru)"))?;
    let mut text = base.replace(r#"backend: "builtin""#, r#"backend: "neuron""#).replace("KIND_CPU", "KIND_MODEL");
    if model == "gru" {
        let ready = r#"control_input [ { name: "READY" control [ { kind: CONTROL_SEQUENCE_READY int32_false_true: [ 0, 1 ] } ] } ]
  state ["#;
        text = text.replacen("state [", ready, 1);
    }
    text.push_str(extra_config);
    text.push('\n');
    let file = format!("<stand-in {model} config>");
    let config = parse_model_config(&text, &file).map_err(|e| e.to_string())?;
    let spec = ModelSpec::from_config(&config, &file).map_err(|e| e.to_string())?;
    let seq = SequenceSpec::from_config(&config, &file, None)
        .map_err(|e| e.to_string())?
        .ok_or_else(|| format!("model '{model}': no sequence_batching"))?;
    let instances = spec.instance_count.unwrap_or(1).max(1);
    let rows = seq.slots_per_instance(spec.max_batch_size, instances);
    let neff_config = neuron_config(&spec, &seq, rows)?;
    let shape =
        |dims: &[usize]| -> Vec<u64> { std::iter::once(rows).chain(dims.iter().copied()).map(|d| d as u64).collect() };
    let mut builder = NeffBuilder::new(format!("{model}_s{rows}"));
    for t in &neff_config.inputs {
        builder = builder.input(&t.name, neff_dtype(model, t.dtype)?, &shape(&t.dims));
    }
    for s in &neff_config.states {
        builder = builder.input(&s.input, neff_dtype(model, s.dtype)?, &shape(&s.dims));
    }
    for t in &neff_config.outputs {
        builder = builder.output(&t.name, neff_dtype(model, t.dtype)?, &shape(&t.dims));
    }
    for s in &neff_config.states {
        builder = builder.output(&s.output, neff_dtype(model, s.dtype)?, &shape(&s.dims));
    }
    let mut builder = sequence_program(model, builder)?;
    if let (Some(extra), Some(first)) = (extra_output, neff_config.outputs.first()) {
        builder = builder
            .output(extra, neff_dtype(model, first.dtype)?, &shape(&first.dims))
            .op(ProgramOp::Copy { input: first.name.clone(), output: extra.to_owned() });
    }
    let vdir = root.join(model).join("1");
    std::fs::create_dir_all(&vdir).map_err(|e| format!("{}: {e}", vdir.display()))?;
    builder.write_to(vdir.join("model.neff")).map_err(|e| e.to_string())?;
    std::fs::write(root.join(model).join("config.pbtxt"), text).map_err(|e| e.to_string())
}
