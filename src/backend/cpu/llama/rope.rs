//! Rotary position embeddings as HF transformers applies them (`rotate_half` layout: the two halves of
//! a head are the pairs), with the default and `llama3` frequency schedules.

use super::config::{Llama3RopeScaling, LlamaConfig};

/// Inverse frequencies of one head and the rotation they apply at a position.
#[derive(Debug, Clone)]
pub struct Rope {
    inv_freq: Vec<f32>,
}

impl Rope {
    /// The schedule of `config` (computed in f32 as transformers does).
    pub fn new(config: &LlamaConfig) -> Self {
        let dim = config.head_dim;
        let theta = config.rope_theta;
        let mut inv_freq: Vec<f32> = (0..dim / 2).map(|i| 1.0 / theta.powf((2 * i) as f32 / dim as f32)).collect();
        if let Some(scaling) = &config.rope_scaling {
            llama3(&mut inv_freq, scaling);
        }
        Rope { inv_freq }
    }

    /// Half the head size: the number of rotated pairs.
    pub fn pairs(&self) -> usize {
        self.inv_freq.len()
    }

    /// Writes cos and sin of every pair's angle at `position` (each `pairs()` long).
    pub fn angles(&self, position: usize, cos: &mut [f32], sin: &mut [f32]) {
        let p = position as f32;
        for ((f, c), s) in self.inv_freq.iter().zip(cos.iter_mut()).zip(sin.iter_mut()) {
            let angle = f * p;
            *c = angle.cos();
            *s = angle.sin();
        }
    }

    /// Rotates every head of `row` (heads of `2 * pairs()` values back to back) by the angles from
    /// [`Rope::angles`]: `x * cos + rotate_half(x) * sin`.
    pub fn rotate(row: &mut [f32], cos: &[f32], sin: &[f32]) {
        let half = cos.len();
        for head in row.chunks_exact_mut(2 * half) {
            let (x1, x2) = head.split_at_mut(half);
            for i in 0..half {
                let (a, b) = (x1[i], x2[i]);
                x1[i] = a * cos[i] - b * sin[i];
                x2[i] = b * cos[i] + a * sin[i];
            }
        }
    }
}

/// Llama 3.1's frequency schedule: long wavelengths slowed by `factor`, short ones kept, a smooth ramp
/// between (transformers' `_compute_llama3_parameters`).
fn llama3(inv_freq: &mut [f32], s: &Llama3RopeScaling) {
    let low_freq_wavelen = s.original_max_position_embeddings / s.low_freq_factor;
    let high_freq_wavelen = s.original_max_position_embeddings / s.high_freq_factor;
    for f in inv_freq.iter_mut() {
        let wavelen = 2.0 * std::f32::consts::PI / *f;
        let scaled = if wavelen > low_freq_wavelen { *f / s.factor } else { *f };
        let medium = wavelen >= high_freq_wavelen && wavelen <= low_freq_wavelen;
        *f = if medium {
            let smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor)
                / (s.high_freq_factor - s.low_freq_factor);
            (1.0 - smooth) * scaled / s.factor + smooth * scaled
        } else {
            scaled
        };
    }
}
