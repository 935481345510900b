//! Tensor names: GGUF (`blk.N.attn_q.weight`) ↔ Hugging Face (`model.layers.N.self_attn.q_proj.weight`).

/// GGUF block-tensor stems and their HF counterparts inside `model.layers.N.`.
const LAYER: &[(&str, &str)] = &[
    ("attn_norm", "input_layernorm"),
    ("ffn_norm", "post_attention_layernorm"),
    ("attn_q", "self_attn.q_proj"),
    ("attn_k", "self_attn.k_proj"),
    ("attn_v", "self_attn.v_proj"),
    ("attn_output", "self_attn.o_proj"),
    ("ffn_gate", "mlp.gate_proj"),
    ("ffn_up", "mlp.up_proj"),
    ("ffn_down", "mlp.down_proj"),
];

/// Tensors outside the layers.
const GLOBAL: &[(&str, &str)] =
    &[("token_embd", "model.embed_tokens"), ("output_norm", "model.norm"), ("output", "lm_head")];

/// The GGUF name of an HF tensor name (`None` for names GGUF files do not use).
pub fn gguf_name(hf: &str) -> Option<String> {
    let (stem, suffix) = hf.rsplit_once('.')?;
    if suffix != "weight" && suffix != "bias" {
        return None;
    }
    if let Some(rest) = stem.strip_prefix("model.layers.") {
        let (n, part) = rest.split_once('.')?;
        let n: usize = n.parse().ok()?;
        let (g, _) = LAYER.iter().find(|(_, h)| *h == part)?;
        return Some(format!("blk.{n}.{g}.{suffix}"));
    }
    let (g, _) = GLOBAL.iter().find(|(_, h)| *h == stem)?;
    Some(format!("{g}.{suffix}"))
}

/// The HF name of a GGUF tensor name (`None` for tensors HF checkpoints do not have, e.g.
/// `rope_freqs.weight`).
pub fn hf_name(gguf: &str) -> Option<String> {
    let (stem, suffix) = gguf.rsplit_once('.')?;
    if suffix != "weight" && suffix != "bias" {
        return None;
    }
    if let Some(rest) = stem.strip_prefix("blk.") {
        let (n, part) = rest.split_once('.')?;
        let n: usize = n.parse().ok()?;
        let (_, h) = LAYER.iter().find(|(g, _)| *g == part)?;
        return Some(format!("model.layers.{n}.{h}.{suffix}"));
    }
    let (_, h) = GLOBAL.iter().find(|(g, _)| *g == stem)?;
    Some(format!("{h}.{suffix}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_both_ways() {
        let pairs = [
            ("blk.3.attn_q.weight", "model.layers.3.self_attn.q_proj.weight"),
            ("blk.0.attn_k.bias", "model.layers.0.self_attn.k_proj.bias"),
            ("blk.29.ffn_down.weight", "model.layers.29.mlp.down_proj.weight"),
            ("blk.1.ffn_norm.weight", "model.layers.1.post_attention_layernorm.weight"),
            ("token_embd.weight", "model.embed_tokens.weight"),
            ("output_norm.weight", "model.norm.weight"),
            ("output.weight", "lm_head.weight"),
        ];
        for (g, h) in pairs {
            assert_eq!(hf_name(g).as_deref(), Some(h));
            assert_eq!(gguf_name(h).as_deref(), Some(g));
        }
        assert_eq!(hf_name("rope_freqs.weight"), None);
        assert_eq!(gguf_name("model.layers.x.mlp.up_proj.weight"), None);
    }
}
