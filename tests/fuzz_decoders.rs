//! Property (fuzz) tests on stable Rust for the decoders that read what a client, a file or another
//! worker sends: the session blob, `config.pbtxt`, NEFF files, GGUF headers. Each gets arbitrary
//! bytes and mutations of a valid input (flipped, overwritten, truncated, inserted bytes) and must
//! answer `Ok` or a clean `Err` — never panic, never allocate what the input merely claims — and a
//! blob that decodes must re-encode to the same bytes.
//!
//! `cargo test --test fuzz_decoders` runs 256 cases per target; a long run:
//! `PROPTEST_CASES=200000 cargo test --release --test fuzz_decoders`. A failure prints the minimal
//! input; add it as a regression case below.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)] // test and benchmark code may panic on setup failures

use neuron_worker::sessions::{SequenceId, SessionBlob};
use neuron_worker::tensor::Tensor;
use proptest::prelude::*;

/// Ways to damage a valid input.
#[derive(Debug, Clone)]
enum Mutation {
    Flip {
        at: usize,
        bit: u8,
    },
    Set {
        at: usize,
        value: u8,
    },
    /// Overwrites 8 bytes with a huge little-endian number (lengths, counts, dims).
    Huge {
        at: usize,
        value: u64,
    },
    Truncate {
        at: usize,
    },
    Insert {
        at: usize,
        bytes: Vec<u8>,
    },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 0u8..8).prop_map(|(at, bit)| Mutation::Flip { at, bit }),
        (any::<usize>(), any::<u8>()).prop_map(|(at, value)| Mutation::Set { at, value }),
        (any::<usize>(), prop_oneof![Just(u64::MAX), Just(u32::MAX as u64), Just(1u64 << 40), any::<u64>()])
            .prop_map(|(at, value)| Mutation::Huge { at, value }),
        any::<usize>().prop_map(|at| Mutation::Truncate { at }),
        (any::<usize>(), proptest::collection::vec(any::<u8>(), 1..16))
            .prop_map(|(at, bytes)| Mutation::Insert { at, bytes }),
    ]
}

/// Applies `ms` to `data`, positions taken modulo `window` (the part worth damaging).
fn apply(mut data: Vec<u8>, ms: &[Mutation], window: usize) -> Vec<u8> {
    for m in ms {
        let len = data.len().min(window).max(1);
        match m {
            Mutation::Flip { at, bit } => {
                if let Some(b) = data.get_mut(at % len) {
                    *b ^= 1 << bit;
                }
            }
            Mutation::Set { at, value } => {
                if let Some(b) = data.get_mut(at % len) {
                    *b = *value;
                }
            }
            Mutation::Huge { at, value } => {
                let at = at % len;
                for (i, b) in value.to_le_bytes().iter().enumerate() {
                    if let Some(d) = data.get_mut(at + i) {
                        *d = *b;
                    }
                }
            }
            Mutation::Truncate { at } => data.truncate(at % (data.len() + 1)),
            Mutation::Insert { at, bytes } => {
                let at = at % (data.len() + 1);
                data.splice(at..at, bytes.iter().copied());
            }
        }
    }
    data
}

fn valid_blob() -> SessionBlob {
    SessionBlob {
        model: "m".into(),
        version: 3,
        id: SequenceId::Str("agent-7".into()),
        steps: 5,
        state: vec![
            Tensor::from_f32(vec![2, 3], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]),
            Tensor { dtype: neuron_worker::tensor::DataType::Uint32, shape: vec![4], data: vec![7; 16] },
        ],
    }
}

fn config_text() -> &'static str {
    r#"name: "m"
backend: "cpu"
max_batch_size: 8
input [ { name: "x" data_type: TYPE_FP32 dims: [ 4, -1 ] } ]
output [ { name: "y" data_type: TYPE_FP32 dims: [ 4 ] } ]
instance_group [ { count: 2 kind: KIND_CPU } ]
parameters { key: "kv_cache_memory" value: { string_value: "16MiB" } }
sequence_batching { max_sequence_idle_microseconds: 1000 control_input [ { name: "START" control [ { kind: CONTROL_SEQUENCE_START fp32_false_true: [ 0, 1 ] } ] } ] }
"#
}

fn small_neff() -> Vec<u8> {
    use neuron_worker::neff::writer::{NeffBuilder, ProgramOp};
    NeffBuilder::new("small.neff")
        .input("a", "float32", &[2, 3])
        .output("b", "float32", &[2, 3])
        .op(ProgramOp::Copy { input: "a".into(), output: "b".into() })
        .build()
        .expect("builder input is valid")
}

fn gguf_fixture() -> Vec<u8> {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama/gguf-llama-gqa/f32.gguf");
    std::fs::read(p).expect("the GGUF fixture")
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn session_blobs_from_arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = SessionBlob::decode(&bytes);
    }

    #[test]
    fn damaged_session_blobs_are_refused_or_round_trip(ms in proptest::collection::vec(mutation(), 1..4)) {
        let good = valid_blob().encode();
        let bad = apply(good.clone(), &ms, usize::MAX);
        if let Ok(b) = SessionBlob::decode(&bad) {
            prop_assert_eq!(b.encode(), bad, "a blob that decodes re-encodes to the same bytes");
        }
    }

    #[test]
    fn configs_from_arbitrary_text_never_panic(text in "\\PC{0,300}") {
        let _ = neuron_worker::config::parse_model_config(&text, "fuzz");
    }

    #[test]
    fn damaged_configs_never_panic(ms in proptest::collection::vec(mutation(), 1..6)) {
        let bad = apply(config_text().as_bytes().to_vec(), &ms, usize::MAX);
        let text = String::from_utf8_lossy(&bad);
        let _ = neuron_worker::config::parse_model_config(&text, "fuzz");
    }

    #[test]
    fn damaged_neffs_never_panic(ms in proptest::collection::vec(mutation(), 1..4)) {
        let bad = apply(small_neff(), &ms, 2048);
        let _ = neff_format::parse_neff(&bad, "fuzz.neff");
    }

    #[test]
    fn damaged_gguf_headers_never_panic(ms in proptest::collection::vec(mutation(), 1..4)) {
        // The metadata and tensor directory are in the first few KiB.
        let bad = apply(gguf_fixture(), &ms, 8192);
        let _ = neuron_worker::backend::cpu::gguf::GgufFile::parse(bad);
    }
}

#[test]
fn the_valid_inputs_are_valid() {
    assert!(SessionBlob::decode(&valid_blob().encode()).is_ok());
    neuron_worker::config::parse_model_config(config_text(), "fuzz").expect("the seed config parses");
    neff_format::parse_neff(&small_neff(), "small.neff").expect("the seed NEFF parses");
    neuron_worker::backend::cpu::gguf::GgufFile::parse(gguf_fixture()).expect("the seed GGUF parses");
}
