//! A small generated BERT checkpoint (hidden 32, 2 layers, 4 heads, vocab 100) for tests: seeded
//! weights, written as an HF folder (config.json + model.safetensors, optional sentence-transformers
//! files) in F32, F16 or BF16.

use std::path::Path;

use safetensors::Dtype;

pub const H: usize = 32;
pub const LAYERS: usize = 2;
pub const HEADS: usize = 4;
pub const INTER: usize = 64;
pub const VOCAB: usize = 100;
pub const MAX_POS: usize = 16;
pub const TYPES: usize = 2;

pub type Weights = Vec<(String, Vec<usize>, Vec<f32>)>;

pub struct Rng(u64);
impl Rng {
    /// Next value in [-1, 1).
    pub fn next(&mut self) -> f32 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((self.0 >> 40) as f32 / 16_777_216.0) * 2.0 - 1.0
    }
}

pub fn generate(seed: u64) -> Weights {
    let mut rng = Rng(seed);
    let mut w: Weights = Vec::new();
    let mut add = |name: String, shape: Vec<usize>, scale: f32, offset: f32| {
        let n = shape.iter().product();
        let v = (0..n).map(|_| offset + scale * rng.next()).collect();
        w.push((name, shape, v));
    };
    add("embeddings.word_embeddings.weight".into(), vec![VOCAB, H], 0.5, 0.0);
    add("embeddings.position_embeddings.weight".into(), vec![MAX_POS, H], 0.5, 0.0);
    add("embeddings.token_type_embeddings.weight".into(), vec![TYPES, H], 0.5, 0.0);
    add("embeddings.LayerNorm.weight".into(), vec![H], 0.2, 1.0);
    add("embeddings.LayerNorm.bias".into(), vec![H], 0.1, 0.0);
    for l in 0..LAYERS {
        let p = format!("encoder.layer.{l}.");
        for part in ["query", "key", "value"] {
            add(format!("{p}attention.self.{part}.weight"), vec![H, H], 0.3, 0.0);
            add(format!("{p}attention.self.{part}.bias"), vec![H], 0.1, 0.0);
        }
        add(format!("{p}attention.output.dense.weight"), vec![H, H], 0.2, 0.0);
        add(format!("{p}attention.output.dense.bias"), vec![H], 0.1, 0.0);
        add(format!("{p}attention.output.LayerNorm.weight"), vec![H], 0.2, 1.0);
        add(format!("{p}attention.output.LayerNorm.bias"), vec![H], 0.1, 0.0);
        add(format!("{p}intermediate.dense.weight"), vec![INTER, H], 0.2, 0.0);
        add(format!("{p}intermediate.dense.bias"), vec![INTER], 0.1, 0.0);
        add(format!("{p}output.dense.weight"), vec![H, INTER], 0.15, 0.0);
        add(format!("{p}output.dense.bias"), vec![H], 0.1, 0.0);
        add(format!("{p}output.LayerNorm.weight"), vec![H], 0.2, 1.0);
        add(format!("{p}output.LayerNorm.bias"), vec![H], 0.1, 0.0);
    }
    w
}

/// Rounds weights through `dtype` (what a checkpoint of that dtype holds).
pub fn rounded(w: &Weights, dtype: Dtype) -> Weights {
    let r = |v: f32| match dtype {
        Dtype::F16 => half::f16::from_f32(v).to_f32(),
        Dtype::BF16 => half::bf16::from_f32(v).to_f32(),
        _ => v,
    };
    w.iter().map(|(n, s, v)| (n.clone(), s.clone(), v.iter().map(|x| r(*x)).collect())).collect()
}

pub fn write_checkpoint(dir: &Path, w: &Weights, dtype: Dtype, prefix: &str, sentence_files: bool) {
    let config = format!(
        r#"{{"hidden_size":{H},"num_hidden_layers":{LAYERS},"num_attention_heads":{HEADS},
            "intermediate_size":{INTER},"hidden_act":"gelu","layer_norm_eps":1e-12,
            "vocab_size":{VOCAB},"max_position_embeddings":{MAX_POS},"type_vocab_size":{TYPES}}}"#
    );
    std::fs::write(dir.join("config.json"), config).expect("write config");
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = w
        .iter()
        .map(|(n, s, v)| {
            let b: Vec<u8> = match dtype {
                Dtype::F16 => v.iter().flat_map(|x| half::f16::from_f32(*x).to_le_bytes()).collect(),
                Dtype::BF16 => v.iter().flat_map(|x| half::bf16::from_f32(*x).to_le_bytes()).collect(),
                _ => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            };
            (format!("{prefix}{n}"), s.clone(), b)
        })
        .collect();
    let views = bytes
        .iter()
        .map(|(n, s, b)| (n.clone(), safetensors::tensor::TensorView::new(dtype, s.clone(), b).expect("view")));
    let file = safetensors::serialize(views, None).expect("serialize");
    std::fs::write(dir.join("model.safetensors"), file).expect("write safetensors");
    if sentence_files {
        let modules = r#"[{"idx":0,"name":"0","path":"","type":"sentence_transformers.models.Transformer"},
            {"idx":1,"name":"1","path":"1_Pooling","type":"sentence_transformers.models.Pooling"},
            {"idx":2,"name":"2","path":"2_Normalize","type":"sentence_transformers.models.Normalize"}]"#;
        std::fs::write(dir.join("modules.json"), modules).expect("write modules");
        std::fs::create_dir_all(dir.join("1_Pooling")).expect("mkdir");
        let pooling =
            r#"{"word_embedding_dimension":32,"pooling_mode_cls_token":false,"pooling_mode_mean_tokens":true}"#;
        std::fs::write(dir.join("1_Pooling/config.json"), pooling).expect("write pooling");
    }
}

pub fn checkpoint(dtype: Dtype, prefix: &str, sentence_files: bool) -> (tempfile::TempDir, Weights) {
    let dir = tempfile::tempdir().expect("temp dir");
    let w = generate(42);
    write_checkpoint(dir.path(), &w, dtype, prefix, sentence_files);
    (dir, rounded(&w, dtype))
}

// ---- the plain-loop reference, one sequence at a time, in f64 ----
