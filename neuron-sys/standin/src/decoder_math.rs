//! The arithmetic of the `llama_decoder` op: a Llama-family forward pass in `f32` over the real
//! tokens of one call, reading the weights and updating the KV cache in place.
//!
//! Invariance is by construction: every token is computed on its own (no reduction mixes rows),
//! with one code path for prefill and decode, attention always reads K/V from the cache in
//! position order, and every dot product uses the same fixed summation order ([`dot`]). So a
//! token's logits and the K/V it writes depend only on its id, position and its slot's cache
//! contents, bit for bit, whatever the bucket, the other rows or the split of a prompt.

/// The model's dimensions, as `usize`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dims {
    /// Hidden size H.
    pub hidden: usize,
    /// MLP intermediate size I.
    pub intermediate: usize,
    /// Attention heads.
    pub heads: usize,
    /// KV heads.
    pub kv_heads: usize,
    /// Head size.
    pub head_dim: usize,
    /// Vocabulary size V.
    pub vocab: usize,
    /// Positions per cache slot.
    pub max_len: usize,
}

/// One layer's weights (Hugging Face shapes, row-major `[out, in]`).
#[derive(Debug, Clone, Copy)]
pub struct LayerWeights<'a> {
    /// `input_layernorm.weight` `[H]`.
    pub input_norm: &'a [f32],
    /// `q_proj.weight` `[heads·hd, H]`.
    pub q: &'a [f32],
    /// `k_proj.weight` `[kv·hd, H]`.
    pub k: &'a [f32],
    /// `v_proj.weight` `[kv·hd, H]`.
    pub v: &'a [f32],
    /// `q_proj.bias` (attention_bias).
    pub q_bias: Option<&'a [f32]>,
    /// `k_proj.bias`.
    pub k_bias: Option<&'a [f32]>,
    /// `v_proj.bias`.
    pub v_bias: Option<&'a [f32]>,
    /// `o_proj.weight` `[H, heads·hd]`.
    pub o: &'a [f32],
    /// `post_attention_layernorm.weight` `[H]`.
    pub post_norm: &'a [f32],
    /// `mlp.gate_proj.weight` `[I, H]`.
    pub gate: &'a [f32],
    /// `mlp.up_proj.weight` `[I, H]`.
    pub up: &'a [f32],
    /// `mlp.down_proj.weight` `[H, I]`.
    pub down: &'a [f32],
}

/// Every weight of the model.
#[derive(Debug, Clone)]
pub struct Weights<'a> {
    /// `model.embed_tokens.weight` `[V, H]`.
    pub embed: &'a [f32],
    /// Per layer.
    pub layers: Vec<LayerWeights<'a>>,
    /// `model.norm.weight` `[H]`.
    pub norm: &'a [f32],
    /// `lm_head.weight` `[V, H]` (the embedding when tied).
    pub lm_head: &'a [f32],
}

/// One real token of a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Token {
    /// Its row in the logits (prefill: index in the chunk; decode: batch row).
    pub row: usize,
    /// Token id, below V.
    pub id: usize,
    /// Position, below `max_len`.
    pub pos: usize,
    /// Cache slot.
    pub slot: usize,
}

/// Rotary embedding frequencies (`inv_freq`, after the llama3 scaling when configured).
#[derive(Debug, Clone, PartialEq)]
pub struct Rope {
    inv_freq: Vec<f32>,
}

/// Hugging Face's llama3 `rope_scaling` parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Llama3Scaling {
    /// `factor`.
    pub factor: f64,
    /// `low_freq_factor`.
    pub low_freq_factor: f64,
    /// `high_freq_factor`.
    pub high_freq_factor: f64,
    /// `original_max_position_embeddings`.
    pub original_max_position_embeddings: f64,
}

impl Rope {
    /// `inv_freq[i] = theta^(−2i/head_dim)`, scaled as Hugging Face's `_compute_llama3_parameters`
    /// does when `scaling` is set; held in `f32` like Hugging Face's buffer.
    pub fn new(head_dim: usize, theta: f64, scaling: Option<Llama3Scaling>) -> Rope {
        let inv_freq = (0..head_dim / 2)
            .map(|i| {
                let base = 1.0 / theta.powf((2 * i) as f64 / head_dim as f64);
                let scaled = match scaling {
                    None => base,
                    Some(s) => {
                        let old = s.original_max_position_embeddings;
                        let (low_wavelen, high_wavelen) = (old / s.low_freq_factor, old / s.high_freq_factor);
                        let wavelen = 2.0 * std::f64::consts::PI / base;
                        if wavelen < high_wavelen {
                            base
                        } else if wavelen > low_wavelen {
                            base / s.factor
                        } else {
                            let smooth = (old / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor);
                            (1.0 - smooth) * base / s.factor + smooth * base
                        }
                    }
                };
                scaled as f32
            })
            .collect();
        Rope { inv_freq }
    }

    /// `(cos, sin)` of every frequency at `pos` (the angle rounded to `f32` as in Hugging Face).
    fn tables(&self, pos: usize) -> (Vec<f32>, Vec<f32>) {
        let angles = self.inv_freq.iter().map(|f| f64::from(f * pos as f32));
        angles.map(|a| (a.cos() as f32, a.sin() as f32)).unzip()
    }
}

/// Rotates each `head_dim` chunk of `x` in place: pairs `i` and `i + head_dim/2`
/// (Hugging Face's `rotate_half`).
fn apply_rope(x: &mut [f32], head_dim: usize, cos: &[f32], sin: &[f32]) {
    let half = head_dim / 2;
    for head in x.chunks_exact_mut(head_dim) {
        let (a, b) = head.split_at_mut(half);
        for (((a, b), c), s) in a.iter_mut().zip(b.iter_mut()).zip(cos).zip(sin) {
            let (x1, x2) = (*a, *b);
            *a = x1 * c - x2 * s;
            *b = x2 * c + x1 * s;
        }
    }
}

/// The dot product in one fixed order: 8 interleaved partial sums, combined pairwise, then the
/// tail. Every dot product of the op goes through here, so results never depend on the caller.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let ((ca, ta), (cb, tb)) = (a[..n].as_chunks::<8>(), b[..n].as_chunks::<8>());
    let mut acc = [0f32; 8];
    for (x, y) in ca.iter().zip(cb) {
        for k in 0..8 {
            acc[k] += x[k] * y[k];
        }
    }
    let tail: f32 = ta.iter().zip(tb).map(|(x, y)| x * y).fold(0.0, |s, v| s + v);
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail
}

/// `y = W x (+ b)` for `W` of shape `[y.len(), x.len()]`.
fn matvec(w: &[f32], x: &[f32], bias: Option<&[f32]>, y: &mut [f32]) {
    for (j, (yj, row)) in y.iter_mut().zip(w.chunks_exact(x.len().max(1))).enumerate() {
        *yj = dot(row, x) + bias.and_then(|b| b.get(j)).copied().unwrap_or(0.0);
    }
}

/// RMSNorm: `w · x / sqrt(mean(x²) + eps)`.
fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let inv = 1.0 / (dot(x, x) / x.len().max(1) as f32 + eps).sqrt();
    for ((o, xi), wi) in out.iter_mut().zip(x).zip(w) {
        *o = wi * (xi * inv);
    }
}

/// Index of the largest value (ties → lowest index; NaN never wins).
pub fn argmax(values: &[f32]) -> usize {
    let mut best = 0;
    for (i, v) in values.iter().enumerate() {
        if *v > values[best] || values[best].is_nan() {
            best = i;
        }
    }
    best
}

/// A model as one call sees it: dimensions, constants and the weights.
#[derive(Debug, Clone)]
pub struct Model<'a> {
    /// Dimensions.
    pub dims: Dims,
    /// `rms_norm_eps`.
    pub eps: f32,
    /// RoPE frequencies.
    pub rope: &'a Rope,
    /// The weights.
    pub weights: Weights<'a>,
}

/// The KV cache: one `[slots, max_len, kv_heads, head_dim]` tensor per layer, for K and for V.
#[derive(Debug)]
pub struct Caches<'a> {
    /// K per layer.
    pub k: Vec<&'a mut [f32]>,
    /// V per layer.
    pub v: Vec<&'a mut [f32]>,
}

/// On-device greedy picks: the argmax of each logits row and its log-probability.
#[derive(Debug, Default)]
pub struct Picked<'a> {
    /// `[rows]` token ids (-1 for rows without a token).
    pub ids: Option<&'a mut [i32]>,
    /// `[rows]` log-probabilities of the picked ids (0 for rows without a token).
    pub logprobs: Option<&'a mut [f32]>,
}

/// Log-probability of `row[i]`: `row[i] − (max + ln Σ exp(row − max))`, the sum in f64 (the
/// worker's host sampler computes it the same way, so both give the same value).
pub fn logprob_of(row: &[f32], i: usize) -> f32 {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if !max.is_finite() {
        return row[i] - max;
    }
    let sum: f64 = row.iter().map(|&l| f64::from(l - max).exp()).sum();
    row[i] - (max + sum.ln() as f32)
}

/// The forward pass of one call over `tokens` (already validated), updating `caches`; `logits`
/// is `[rows, V]`, and `picked` the greedy picks per row when asked (rows without a token get
/// -1 and 0).
pub fn forward(m: &Model<'_>, caches: &mut Caches<'_>, tokens: &[Token], logits: &mut [f32], picked: Picked<'_>) {
    let (d, eps, rope, w) = (&m.dims, m.eps, m.rope, &m.weights);
    let (h, hd) = (d.hidden, d.head_dim);
    let (q_width, kv_width) = (d.heads * hd, d.kv_heads * hd);
    let mut x = vec![0f32; tokens.len() * h];
    for (xt, t) in x.chunks_exact_mut(h).zip(tokens) {
        xt.copy_from_slice(&w.embed[t.id * h..(t.id + 1) * h]);
    }
    let tables: Vec<(Vec<f32>, Vec<f32>)> = tokens.iter().map(|t| rope.tables(t.pos)).collect();
    let mut q_all = vec![0f32; tokens.len() * q_width];
    let (mut normed, mut k, mut v) = (vec![0f32; h], vec![0f32; kv_width], vec![0f32; kv_width]);
    let (mut attn, mut proj) = (vec![0f32; q_width], vec![0f32; h]);
    let (mut gate, mut up) = (vec![0f32; d.intermediate], vec![0f32; d.intermediate]);
    let slot_offset = |t: &Token| (t.slot * d.max_len + t.pos) * kv_width;
    for (layer, lw) in w.layers.iter().enumerate() {
        let (kc, vc) = (&mut *caches.k[layer], &mut *caches.v[layer]);
        // Every real token's K and V reach the cache before any attention reads it.
        for (i, t) in tokens.iter().enumerate() {
            let (cos, sin) = &tables[i];
            rms_norm(&x[i * h..(i + 1) * h], lw.input_norm, eps, &mut normed);
            let q = &mut q_all[i * q_width..(i + 1) * q_width];
            matvec(lw.q, &normed, lw.q_bias, q);
            matvec(lw.k, &normed, lw.k_bias, &mut k);
            matvec(lw.v, &normed, lw.v_bias, &mut v);
            apply_rope(q, hd, cos, sin);
            apply_rope(&mut k, hd, cos, sin);
            let at = slot_offset(t);
            kc[at..at + kv_width].copy_from_slice(&k);
            vc[at..at + kv_width].copy_from_slice(&v);
        }
        for (i, t) in tokens.iter().enumerate() {
            attention(d, &q_all[i * q_width..(i + 1) * q_width], kc, vc, t, &mut attn);
            let xt = &mut x[i * h..(i + 1) * h];
            matvec(lw.o, &attn, None, &mut proj);
            xt.iter_mut().zip(&proj).for_each(|(a, b)| *a += b);
            rms_norm(xt, lw.post_norm, eps, &mut normed);
            matvec(lw.gate, &normed, None, &mut gate);
            matvec(lw.up, &normed, None, &mut up);
            for (g, u) in gate.iter_mut().zip(&up) {
                *g = *g / (1.0 + (-*g).exp()) * u;
            }
            matvec(lw.down, &gate, None, &mut proj);
            xt.iter_mut().zip(&proj).for_each(|(a, b)| *a += b);
        }
    }
    logits.fill(0.0);
    let Picked { ids: mut next_ids, logprobs: mut next_logprobs } = picked;
    if let Some(ids) = next_ids.as_deref_mut() {
        ids.fill(-1);
    }
    if let Some(lps) = next_logprobs.as_deref_mut() {
        lps.fill(0.0);
    }
    for (i, t) in tokens.iter().enumerate() {
        rms_norm(&x[i * h..(i + 1) * h], w.norm, eps, &mut normed);
        let row = &mut logits[t.row * d.vocab..(t.row + 1) * d.vocab];
        matvec(w.lm_head, &normed, None, row);
        let best = argmax(row);
        if let Some(ids) = next_ids.as_deref_mut() {
            ids[t.row] = best as i32;
        }
        if let Some(lps) = next_logprobs.as_deref_mut() {
            lps[t.row] = logprob_of(row, best);
        }
    }
}

/// Attention of one query (all heads) over `cache[slot, 0..=pos]`.
fn attention(d: &Dims, q: &[f32], kc: &[f32], vc: &[f32], t: &Token, out: &mut [f32]) {
    let hd = d.head_dim;
    let kv_width = d.kv_heads * hd;
    let group = d.heads / d.kv_heads;
    let scale = (1.0 / (hd as f64).sqrt()) as f32;
    let base = t.slot * d.max_len * kv_width;
    let mut scores = vec![0f32; t.pos + 1];
    for (head, (qh, oh)) in q.chunks_exact(hd).zip(out.chunks_exact_mut(hd)).enumerate() {
        let g = head / group;
        for (j, s) in scores.iter_mut().enumerate() {
            let at = base + j * kv_width + g * hd;
            *s = dot(qh, &kc[at..at + hd]) * scale;
        }
        let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0f32;
        for s in scores.iter_mut() {
            *s = (*s - max).exp();
            sum += *s;
        }
        oh.fill(0.0);
        for (j, s) in scores.iter().enumerate() {
            let weight = s / sum;
            let at = base + j * kv_width + g * hd;
            for (o, vj) in oh.iter_mut().zip(&vc[at..at + hd]) {
                *o += weight * vj;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_has_one_fixed_order_and_is_right() {
        let a: Vec<f32> = (0..19).map(|i| i as f32 * 0.5).collect();
        let b: Vec<f32> = (0..19).map(|i| 1.0 - i as f32 * 0.25).collect();
        let want: f64 = a.iter().zip(&b).map(|(x, y)| f64::from(*x) * f64::from(*y)).sum();
        assert!((f64::from(dot(&a, &b)) - want).abs() < 1e-4);
        assert_eq!(dot(&a, &b).to_bits(), dot(&a, &b).to_bits());
        assert_eq!(dot(&[], &[]), 0.0);
    }

    #[test]
    fn argmax_takes_the_lowest_of_ties_and_skips_nan() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0, 2.0]), 1);
        assert_eq!(argmax(&[f32::NAN, 0.5, 0.7]), 2);
        assert_eq!(argmax(&[-1.0]), 0);
    }

    #[test]
    fn rope_rotates_half_pairs_and_llama3_scales_long_wavelengths() {
        let rope = Rope::new(4, 10000.0, None);
        assert_eq!(rope.inv_freq, vec![1.0, 0.01]);
        let (cos, sin) = rope.tables(1);
        let mut x = vec![1.0, 0.0, 0.0, 0.0];
        apply_rope(&mut x, 4, &cos, &sin);
        assert!((x[0] - 1f32.cos()).abs() < 1e-6 && (x[2] - 1f32.sin()).abs() < 1e-6, "{x:?}");
        let scaling = Llama3Scaling {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 32.0,
        };
        let scaled = Rope::new(4, 10000.0, Some(scaling));
        // Wavelength 2π (< 32/4) is kept; 200π (> 32/1) is divided by the factor.
        assert_eq!(scaled.inv_freq, vec![1.0, 0.01 / 8.0]);
        // With 16, 2π lies between 16/4 and 16/1: smoothed, (1 - s)/8 + s with s = (16/2π - 1)/3.
        let medium = Rope::new(4, 10000.0, Some(Llama3Scaling { original_max_position_embeddings: 16.0, ..scaling }));
        let s = (16.0 / (2.0 * std::f64::consts::PI) - 1.0) / 3.0;
        assert!((f64::from(medium.inv_freq[0]) - ((1.0 - s) / 8.0 + s)).abs() < 1e-6, "{:?}", medium.inv_freq);
    }
}
