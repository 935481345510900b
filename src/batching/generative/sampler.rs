//! Token sampling: greedy, temperature, top-k, top-p and min-p, with randomness derived from
//! (request seed, absolute token position) so a token never depends on what was sampled before it,
//! on its batch, or on where the sequence ran.

use super::params::SamplingParams;

/// One sampled token and what the model thought of it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampled {
    /// The chosen token.
    pub token: u32,
    /// Its log-probability under the model's distribution (log-softmax of the raw logits, before
    /// temperature and filtering, as vLLM reports it).
    pub logprob: f32,
}

/// A token with its log-probability and rank among the vocabulary (1 = most likely).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RankedLogprob {
    /// Token id.
    pub token: u32,
    /// Log-probability under the raw logits.
    pub logprob: f32,
    /// Rank by logit, 1-based (ties broken by the lower id).
    pub rank: usize,
}

/// The uniform number in [0, 1) used to sample the token at `position` of a request with `seed`.
///
/// A counter-based generator (SplitMix64 finalizer over the seed and the position): the value is a
/// pure function of its two arguments, so a sequence that is preempted, migrated or replayed from
/// its tokens samples exactly what it would have sampled unmoved.
pub fn uniform(seed: u64, position: usize) -> f64 {
    let mut z = seed ^ (position as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(17);
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    // 53 high bits → [0, 1).
    (z >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

use super::softmax_sum::{log_sum_exp, max_and_log_sum_exp};

/// Buffers [`sample`] reuses between calls (no allocation per token once they have grown to the
/// vocabulary).
#[derive(Debug, Default)]
pub struct SampleScratch {
    cand: Vec<u32>,
    weights: Vec<f64>,
}

impl SampleScratch {
    /// The candidate buffer, for [`top_logprobs`].
    pub fn candidates(&mut self) -> &mut Vec<u32> {
        &mut self.cand
    }
}

/// Index of the first entry equal to `max` (the largest logit, NaN ignored): the lowest id among
/// equals; 0 when there is none (an empty or all-NaN row).
fn first_index_of(logits: &[f32], max: f32) -> u32 {
    logits.iter().position(|&l| l == max).unwrap_or(0) as u32
}

/// Orders tokens by logit, largest first, lower id first among equals.
fn by_logit_desc(logits: &[f32]) -> impl Fn(&u32, &u32) -> std::cmp::Ordering + '_ {
    move |&a, &b| logits[b as usize].total_cmp(&logits[a as usize]).then(a.cmp(&b))
}

/// Samples one token from one logits row. `position` is the absolute position the token will take
/// in its sequence; `seed` is the request's seed.
pub fn sample(
    logits: &[f32],
    params: &SamplingParams,
    seed: u64,
    position: usize,
    scratch: &mut SampleScratch,
) -> Sampled {
    let (max, lse) = max_and_log_sum_exp(logits);
    let token = if params.is_greedy() || logits.len() <= 1 {
        first_index_of(logits, max)
    } else {
        sample_filtered(logits, params, uniform(seed, position), scratch)
    };
    Sampled { token, logprob: logits.get(token as usize).map_or(f32::NEG_INFINITY, |l| l - lse) }
}

fn sample_filtered(logits: &[f32], params: &SamplingParams, u: f64, scratch: &mut SampleScratch) -> u32 {
    let inv_t = 1.0 / f64::from(params.temperature);
    let SampleScratch { cand, weights } = scratch;
    cand.clear();
    cand.extend(0..logits.len() as u32);
    cand.retain(|&t| !logits[t as usize].is_nan());
    if cand.is_empty() {
        return 0;
    }
    let cmp = by_logit_desc(logits);
    let filtered = params.top_k > 0 || params.top_p < 1.0 || params.min_p > 0.0;
    if params.top_k > 0 && params.top_k < cand.len() {
        cand.select_nth_unstable_by(params.top_k - 1, &cmp);
        cand.truncate(params.top_k);
    }
    if filtered {
        cand.sort_unstable_by(&cmp);
    }
    // Probabilities after temperature, relative to the best candidate in the list (each computed
    // once; the sums below run in candidate order).
    let max = cand.iter().map(|&t| f64::from(logits[t as usize])).fold(f64::NEG_INFINITY, f64::max);
    weights.clear();
    weights.extend(cand.iter().map(|&t| ((f64::from(logits[t as usize]) - max) * inv_t).exp()));
    let mut total: f64 = weights.iter().sum();
    if params.min_p > 0.0 {
        // The best candidate has weight 1: keep tokens with p >= min_p * p_max.
        let floor = f64::from(params.min_p);
        let keep = weights.iter().take_while(|&&w| w >= floor).count().max(1);
        cand.truncate(keep);
        weights.truncate(keep);
        total = weights.iter().sum();
    }
    if params.top_p < 1.0 {
        let target = f64::from(params.top_p) * total;
        let mut acc = 0.0;
        let mut keep = cand.len();
        for (i, &w) in weights.iter().enumerate() {
            acc += w;
            if acc >= target {
                keep = i + 1;
                break;
            }
        }
        cand.truncate(keep);
        weights.truncate(keep);
        total = weights.iter().sum();
    }
    let target = u * total;
    let mut acc = 0.0;
    for (&t, &w) in cand.iter().zip(weights.iter()) {
        acc += w;
        if acc > target {
            return t;
        }
    }
    cand[cand.len() - 1]
}

/// The `n` most likely tokens of a row (by raw logit) with their log-probabilities and ranks, plus
/// the chosen token's own rank — what vLLM's `logprobs` reports for one position.
pub fn top_logprobs(logits: &[f32], chosen: u32, n: usize, scratch: &mut Vec<u32>) -> (Vec<RankedLogprob>, usize) {
    let lse = log_sum_exp(logits);
    let chosen_logit = logits.get(chosen as usize).copied().unwrap_or(f32::NEG_INFINITY);
    let chosen_rank = 1 + logits
        .iter()
        .enumerate()
        .filter(|&(i, &l)| l > chosen_logit || (l == chosen_logit && (i as u32) < chosen))
        .count();
    scratch.clear();
    scratch.extend(0..logits.len() as u32);
    let cmp = by_logit_desc(logits);
    let n = n.min(scratch.len());
    if n > 0 && n < scratch.len() {
        scratch.select_nth_unstable_by(n - 1, &cmp);
    }
    scratch.truncate(n);
    scratch.sort_unstable_by(&cmp);
    let top = scratch
        .iter()
        .enumerate()
        .map(|(i, &t)| RankedLogprob { token: t, logprob: logits[t as usize] - lse, rank: i + 1 })
        .collect();
    (top, chosen_rank)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(f: impl FnOnce(&mut SamplingParams)) -> SamplingParams {
        let mut p = SamplingParams::default();
        f(&mut p);
        p
    }

    #[test]
    fn greedy_takes_the_argmax_and_reports_its_logprob() {
        let logits = [1.0f32, 3.0, 2.0, 3.0];
        let p = params(|p| p.temperature = 0.0);
        let s = sample(&logits, &p, 1, 0, &mut SampleScratch::default());
        assert_eq!(s.token, 1, "ties go to the lower id");
        for (row, want) in [(vec![f32::NAN, 1.0, 2.0, 2.0], 2), (vec![f32::NAN; 3], 0), (vec![f32::NEG_INFINITY; 2], 0)]
        {
            assert_eq!(sample(&row, &p, 1, 0, &mut SampleScratch::default()).token, want, "{row:?}");
        }
        let lse = (1f64.exp() + 2.0 * 3f64.exp() + 2f64.exp()).ln();
        assert!((f64::from(s.logprob) - (3.0 - lse)).abs() < 1e-6);
    }

    #[test]
    fn uniform_is_a_function_of_seed_and_position() {
        assert_eq!(uniform(7, 10), uniform(7, 10));
        assert_ne!(uniform(7, 10), uniform(7, 11));
        assert_ne!(uniform(7, 10), uniform(8, 10));
        let mean: f64 = (0..10_000).map(|i| uniform(42, i)).sum::<f64>() / 10_000.0;
        assert!((mean - 0.5).abs() < 0.02, "mean {mean}");
        assert!((0..10_000).all(|i| (0.0..1.0).contains(&uniform(3, i))));
    }

    #[test]
    fn sampling_follows_the_distribution() {
        // p = softmax([0, ln 3]) = [0.25, 0.75].
        let logits = [0.0f32, 3f32.ln()];
        let p = SamplingParams::default();
        let mut scratch = SampleScratch::default();
        let ones = (0..20_000).filter(|&i| sample(&logits, &p, 9, i, &mut scratch).token == 1).count();
        let frac = ones as f64 / 20_000.0;
        assert!((frac - 0.75).abs() < 0.02, "{frac}");
    }

    #[test]
    fn same_seed_and_position_give_the_same_token() {
        let logits: Vec<f32> = (0..100).map(|i| ((i * 37) % 11) as f32 * 0.3).collect();
        let p = params(|p| p.temperature = 1.3);
        let mut s = SampleScratch::default();
        let a: Vec<u32> = (0..50).map(|i| sample(&logits, &p, 5, i, &mut s).token).collect();
        let b: Vec<u32> = (0..50).map(|i| sample(&logits, &p, 5, i, &mut s).token).collect();
        let c: Vec<u32> = (0..50).map(|i| sample(&logits, &p, 6, i, &mut s).token).collect();
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn top_k_top_p_and_min_p_restrict_the_candidates() {
        // probabilities ∝ 8, 4, 2, 1, 1 (ids 0..5).
        let logits: Vec<f32> = [8.0f32, 4.0, 2.0, 1.0, 1.0].iter().map(|w| w.ln()).collect();
        let mut s = SampleScratch::default();
        let seen = |p: &SamplingParams, s: &mut SampleScratch| {
            let mut seen = [false; 5];
            for i in 0..4000 {
                seen[sample(&logits, p, 11, i, s).token as usize] = true;
            }
            seen
        };
        assert_eq!(seen(&params(|p| p.top_k = 2), &mut s), [true, true, false, false, false]);
        // top_p 0.75: 8/16 = 0.5 < 0.75, 12/16 = 0.75 reaches it → ids 0 and 1.
        assert_eq!(seen(&params(|p| p.top_p = 0.75), &mut s), [true, true, false, false, false]);
        // min_p 0.2: keep p >= 0.2 * p_max → weights >= 1.6 → ids 0, 1, 2.
        assert_eq!(seen(&params(|p| p.min_p = 0.2), &mut s), [true, true, true, false, false]);
        assert_eq!(seen(&SamplingParams::default(), &mut s), [true; 5]);
    }

    #[test]
    fn top_logprobs_ranks_tokens() {
        let logits = [0.5f32, 2.0, 1.0, 2.0];
        let (top, rank) = top_logprobs(&logits, 2, 2, &mut Vec::new());
        assert_eq!(top.iter().map(|r| (r.token, r.rank)).collect::<Vec<_>>(), vec![(1, 1), (3, 2)]);
        assert_eq!(rank, 3);
        let lse = log_sum_exp(&logits);
        assert_eq!(top[0].logprob, 2.0 - lse);
    }
}
