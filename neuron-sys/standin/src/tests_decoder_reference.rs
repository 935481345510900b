//! The `llama_decoder` op's math against independent references: logits computed by Hugging Face
//! transformers (committed fixtures, `tests/fixtures/make_llama_fixture.py`) and a plain `f64`
//! forward pass written here, through prefill and decode programs alike.

use std::collections::HashMap;

use neff_format::program::{DecoderConfig, DecoderMode};

use crate::knobs::Knobs;
use crate::tests::runtime;
use crate::tests_decoder::{Device, random_weights, tiny_config, tiny_config_all_options};

const TOLERANCE: f64 = 1e-4;

fn max_diff(got: &[Vec<f32>], want: &[Vec<f64>]) -> f64 {
    assert_eq!(got.len(), want.len());
    got.iter()
        .zip(want)
        .flat_map(|(g, w)| {
            assert_eq!(g.len(), w.len());
            g.iter().zip(w).map(|(a, b)| (f64::from(*a) - b).abs())
        })
        .fold(0.0, f64::max)
}

/// Logits of every prompt position: one prefill of the whole prompt (bucket 16, slot 0), and
/// a prefill of the first `split` tokens (slot 1) followed by one decode step per remaining
/// token in a batch of 2 whose other row is padding.
fn stand_in_logits(dev: &Device, prompt: &[i32], split: usize) -> (Vec<Vec<f32>>, Vec<Vec<f32>>) {
    let whole = dev.prefill(16, 0, 0, prompt);
    let mut stepped = dev.prefill(8, 1, 0, &prompt[..split]);
    let vocab = dev.config.vocab_size as usize;
    let context = Some(dev.config.max_len);
    for (pos, &id) in prompt.iter().enumerate().skip(split) {
        let out = dev.step(DecoderMode::Decode, context, &[0, id], &[-1, pos as i32], &[0, 1]).expect("decode");
        stepped.push(out.logits[vocab..].to_vec());
    }
    (whole, stepped)
}

/// A committed fixture: config, weights (HF name, shape, values), prompt, reference logits.
type Fixture = (DecoderConfig, Vec<(String, Vec<u64>, Vec<f32>)>, Vec<i32>, Vec<Vec<f64>>);

fn load_fixture(stem: &str) -> Fixture {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join(format!("{stem}.json"))).expect("fixture json"))
            .expect("valid json");
    let config: DecoderConfig = serde_json::from_value(json["config"].clone()).expect("config");
    let prompt: Vec<i32> = serde_json::from_value(json["prompt"].clone()).expect("prompt");
    let logits: Vec<Vec<f64>> = serde_json::from_value(json["logits"].clone()).expect("logits");
    let bytes = std::fs::read(dir.join(format!("{stem}.safetensors"))).expect("fixture weights");
    let file = safetensors::SafeTensors::deserialize(&bytes).expect("safetensors");
    assert_eq!(file.len(), config.weights().len(), "exactly the tensors the decoder takes");
    let weights = config
        .weights()
        .into_iter()
        .map(|(name, shape)| {
            let view = file.tensor(&name).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(view.dtype(), safetensors::Dtype::F32);
            assert_eq!(view.shape().iter().map(|&d| d as u64).collect::<Vec<_>>(), shape, "{name}");
            let values = view.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
            (name, shape, values)
        })
        .collect();
    (config, weights, prompt, logits)
}

#[test]
fn logits_match_hugging_face_transformers_for_llama3_rope_and_qwen2_biases() {
    for stem in ["llama_tiny", "qwen2_tiny"] {
        let (config, weights, prompt, want) = load_fixture(stem);
        let dev = Device::new(runtime(Knobs::default()), &config, &weights);
        let (whole, stepped) = stand_in_logits(&dev, &prompt, 5);
        let (d_whole, d_stepped) = (max_diff(&whole, &want), max_diff(&stepped, &want));
        eprintln!("{stem}: max |stand-in - transformers| prefill {d_whole:.2e}, prefill+decode {d_stepped:.2e}");
        assert!(d_whole < TOLERANCE && d_stepped < TOLERANCE, "{stem}: {d_whole} {d_stepped}");
        let spread = want.iter().flatten().fold(0f64, |m, v| m.max(v.abs()));
        assert!(spread > 1.0, "{stem}: the reference logits are not near-uniform ({spread})");
    }
}

/// A plain `f64` forward pass of the whole prompt (causal attention over every earlier
/// position, no cache), straight from the Hugging Face formulas.
fn naive_logits(c: &DecoderConfig, weights: &[(String, Vec<u64>, Vec<f32>)], prompt: &[i32]) -> Vec<Vec<f64>> {
    let w: HashMap<&str, Vec<f64>> =
        weights.iter().map(|(n, _, v)| (n.as_str(), v.iter().map(|x| f64::from(*x)).collect())).collect();
    let (h, hd, heads, kvh) =
        (c.hidden_size as usize, c.head_dim as usize, c.num_heads as usize, c.num_kv_heads as usize);
    let (inter, vocab) = (c.intermediate_size as usize, c.vocab_size as usize);
    let linear = |m: &str, x: &[f64], rows: usize| -> Vec<f64> {
        let m = &w[m];
        (0..rows).map(|r| (0..x.len()).map(|i| m[r * x.len() + i] * x[i]).sum()).collect()
    };
    let norm = |name: &str, x: &[f64]| -> Vec<f64> {
        let ms = x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64;
        let inv = 1.0 / (ms + c.rms_norm_eps).sqrt();
        x.iter().zip(&w[name]).map(|(v, g)| v * inv * g).collect()
    };
    let inv_freq: Vec<f64> = (0..hd / 2)
        .map(|i| {
            let f = c.rope_theta.powf(-((2 * i) as f64) / hd as f64);
            let Some(s) = c.rope_scaling else { return f };
            let old = s.original_max_position_embeddings as f64;
            let wavelen = 2.0 * std::f64::consts::PI / f;
            if wavelen < old / s.high_freq_factor {
                f
            } else if wavelen > old / s.low_freq_factor {
                f / s.factor
            } else {
                let smooth = (old / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor);
                (1.0 - smooth) * f / s.factor + smooth * f
            }
        })
        .collect();
    let rope = |x: &mut [f64], pos: usize| {
        for head in x.chunks_mut(hd) {
            for i in 0..hd / 2 {
                let (cos, sin) = ((pos as f64 * inv_freq[i]).cos(), (pos as f64 * inv_freq[i]).sin());
                let (a, b) = (head[i], head[i + hd / 2]);
                head[i] = a * cos - b * sin;
                head[i + hd / 2] = b * cos + a * sin;
            }
        }
    };
    let mut xs: Vec<Vec<f64>> =
        prompt.iter().map(|&t| w["model.embed_tokens.weight"][t as usize * h..(t as usize + 1) * h].to_vec()).collect();
    for l in 0..c.num_layers {
        let p = format!("model.layers.{l}");
        let mut qs = Vec::new();
        let (mut ks, mut vs) = (Vec::new(), Vec::new());
        for (pos, x) in xs.iter().enumerate() {
            let n = norm(&format!("{p}.input_layernorm.weight"), x);
            let proj = |which: &str, rows: usize| {
                let mut y = linear(&format!("{p}.self_attn.{which}_proj.weight"), &n, rows);
                if c.attention_bias {
                    y.iter_mut()
                        .zip(&w[format!("{p}.self_attn.{which}_proj.bias").as_str()])
                        .for_each(|(a, b)| *a += b);
                }
                y
            };
            let (mut q, mut k, v) = (proj("q", heads * hd), proj("k", kvh * hd), proj("v", kvh * hd));
            rope(&mut q, pos);
            rope(&mut k, pos);
            qs.push(q);
            ks.push(k);
            vs.push(v);
        }
        for (pos, x) in xs.iter_mut().enumerate() {
            let mut attn = vec![0.0; heads * hd];
            for head in 0..heads {
                let g = head / (heads / kvh);
                let q = &qs[pos][head * hd..(head + 1) * hd];
                let scores: Vec<f64> = (0..=pos)
                    .map(|j| {
                        q.iter().zip(&ks[j][g * hd..(g + 1) * hd]).map(|(a, b)| a * b).sum::<f64>() / (hd as f64).sqrt()
                    })
                    .collect();
                let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let total: f64 = scores.iter().map(|s| (s - max).exp()).sum();
                for (j, s) in scores.iter().enumerate() {
                    for d in 0..hd {
                        attn[head * hd + d] += (s - max).exp() / total * vs[j][g * hd + d];
                    }
                }
            }
            let o = linear(&format!("{p}.self_attn.o_proj.weight"), &attn, h);
            x.iter_mut().zip(&o).for_each(|(a, b)| *a += b);
            let n = norm(&format!("{p}.post_attention_layernorm.weight"), x);
            let gate = linear(&format!("{p}.mlp.gate_proj.weight"), &n, inter);
            let up = linear(&format!("{p}.mlp.up_proj.weight"), &n, inter);
            let act: Vec<f64> = gate.iter().zip(&up).map(|(g, u)| g / (1.0 + (-g).exp()) * u).collect();
            let down = linear(&format!("{p}.mlp.down_proj.weight"), &act, h);
            x.iter_mut().zip(&down).for_each(|(a, b)| *a += b);
        }
    }
    let head = if c.tie_word_embeddings { "model.embed_tokens.weight" } else { "lm_head.weight" };
    xs.iter().map(|x| linear(head, &norm("model.norm.weight", x), vocab)).collect()
}

#[test]
fn logits_match_a_plain_f64_forward_pass_with_and_without_every_option() {
    let prompt = [3, 17, 42, 8, 8, 0, 49, 21, 5, 30, 11, 2, 44];
    for config in [tiny_config(), tiny_config_all_options()] {
        let weights = random_weights(&config, 21);
        let want = naive_logits(&config, &weights, &prompt);
        let dev = Device::new(runtime(Knobs::default()), &config, &weights);
        let (whole, stepped) = stand_in_logits(&dev, &prompt, 6);
        let (d_whole, d_stepped) = (max_diff(&whole, &want), max_diff(&stepped, &want));
        assert!(d_whole < TOLERANCE && d_stepped < TOLERANCE, "{config:?}: {d_whole} {d_stepped}");
    }
}
