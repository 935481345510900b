//! The built-in models served when no `--model-repository` is given: `linear` and `mlp`
//! (weights embedded as closed forms / a documented seeded generator, see `backend::cpu::builtin`),
//! the stateful `accumulate` and `gru` (see `backend::cpu::stateful::kernels`), and the generative
//! `tiny_decoder` (see `repository::generative`).

/// Configurations of the built-in models, in Triton's text format.
pub const BUILTIN_CONFIGS: &[(&str, &str)] = &[
    (
        "linear",
        r#"
name: "linear"
backend: "builtin"
max_batch_size: 64
input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 64 ] } ]
output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 16 ] } ]
dynamic_batching { }
"#,
    ),
    (
        "mlp",
        r#"
name: "mlp"
backend: "builtin"
max_batch_size: 64
input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 256 ] } ]
output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 256 ] } ]
dynamic_batching { }
"#,
    ),
    ("accumulate", crate::backend::cpu::stateful::kernels::ACCUMULATE_CONFIG),
    ("gru", crate::backend::cpu::stateful::kernels::GRU_CONFIG),
    (super::generative::TINY_DECODER, super::generative::TINY_DECODER_CONFIG),
];
