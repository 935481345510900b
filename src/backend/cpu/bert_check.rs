//! [`BertInputCheck`]: a BERT request's ids, attention mask, token types and length checked
//! against the checkpoint's limits before batching (see [`crate::backend::InputCheck`]).

use super::bert::BertInfo;
use crate::backend::{BackendError, InputCheck, RequestInput};
use crate::config::IoSpec;
use crate::tensor::{DataType, TensorView};

/// The limits of one BERT checkpoint. Inputs by position, as the CPU instance takes them:
/// `input_ids`, `attention_mask`, then optionally `token_type_ids`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BertInputCheck {
    /// Valid ids are `0..vocab_size`.
    pub vocab_size: i64,
    /// Longest sequence (`max_position_embeddings`).
    pub max_positions: usize,
    /// Valid token types are `0..types` (1 when the model has no type embeddings: only 0).
    pub types: i64,
}

impl BertInputCheck {
    /// The limits of the model described by `info`.
    pub fn new(info: &BertInfo) -> BertInputCheck {
        BertInputCheck {
            vocab_size: info.vocab_size as i64,
            max_positions: info.max_position_embeddings,
            types: info.type_vocab_size.max(1) as i64,
        }
    }
}

fn invalid(name: &str, reason: String) -> BackendError {
    BackendError::InvalidInput { name: name.to_string(), reason }
}

/// The values of one integer input and its sequence length.
fn values(spec: &IoSpec, input: &RequestInput) -> Result<(Vec<i64>, usize), BackendError> {
    if !matches!(spec.dtype, DataType::Int64 | DataType::Int32) {
        return Err(invalid(&spec.name, format!("datatype {} is not accepted; expected INT64 or INT32", spec.dtype)));
    }
    let view = TensorView { dtype: spec.dtype, shape: &input.shape, data: &input.data };
    let [_, seq] = input.shape.as_slice() else {
        return Err(invalid(&spec.name, format!("shape {:?} is not accepted; expected [batch, seq]", input.shape)));
    };
    let v = view.to_i64().ok_or_else(|| {
        invalid(&spec.name, format!("{} bytes do not hold shape {:?} of {}", input.data.len(), input.shape, spec.dtype))
    })?;
    Ok((v, *seq))
}

/// The first value outside `ok`, with its (row, position) within the request.
fn first_bad(values: &[i64], seq: usize, ok: impl Fn(i64) -> bool) -> Option<(i64, usize, usize)> {
    let at = values.iter().position(|v| !ok(*v))?;
    Some((values[at], at / seq.max(1), at % seq.max(1)))
}

impl InputCheck for BertInputCheck {
    fn check(&self, specs: &[IoSpec], inputs: &[RequestInput]) -> Result<(), BackendError> {
        for (i, (spec, input)) in specs.iter().zip(inputs).enumerate() {
            let (v, seq) = values(spec, input)?;
            if seq > self.max_positions {
                return Err(invalid(
                    &spec.name,
                    format!("sequence length {seq} exceeds the model's max_position_embeddings {}", self.max_positions),
                ));
            }
            let bad = match i {
                0 => first_bad(&v, seq, |x| (0..self.vocab_size).contains(&x)).map(|(x, r, p)| {
                    format!("id {x} at row {r}, position {p} is outside the vocabulary 0..{}", self.vocab_size)
                }),
                1 => first_bad(&v, seq, |x| x == 0 || x == 1)
                    .map(|(x, r, p)| format!("value {x} at row {r}, position {p}; only 0 and 1 are allowed")),
                _ => first_bad(&v, seq, |x| (0..self.types).contains(&x))
                    .map(|(x, r, p)| format!("type {x} at row {r}, position {p} is outside 0..{}", self.types)),
            };
            if let Some(reason) = bad {
                return Err(invalid(&spec.name, reason));
            }
            // A row with nothing to attend to has no defined embedding (it would depend on its
            // batch-mates' padding).
            if i == 1
                && let Some(r) = v.chunks(seq.max(1)).position(|row| row.iter().all(|m| *m == 0))
            {
                return Err(invalid(
                    &spec.name,
                    format!("row {r} is all zeros: a row needs at least one token with mask 1"),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str) -> IoSpec {
        IoSpec { name: name.into(), dtype: DataType::Int64, dims: vec![-1], optional: false }
    }

    fn input(rows: usize, v: &[i64]) -> RequestInput {
        RequestInput {
            shape: vec![rows, v.len() / rows],
            data: v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>().into(),
        }
    }

    #[test]
    fn names_the_input_value_and_position_within_the_request() {
        let c = BertInputCheck { vocab_size: 10, max_positions: 4, types: 2 };
        let specs = [spec("input_ids"), spec("attention_mask"), spec("token_type_ids")];
        let ok = [input(2, &[1, 2, 3, 4]), input(2, &[1, 1, 1, 0]), input(2, &[0, 1, 0, 0])];
        assert!(c.check(&specs, &ok).is_ok());
        let cases: [(usize, &[i64], &str); 4] = [
            (0, &[1, 2, 3, 10], "input 'input_ids': id 10 at row 1, position 1 is outside the vocabulary 0..10"),
            (0, &[-1, 2, 3, 4], "input 'input_ids': id -1 at row 0, position 0"),
            (1, &[1, 2, 1, 1], "input 'attention_mask': value 2 at row 0, position 1; only 0 and 1"),
            (2, &[0, 0, 2, 0], "input 'token_type_ids': type 2 at row 1, position 0 is outside 0..2"),
        ];
        for (which, values, want) in cases {
            let mut inputs = ok.clone();
            inputs[which] = input(2, values);
            let e = c.check(&specs, &inputs).expect_err(want).to_string();
            assert!(e.starts_with(want), "{e}");
        }
        let mut empty_row = ok.clone();
        empty_row[1] = input(2, &[1, 1, 0, 0]);
        let e = c.check(&specs, &empty_row).expect_err("all-zero mask row").to_string();
        assert!(e.contains("row 1 is all zeros"), "{e}");
        let long = [input(1, &[1; 5]), input(1, &[1; 5])];
        let e = c.check(&specs[..2], &long).expect_err("too long").to_string();
        assert!(e.contains("sequence length 5 exceeds the model's max_position_embeddings 4"), "{e}");
    }
}
