//! Seeded random weights for a decoder of any shape: benchmarks, and built-in demo models that need no
//! download. Every tensor is a pure function of (seed, name), so a model is reproducible anywhere.

use super::LoadError;
use super::config::LlamaConfig;
use super::weights::{Weight, WeightSource};

/// A [`WeightSource`] drawing every tensor the configuration needs from a seeded generator: norms 1,
/// embeddings uniform in ±1, matrices uniform with standard deviation `1/sqrt(in_features)`.
#[derive(Debug, Clone)]
pub struct RandomWeights {
    config: LlamaConfig,
    seed: u64,
}

impl RandomWeights {
    /// Random weights for `config` drawn from `seed`.
    pub fn new(config: LlamaConfig, seed: u64) -> Self {
        RandomWeights { config, seed }
    }

    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        let c = &self.config;
        let (h, i) = (c.hidden_size, c.intermediate_size);
        if name == "model.embed_tokens.weight" || (name == "lm_head.weight" && !c.tie_word_embeddings) {
            return Some(vec![c.vocab_size, h]);
        }
        if name == "model.norm.weight" {
            return Some(vec![h]);
        }
        let rest = name.strip_prefix("model.layers.")?;
        let (layer, rest) = rest.split_once('.')?;
        if layer.parse::<usize>().ok()? >= c.num_hidden_layers {
            return None;
        }
        Some(match rest {
            "input_layernorm.weight" | "post_attention_layernorm.weight" => vec![h],
            "self_attn.q_proj.weight" => vec![c.q_dim(), h],
            "self_attn.k_proj.weight" | "self_attn.v_proj.weight" => vec![c.kv_dim(), h],
            "self_attn.q_proj.bias" if c.attention_bias => vec![c.q_dim()],
            "self_attn.k_proj.bias" | "self_attn.v_proj.bias" if c.attention_bias => vec![c.kv_dim()],
            "self_attn.o_proj.weight" => vec![h, c.q_dim()],
            "mlp.gate_proj.weight" | "mlp.up_proj.weight" => vec![i, h],
            "mlp.down_proj.weight" => vec![h, i],
            _ => return None,
        })
    }
}

/// splitmix64: a small, well-mixed generator.
fn next(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl WeightSource for RandomWeights {
    fn tensor(&self, hf_name: &str) -> Result<Option<Weight>, LoadError> {
        let Some(shape) = self.shape(hf_name) else {
            return Ok(None);
        };
        let len: usize = shape.iter().product();
        let data = if hf_name.ends_with("norm.weight") {
            vec![1.0; len]
        } else {
            let mut state =
                hf_name.bytes().fold(self.seed, |s, b| s.rotate_left(8) ^ u64::from(b).wrapping_mul(0x100_0000_01B3));
            // Uniform in ±a has standard deviation a/sqrt(3).
            let amplitude = if hf_name.contains("embed_tokens") || hf_name.ends_with(".bias") {
                1.0
            } else {
                3f32.sqrt() / (shape[shape.len() - 1] as f32).sqrt()
            };
            (0..len).map(|_| ((next(&mut state) >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * amplitude).collect()
        };
        Ok(Some(Weight::Dense { data, shape }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::llama::LlamaModel;
    use crate::backend::generative::{DecoderInstance, KvDtype, LogitsWanted, SeqChunk};

    #[test]
    fn builds_a_reproducible_model() {
        let config = LlamaConfig::from_json(
            r#"{"hidden_size":32,"intermediate_size":48,"num_hidden_layers":2,"num_attention_heads":4,
            "num_key_value_heads":2,"vocab_size":50,"attention_bias":true}"#,
        )
        .unwrap();
        let run = |seed| {
            let mut m =
                LlamaModel::new(config.clone(), &RandomWeights::new(config.clone(), seed), 4, 8, KvDtype::F32).unwrap();
            let mut out = Vec::new();
            let chunk = SeqChunk { tokens: &[1, 2, 3], start: 0, blocks: &[0], logits: LogitsWanted::All };
            m.forward(&[chunk], &mut out).unwrap();
            (out, m.weights_digest())
        };
        let (a, da) = run(1);
        let (b, db) = run(1);
        let (c, dc) = run(2);
        assert_eq!(a.len(), 3 * 50);
        assert!(a.iter().all(|v| v.is_finite()));
        assert_eq!((a.clone(), da), (b, db));
        assert_ne!(a, c);
        assert_ne!(da, dc);
    }
}
