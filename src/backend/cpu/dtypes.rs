//! The datatypes the CPU backend takes and gives: checked against the model configuration at load,
//! and outputs (computed in `f32`) converted to the configured float type after each batch.

use super::instance::CpuModel;
use crate::backend::{BackendError, NamedTensor};
use crate::tensor::{DataType, Tensor};

/// Input datatypes a dense model accepts.
const DENSE_INPUTS: [DataType; 3] = [DataType::Fp32, DataType::Fp16, DataType::Bf16];
/// Input datatypes a BERT model accepts (token ids, masks and types).
const BERT_INPUTS: [DataType; 2] = [DataType::Int64, DataType::Int32];
/// Output datatypes the CPU backend can produce from its `f32` results.
const OUTPUTS: [DataType; 4] = [DataType::Fp32, DataType::Fp16, DataType::Bf16, DataType::Fp64];

fn names(list: &[DataType]) -> String {
    list.iter().map(|d| format!("TYPE_{d}")).collect::<Vec<_>>().join(", ")
}

/// Refuses, at load, configured datatypes `model` cannot take or produce: `inputs` and `outputs`
/// are the configuration's `(name, datatype)` in configuration order.
pub fn check_config_dtypes(
    model: &CpuModel,
    inputs: &[(String, DataType)],
    outputs: &[(String, DataType)],
) -> Result<(), BackendError> {
    let (accepted, kind): (&[DataType], &str) = match model {
        CpuModel::Dense(_) => (&DENSE_INPUTS, "a dense model"),
        CpuModel::Bert(_) => (&BERT_INPUTS, "a BERT model"),
    };
    for (name, dtype) in inputs {
        if !accepted.contains(dtype) {
            return Err(BackendError::Load(format!(
                "input '{name}' is declared TYPE_{dtype}; the CPU backend runs {kind} on {} inputs: declare one of those in config.pbtxt",
                names(accepted)
            )));
        }
    }
    for (name, dtype) in outputs {
        if !OUTPUTS.contains(dtype) {
            return Err(BackendError::Load(format!(
                "output '{name}' is declared TYPE_{dtype}; the CPU backend computes in float and gives {}: declare one of those in config.pbtxt",
                names(&OUTPUTS)
            )));
        }
    }
    Ok(())
}

/// Converts outputs computed as `f32` to the configured datatype (`dtypes[i]` for `outputs[i]`;
/// outputs past the list are left as they are).
pub fn conform_outputs(outputs: &mut [NamedTensor], dtypes: &[DataType]) -> Result<(), BackendError> {
    for (out, &want) in outputs.iter_mut().zip(dtypes) {
        if out.tensor.dtype == want {
            continue;
        }
        let converted = out.tensor.view().to_f32().and_then(|v| crate::tensor::encode_f32(&v, want));
        let Some(data) = converted else {
            return Err(BackendError::Execution {
                message: format!(
                    "output '{}' was computed as {} and cannot be given as {want}; declare {} in config.pbtxt",
                    out.name, out.tensor.dtype, out.tensor.dtype
                ),
                instance_usable: true,
                nrt_status: None,
            });
        };
        out.tensor = Tensor { dtype: want, shape: std::mem::take(&mut out.tensor.shape), data };
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::linear_weights;

    #[test]
    fn dense_refuses_integer_tensors_at_load_and_converts_floats() {
        let model = CpuModel::Dense(linear_weights());
        let f32_in = [("INPUT0".to_string(), DataType::Fp32)];
        let ok = check_config_dtypes(&model, &f32_in, &[("OUTPUT0".into(), DataType::Fp16)]);
        assert!(ok.is_ok(), "{ok:?}");
        let bad_out = check_config_dtypes(&model, &f32_in, &[("OUTPUT0".into(), DataType::Int32)]);
        assert!(matches!(&bad_out, Err(BackendError::Load(m)) if m.contains("OUTPUT0") && m.contains("TYPE_INT32")));
        let bad_in = check_config_dtypes(&model, &[("INPUT0".into(), DataType::Int64)], &[]);
        assert!(matches!(&bad_in, Err(BackendError::Load(m)) if m.contains("INPUT0")));

        let mut outs = vec![NamedTensor { name: "y".into(), tensor: Tensor::from_f32(vec![2], &[1.5, -2.0]) }];
        conform_outputs(&mut outs, &[DataType::Fp64]).expect("converts");
        assert_eq!(outs[0].tensor.dtype, DataType::Fp64);
        assert_eq!(outs[0].tensor.view().to_f32(), Some(vec![1.5, -2.0]));
    }
}
