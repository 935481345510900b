//! Bounded padding: a batch whose requests' sequence lengths differ so much that padding every
//! row to the longest would more than double its work (beyond a fixed slack) is run as several
//! executions of requests of similar length, so one long request never pads its batch-mates to
//! its length (a [1, 2,000,000] request queued with 31 short ones once made a 32 × 2 M batch).

use crate::batching::InferRequest;
use crate::config::ModelSpec;

/// Padded positions (rows × sequence length) an execution may carry beyond twice its real ones;
/// 32 rows of 512 tokens. Past it, the batch is split by sequence length.
pub(crate) const PAD_SLACK_POSITIONS: usize = 32 * 512;

/// The sequence length of a request: the second dimension of the model's first input whose first
/// dimension (after the batch) is variable; `None` when the model has no such input.
fn seq_len(spec: &ModelSpec, r: &InferRequest) -> Option<usize> {
    let i = spec.inputs.iter().position(|s| s.dims.first() == Some(&-1))?;
    r.inputs.get(i).and_then(|t| t.shape.get(1)).copied()
}

/// Splits `requests` into groups executed one after the other, each padded only to its own longest
/// sequence, so that no group carries more than `2 × real + PAD_SLACK_POSITIONS` positions.
/// A batch within the bound (the usual case) stays one group, in its order.
pub(crate) fn by_padding(spec: &ModelSpec, requests: Vec<InferRequest>) -> Vec<Vec<InferRequest>> {
    if !spec.batches() || requests.len() < 2 {
        return vec![requests];
    }
    let lens: Vec<usize> = requests.iter().map(|r| seq_len(spec, r).unwrap_or(0)).collect();
    let rows: usize = requests.iter().map(|r| r.rows).sum();
    let real: usize = requests.iter().zip(&lens).map(|(r, s)| r.rows * s).sum();
    let longest = lens.iter().copied().max().unwrap_or(0);
    if rows.saturating_mul(longest) <= real.saturating_mul(2).saturating_add(PAD_SLACK_POSITIONS) {
        return vec![requests];
    }
    let mut sorted: Vec<(usize, InferRequest)> = lens.into_iter().zip(requests).collect();
    sorted.sort_by_key(|(len, _)| *len);
    let mut groups: Vec<Vec<InferRequest>> = Vec::new();
    let (mut g_rows, mut g_real) = (0usize, 0usize);
    for (len, r) in sorted {
        let (rows, real) = (g_rows + r.rows, g_real + r.rows * len);
        let fits = rows.saturating_mul(len) <= real.saturating_mul(2).saturating_add(PAD_SLACK_POSITIONS);
        match groups.last_mut() {
            Some(g) if fits => {
                g.push(r);
                (g_rows, g_real) = (rows, real);
            }
            _ => {
                (g_rows, g_real) = (r.rows, r.rows * len);
                groups.push(vec![r]);
            }
        }
    }
    groups
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::RequestInput;
    use crate::config::parse_model_config;
    use std::time::Instant;

    fn request(len: usize) -> InferRequest {
        let (reply, _) = tokio::sync::oneshot::channel();
        InferRequest {
            inputs: vec![RequestInput { shape: vec![1, len], data: vec![0u8; len * 4].into() }],
            rows: 1,
            priority: 0,
            timeout: None,
            sequence: Default::default(),
            reply,
            arrived: Instant::now(),
        }
    }

    #[test]
    fn a_long_request_is_run_apart_and_ordinary_spreads_stay_one_batch() {
        let text = r#"name: "m" max_batch_size: 32
            input [ { name: "x" data_type: TYPE_FP32 dims: [ -1 ] } ]
            output [ { name: "y" data_type: TYPE_FP32 dims: [ -1 ] } ]"#;
        let spec = ModelSpec::from_config(&parse_model_config(text, "t").expect("parses"), "t").expect("spec");
        let lens = |groups: &[Vec<InferRequest>]| -> Vec<Vec<usize>> {
            groups.iter().map(|g| g.iter().map(|r| r.inputs[0].shape[1]).collect()).collect()
        };
        // Lengths 5 to 512: within the slack, one batch in arrival order.
        let usual: Vec<InferRequest> = [512, 5, 40, 300, 7].into_iter().map(request).collect();
        assert_eq!(lens(&by_padding(&spec, usual)), vec![vec![512, 5, 40, 300, 7]]);
        let mut hostile: Vec<InferRequest> = (0..31).map(|_| request(8)).collect();
        hostile.insert(3, request(2_000_000));
        let groups = by_padding(&spec, hostile);
        assert_eq!(lens(&groups), vec![vec![8; 31], vec![2_000_000]]);
    }
}
