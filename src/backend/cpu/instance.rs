//! `CpuInstance`: the CPU backend's [`ModelInstance`], mapping named request tensors to a model.

use std::sync::Arc;

use super::bert::{BertModel, BertScratch};
use super::dense::DenseStack;
use crate::backend::{BackendError, BatchInput, ModelInstance, NamedTensor};
use crate::tensor::{DataType, Tensor, TensorView};

/// A model the CPU backend can run, shared (read-only) by all instances of one model version.
// One value per loaded model, behind an `Arc`: the variants' size difference does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum CpuModel {
    /// A stack of dense layers (the built-ins): one float input `[B, in]`, one FP32 output `[B, out]`.
    Dense(DenseStack),
    /// A BERT encoder: `input_ids`, `attention_mask`, optional `token_type_ids` (INT64 or INT32,
    /// `[B, S]`) → `last_hidden_state` FP32 `[B, S, H]` and `sentence_embedding` FP32 `[B, H]`.
    Bert(BertModel),
}

/// One executor of a [`CpuModel`], owned by one worker thread.
///
/// Names come from the model configuration, by position:
/// - dense: `input_names = [input]`, `output_names = [output]`;
/// - BERT: `input_names = [input_ids, attention_mask]` or `[input_ids, attention_mask,
///   token_type_ids]` (token types are zeros when the request leaves them out),
///   `output_names = [last_hidden_state, sentence_embedding]`.
///
/// `threads` caps the threads one batch uses (1 = the worker thread only; more shares the process's
/// rayon pool, so several instances do not oversubscribe the cores).
#[derive(Debug)]
pub struct CpuInstance {
    model: Arc<CpuModel>,
    input_names: Vec<String>,
    output_names: Vec<String>,
    threads: usize,
    index: usize,
    scratch: BertScratch,
    /// The configured output datatypes (outputs are computed in `f32`); empty = leave as computed.
    output_dtypes: Vec<DataType>,
}

fn invalid(name: &str, reason: String) -> BackendError {
    BackendError::InvalidInput { name: name.to_string(), reason }
}

fn find<'a>(inputs: &'a [BatchInput<'a>], name: &str) -> Option<TensorView<'a>> {
    inputs.iter().find(|i| i.name == name).map(|i| i.tensor)
}

fn ids(view: TensorView<'_>, name: &str) -> Result<(Vec<i64>, usize, usize), BackendError> {
    if !matches!(view.dtype, DataType::Int64 | DataType::Int32) {
        return Err(invalid(name, format!("datatype {} is not accepted; expected INT64 or INT32", view.dtype)));
    }
    let [b, s] = view.shape else {
        return Err(invalid(name, format!("shape {:?} is not accepted; expected [batch, seq]", view.shape)));
    };
    let values = view.to_i64().ok_or_else(|| {
        invalid(name, format!("{} bytes do not hold shape {:?} of {}", view.data.len(), view.shape, view.dtype))
    })?;
    Ok((values, *b, *s))
}

impl CpuInstance {
    /// An instance of `model` with the configuration's input and output names (see the type doc),
    /// numbered `index` for its label. Wrong name counts are a [`BackendError::Load`].
    pub fn new(
        model: Arc<CpuModel>,
        input_names: Vec<String>,
        output_names: Vec<String>,
        threads: usize,
        index: usize,
    ) -> Result<CpuInstance, BackendError> {
        let (ins, outs): (&[usize], usize) = match &*model {
            CpuModel::Dense(_) => (&[1], 1),
            CpuModel::Bert(_) => (&[2, 3], 2),
        };
        if !ins.contains(&input_names.len()) || output_names.len() != outs {
            return Err(BackendError::Load(format!(
                "CPU model takes {ins:?} inputs and {outs} outputs; the configuration names {} and {}",
                input_names.len(),
                output_names.len()
            )));
        }
        Ok(CpuInstance {
            model,
            input_names,
            output_names,
            threads: threads.max(1),
            index,
            scratch: BertScratch::default(),
            output_dtypes: Vec::new(),
        })
    }

    /// Checks the configuration's datatypes (`(name, datatype)` in configuration order) against
    /// what the model takes and gives, refusing at load what it cannot run, and makes every
    /// batch's outputs come out in the configured datatypes.
    pub fn with_config_dtypes(
        mut self,
        inputs: &[(String, DataType)],
        outputs: &[(String, DataType)],
    ) -> Result<CpuInstance, BackendError> {
        super::dtypes::check_config_dtypes(&self.model, inputs, outputs)?;
        self.output_dtypes = outputs.iter().map(|(_, d)| *d).collect();
        Ok(self)
    }

    fn run_dense(&self, stack: &DenseStack, inputs: &[BatchInput<'_>]) -> Result<Vec<NamedTensor>, BackendError> {
        let name = &self.input_names[0];
        let view = find(inputs, name).ok_or_else(|| invalid(name, "missing from the batch".into()))?;
        if !matches!(view.dtype, DataType::Fp32 | DataType::Fp16 | DataType::Bf16) {
            return Err(invalid(name, format!("datatype {} is not accepted; expected FP32, FP16 or BF16", view.dtype)));
        }
        let din = stack.input_dim();
        let batch = match view.shape {
            [b, d] if *d == din => *b,
            other => {
                return Err(invalid(name, format!("shape {other:?} is not accepted; expected [-1, {din}]")));
            }
        };
        let x = view.to_f32().ok_or_else(|| {
            invalid(name, format!("{} bytes do not hold shape {:?} of {}", view.data.len(), view.shape, view.dtype))
        })?;
        let y = stack.forward_threads(&x, batch, self.threads);
        let tensor = Tensor::from_f32(vec![batch, stack.output_dim()], &y);
        Ok(vec![NamedTensor { name: self.output_names[0].clone(), tensor }])
    }

    fn run_bert(&mut self, model: &BertModel, inputs: &[BatchInput<'_>]) -> Result<Vec<NamedTensor>, BackendError> {
        let get = |i: usize| {
            let name = &self.input_names[i];
            find(inputs, name).ok_or_else(|| invalid(name, "missing from the batch".into()))
        };
        let (input_ids, batch, seq) = ids(get(0)?, &self.input_names[0])?;
        let (mask, mb, ms) = ids(get(1)?, &self.input_names[1])?;
        if (mb, ms) != (batch, seq) {
            return Err(invalid(
                &self.input_names[1],
                format!("shape [{mb}, {ms}] differs from input_ids' [{batch}, {seq}]"),
            ));
        }
        let token_types = match self.input_names.get(2).and_then(|n| find(inputs, n).map(|v| (n, v))) {
            Some((name, view)) => {
                let (tt, tb, ts) = ids(view, name)?;
                if (tb, ts) != (batch, seq) {
                    return Err(invalid(name, format!("shape [{tb}, {ts}] differs from input_ids' [{batch}, {seq}]")));
                }
                Some(tt)
            }
            None => None,
        };
        let out = model.forward_with(
            &mut self.scratch,
            self.threads,
            &input_ids,
            &mask,
            token_types.as_deref(),
            batch,
            seq,
        )?;
        let h = model.info().hidden_size;
        Ok(vec![
            NamedTensor {
                name: self.output_names[0].clone(),
                tensor: Tensor::from_f32(vec![batch, seq, h], &out.last_hidden_state),
            },
            NamedTensor {
                name: self.output_names[1].clone(),
                tensor: Tensor::from_f32(vec![batch, h], &out.sentence_embedding),
            },
        ])
    }
}

impl ModelInstance for CpuInstance {
    fn execute(&mut self, inputs: &[BatchInput<'_>]) -> Result<Vec<NamedTensor>, BackendError> {
        let model = Arc::clone(&self.model);
        let mut outputs = match &*model {
            CpuModel::Dense(stack) => self.run_dense(stack, inputs),
            CpuModel::Bert(bert) => self.run_bert(bert, inputs),
        }?;
        super::dtypes::conform_outputs(&mut outputs, &self.output_dtypes)?;
        Ok(outputs)
    }

    fn label(&self) -> String {
        format!("cpu:{}", self.index)
    }

    /// Dense stacks only: they hold no thread state, and the batcher only runs inline the batches
    /// it measured to be tiny.
    fn may_run_inline(&self) -> bool {
        matches!(&*self.model, CpuModel::Dense(_))
    }

    fn input_check(&self) -> Option<Arc<dyn crate::backend::InputCheck>> {
        match &*self.model {
            CpuModel::Dense(_) => None,
            CpuModel::Bert(bert) => Some(Arc::new(super::bert_check::BertInputCheck::new(&bert.info()))),
        }
    }
}
