//! Parser tests on a hand-built file: values round-trip, every truncation and absurd count is an
//! error (never a panic or a huge allocation).

use super::*;

fn s(out: &mut Vec<u8>, v: &str) {
    out.extend_from_slice(&(v.len() as u64).to_le_bytes());
    out.extend_from_slice(v.as_bytes());
}

/// A GGUF v3 file: three metadata values, one 2×32 Q8_0 tensor and one F32 vector.
fn tiny() -> Vec<u8> {
    let mut b = b"GGUF".to_vec();
    b.extend_from_slice(&3u32.to_le_bytes());
    b.extend_from_slice(&2u64.to_le_bytes());
    b.extend_from_slice(&3u64.to_le_bytes());
    s(&mut b, "general.architecture");
    b.extend_from_slice(&8u32.to_le_bytes());
    s(&mut b, "llama");
    s(&mut b, "llama.rope.freq_base");
    b.extend_from_slice(&6u32.to_le_bytes());
    b.extend_from_slice(&10000.0f32.to_le_bytes());
    s(&mut b, "tokenizer.ggml.tokens");
    b.extend_from_slice(&9u32.to_le_bytes());
    b.extend_from_slice(&8u32.to_le_bytes());
    b.extend_from_slice(&2u64.to_le_bytes());
    s(&mut b, "a");
    s(&mut b, "b");
    s(&mut b, "blk.0.attn_v.weight");
    b.extend_from_slice(&2u32.to_le_bytes());
    b.extend_from_slice(&32u64.to_le_bytes());
    b.extend_from_slice(&2u64.to_le_bytes());
    b.extend_from_slice(&8u32.to_le_bytes());
    b.extend_from_slice(&0u64.to_le_bytes());
    s(&mut b, "output_norm.weight");
    b.extend_from_slice(&1u32.to_le_bytes());
    b.extend_from_slice(&4u64.to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes());
    b.extend_from_slice(&96u64.to_le_bytes());
    while !b.len().is_multiple_of(32) {
        b.push(0);
    }
    for row in 0..2u8 {
        b.extend_from_slice(&half::f16::from_f32(0.5).to_le_bytes());
        b.extend((0..32u8).map(|e| e.wrapping_add(row)));
    }
    b.resize(b.len() + (96 - 68), 0);
    for v in [1.0f32, 2.0, 3.0, 4.0] {
        b.extend_from_slice(&v.to_le_bytes());
    }
    b
}

#[test]
fn parses_values_and_tensors() {
    let f = GgufFile::parse(tiny()).unwrap();
    assert_eq!(f.version, 3);
    assert_eq!(f.get("general.architecture").and_then(GgufValue::as_str), Some("llama"));
    assert_eq!(f.get("llama.rope.freq_base").and_then(GgufValue::as_f64), Some(10000.0));
    let toks = f.get("tokenizer.ggml.tokens").and_then(GgufValue::as_array).unwrap();
    assert_eq!(toks, &[GgufValue::Str("a".into()), GgufValue::Str("b".into())]);
    let v = f.tensor_info("blk.0.attn_v.weight").unwrap();
    assert_eq!((v.dims.clone(), v.ggml_type), (vec![32, 2], 8));
    let bytes = f.tensor_bytes(v, 68).unwrap();
    assert_eq!(bytes[2..5], [0, 1, 2]);
    let n = f.tensor_info("output_norm.weight").unwrap();
    assert_eq!(f.tensor_bytes(n, 16).unwrap()[..4], 1.0f32.to_le_bytes());
    assert!(f.tensor_bytes(n, 17).is_err());
}

#[test]
fn every_truncation_is_an_error() {
    let full = tiny();
    // Up to the end of the tensor infos (the data section is checked when a tensor is read).
    for len in 0..200 {
        assert!(GgufFile::parse(full[..len].to_vec()).is_err(), "prefix of {len} bytes parsed");
    }
}

#[test]
fn absurd_counts_and_types_are_errors() {
    let mut b = tiny();
    b[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(matches!(GgufFile::parse(b), Err(GgufError::Malformed { .. })));
    let mut b = tiny();
    b[16..24].copy_from_slice(&(1u64 << 40).to_le_bytes());
    assert!(matches!(GgufFile::parse(b), Err(GgufError::Malformed { .. })));
    let mut b = tiny();
    b[4..8].copy_from_slice(&1u32.to_le_bytes());
    assert!(matches!(GgufFile::parse(b), Err(GgufError::Unsupported { .. })));
    // Corrupting any single byte never panics.
    let full = tiny();
    for i in 0..full.len() {
        for v in [0u8, 0x7F, 0xFF] {
            let mut b = full.clone();
            b[i] = v;
            if let Ok(f) = GgufFile::parse(b) {
                for t in &f.tensors {
                    let _ = f.tensor_bytes(t, 68);
                }
            }
        }
    }
}
