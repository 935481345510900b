//! The GGUF/GGML block formats a [`QMatrix`](super::QMatrix) can hold, their byte layout, and
//! reference (de)quantization of one block.

use half::f16;

/// Elements per quantization block (all formats here except F16, which has no blocks).
pub const QK: usize = 32;

/// A weight storage format, named as in GGUF.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QFormat {
    /// IEEE half precision, one value per element.
    F16,
    /// Blocks of 32: an f16 scale `d` and 32 signed bytes; `x = d·q`.
    Q8_0,
    /// Blocks of 32: an f16 scale `d` and 32 nibbles; `x = d·(q − 8)`.
    Q4_0,
    /// Blocks of 32: f16 scale `d` and minimum `m`, 32 nibbles; `x = d·q + m`.
    Q4_1,
}

impl QFormat {
    /// The GGML type id used in GGUF tensor infos.
    pub fn ggml_type(self) -> u32 {
        match self {
            QFormat::F16 => 1,
            QFormat::Q4_0 => 2,
            QFormat::Q4_1 => 3,
            QFormat::Q8_0 => 8,
        }
    }

    /// The format with GGML type id `id`, if this module supports it.
    pub fn from_ggml_type(id: u32) -> Option<QFormat> {
        match id {
            1 => Some(QFormat::F16),
            2 => Some(QFormat::Q4_0),
            3 => Some(QFormat::Q4_1),
            8 => Some(QFormat::Q8_0),
            _ => None,
        }
    }

    /// Elements per block (1 for F16).
    pub fn block_elems(self) -> usize {
        match self {
            QFormat::F16 => 1,
            _ => QK,
        }
    }

    /// Bytes per block in the GGUF file.
    pub fn block_bytes(self) -> usize {
        match self {
            QFormat::F16 => 2,
            QFormat::Q8_0 => 2 + QK,
            QFormat::Q4_0 => 2 + QK / 2,
            QFormat::Q4_1 => 4 + QK / 2,
        }
    }

    /// Bytes of quantized values per block (the part stored apart from the scales).
    pub(crate) fn qs_bytes(self) -> usize {
        match self {
            QFormat::F16 => 2,
            QFormat::Q8_0 => QK,
            QFormat::Q4_0 | QFormat::Q4_1 => QK / 2,
        }
    }

    /// Bytes of a `[n, k]` tensor in this format, or `None` when k is not whole blocks or the size
    /// overflows.
    pub fn tensor_bytes(self, n: usize, k: usize) -> Option<usize> {
        if !k.is_multiple_of(self.block_elems()) {
            return None;
        }
        n.checked_mul(k / self.block_elems())?.checked_mul(self.block_bytes())
    }
}

/// Dequantizes one GGUF block of `format` (`bytes.len() == format.block_bytes()`) into `out`
/// (`format.block_elems()` values), with the arithmetic of gguf-py's `dequantize_blocks`.
pub fn dequantize_block(format: QFormat, bytes: &[u8], out: &mut [f32]) {
    let h = |i: usize| f16::from_le_bytes([bytes[i], bytes[i + 1]]).to_f32();
    match format {
        QFormat::F16 => out[0] = h(0),
        QFormat::Q8_0 => {
            let d = h(0);
            for (o, &q) in out.iter_mut().zip(&bytes[2..2 + QK]) {
                *o = (q as i8) as f32 * d;
            }
        }
        QFormat::Q4_0 => {
            let d = h(0);
            for (j, &q) in bytes[2..2 + QK / 2].iter().enumerate() {
                out[j] = d * ((q & 0x0F) as i32 - 8) as f32;
                out[j + QK / 2] = d * ((q >> 4) as i32 - 8) as f32;
            }
        }
        QFormat::Q4_1 => {
            let (d, m) = (h(0), h(2));
            for (j, &q) in bytes[4..4 + QK / 2].iter().enumerate() {
                out[j] = d * (q & 0x0F) as f32 + m;
                out[j + QK / 2] = d * (q >> 4) as f32 + m;
            }
        }
    }
}

/// Quantizes one block of `format.block_elems()` values to GGUF bytes, as llama.cpp's reference
/// quantizers do (Q8_0 rounds half away from zero; Q4_0/Q4_1 truncate after adding 0.5).
pub fn quantize_block(format: QFormat, x: &[f32], out: &mut Vec<u8>) {
    let push_h = |out: &mut Vec<u8>, v: f32| out.extend_from_slice(&f16::from_f32(v).to_le_bytes());
    match format {
        QFormat::F16 => push_h(out, x[0]),
        QFormat::Q8_0 => {
            let amax = x.iter().fold(0.0f32, |a, v| a.max(v.abs()));
            let d = amax / 127.0;
            let id = if d == 0.0 { 0.0 } else { 1.0 / d };
            push_h(out, d);
            out.extend(x.iter().map(|v| ((v * id).round() as i8) as u8));
        }
        QFormat::Q4_0 => {
            let max = x.iter().fold(0.0f32, |a, &v| if v.abs() > a.abs() { v } else { a });
            let d = max / -8.0;
            let id = if d == 0.0 { 0.0 } else { 1.0 / d };
            push_h(out, d);
            let q = |v: f32| ((v * id + 8.5) as i32).clamp(0, 15) as u8;
            out.extend((0..QK / 2).map(|j| q(x[j]) | (q(x[j + QK / 2]) << 4)));
        }
        QFormat::Q4_1 => {
            let min = x.iter().copied().fold(f32::INFINITY, f32::min);
            let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let d = (max - min) / 15.0;
            let id = if d == 0.0 { 0.0 } else { 1.0 / d };
            push_h(out, d);
            push_h(out, min);
            let q = |v: f32| (((v - min) * id + 0.5) as i32).clamp(0, 15) as u8;
            out.extend((0..QK / 2).map(|j| q(x[j]) | (q(x[j + QK / 2]) << 4)));
        }
    }
}

/// Format code of Q8_0 for the const-generic SIMD kernels.
pub(crate) const FQ8_0: u8 = 0;
/// Format code of Q4_0 (nibbles stored +8).
pub(crate) const FQ4_0: u8 = 1;
/// Format code of Q4_1 (nibbles with a minimum).
pub(crate) const FQ4_1: u8 = 2;
