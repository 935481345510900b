//! The control tensors of a step (Triton's START, END, READY and CORRID control inputs), as the
//! model's `sequence_batching` block declares them.

use super::*;

impl Actor {
    /// The control tensors for `req`'s step, in configuration order.
    pub(super) fn controls(&self, req: &SequenceRequest) -> Vec<NamedTensor> {
        let shape = if self.shared.adm.spec.batches() { vec![1, 1] } else { vec![1] };
        self.shared
            .seq
            .controls
            .iter()
            .map(|c| {
                let data = match c.kind {
                    ControlKind::Start => c.false_true[usize::from(req.start)].clone(),
                    ControlKind::End => c.false_true[usize::from(req.end)].clone(),
                    ControlKind::Ready => c.false_true[1].clone(),
                    ControlKind::CorrId => corrid_bytes(&req.id, c.dtype),
                };
                NamedTensor { name: c.name.clone(), tensor: Tensor { dtype: c.dtype, shape: shape.clone(), data } }
            })
            .collect()
    }
}

fn corrid_bytes(id: &SequenceId, dtype: DataType) -> Vec<u8> {
    let n = match id {
        SequenceId::Uint(v) => *v,
        SequenceId::Str(_) => 0,
    };
    match dtype {
        DataType::Uint64 | DataType::Int64 => n.to_le_bytes().to_vec(),
        DataType::Uint32 | DataType::Int32 => (n as u32).to_le_bytes().to_vec(),
        _ => {
            let s = match id {
                SequenceId::Uint(v) => v.to_string(),
                SequenceId::Str(s) => s.clone(),
            };
            let mut b = (s.len() as u32).to_le_bytes().to_vec();
            b.extend_from_slice(s.as_bytes());
            b
        }
    }
}
