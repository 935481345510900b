//! The session blob: one session's model, version, sequence id, step count and state tensors in a
//! versioned binary format with a CRC-32, used by ExportSession/ImportSession and as the value the
//! session store keeps.
//!
//! ```text
//! magic "NWSESS\0\x01" (8 bytes) | format u16 = 1
//! model: u32 length + UTF-8 | version: i64
//! sequence id: u8 tag (0 = uint64, 1 = string) + u64 | u32 length + UTF-8
//! steps: u64 | state count: u32
//! per state: dtype u32 (Triton's config code) | rank u32 | dims u64… | u64 byte length + bytes
//! CRC-32 (IEEE) of every byte before it: u32
//! ```
//! All integers little-endian.

use super::SequenceId;
use crate::tensor::{DataType, Tensor};

const MAGIC: &[u8; 8] = b"NWSESS\0\x01";
/// The blob format this worker writes and reads.
pub const FORMAT_VERSION: u16 = 1;
const MAX_STATES: u32 = 1024;
const MAX_RANK: u32 = 16;

/// One session, as it travels between workers or to the store.
#[derive(Debug, Clone, PartialEq)]
pub struct SessionBlob {
    /// Model name.
    pub model: String,
    /// Model version.
    pub version: i64,
    /// The sequence id.
    pub id: SequenceId,
    /// Requests executed since START.
    pub steps: u64,
    /// The implicit state tensors, in configuration order.
    pub state: Vec<Tensor>,
}

impl SessionBlob {
    /// Encodes the blob (with its checksum).
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(64 + self.state.iter().map(|t| t.data.len() + 16).sum::<usize>());
        b.extend_from_slice(MAGIC);
        b.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        put_str(&mut b, &self.model);
        b.extend_from_slice(&self.version.to_le_bytes());
        match &self.id {
            SequenceId::Uint(v) => {
                b.push(0);
                b.extend_from_slice(&v.to_le_bytes());
            }
            SequenceId::Str(s) => {
                b.push(1);
                put_str(&mut b, s);
            }
        }
        b.extend_from_slice(&self.steps.to_le_bytes());
        b.extend_from_slice(&(self.state.len() as u32).to_le_bytes());
        for t in &self.state {
            b.extend_from_slice(&(t.dtype.config_code() as u32).to_le_bytes());
            b.extend_from_slice(&(t.shape.len() as u32).to_le_bytes());
            for d in &t.shape {
                b.extend_from_slice(&(*d as u64).to_le_bytes());
            }
            b.extend_from_slice(&(t.data.len() as u64).to_le_bytes());
            b.extend_from_slice(&t.data);
        }
        let crc = crc32fast::hash(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        b
    }

    /// Decodes and verifies a blob. The error says what is wrong (never panics on any input).
    pub fn decode(bytes: &[u8]) -> Result<SessionBlob, String> {
        if bytes.len() < MAGIC.len() + 2 + 4 || &bytes[..MAGIC.len()] != MAGIC {
            return Err("not a session blob (bad magic)".into());
        }
        let (body, crc) = bytes.split_at(bytes.len() - 4);
        let want = u32::from_le_bytes([crc[0], crc[1], crc[2], crc[3]]);
        if crc32fast::hash(body) != want {
            return Err("checksum mismatch: the blob is corrupt or truncated".into());
        }
        let mut r = Reader { buf: body, pos: MAGIC.len() };
        let format = u16::from_le_bytes([r.byte()?, r.byte()?]);
        if format != FORMAT_VERSION {
            return Err(format!("blob format {format} is not supported (this worker reads format {FORMAT_VERSION})"));
        }
        let model = r.string()?;
        let version = r.u64()? as i64;
        let id = match r.byte()? {
            0 => SequenceId::Uint(r.u64()?),
            1 => SequenceId::Str(r.string()?),
            t => return Err(format!("unknown sequence id tag {t}")),
        };
        let steps = r.u64()?;
        let n = r.u32()?;
        if n > MAX_STATES {
            return Err(format!("{n} state tensors is more than a session can hold"));
        }
        let mut state = Vec::with_capacity(n as usize);
        for i in 0..n {
            let code = r.u32()?;
            let dtype = i32::try_from(code)
                .ok()
                .and_then(DataType::from_config_code)
                .ok_or_else(|| format!("state {i}: unknown datatype code {code}"))?;
            let rank = r.u32()?;
            if rank > MAX_RANK {
                return Err(format!("state {i}: rank {rank} is too large"));
            }
            let shape = (0..rank).map(|_| r.u64().map(|d| d as usize)).collect::<Result<Vec<_>, _>>()?;
            let len = usize::try_from(r.u64()?).map_err(|_| format!("state {i}: length too large"))?;
            let data = r.take(len)?.to_vec();
            let want = shape.iter().try_fold(dtype.size().unwrap_or(0), |a, d| a.checked_mul(*d));
            if want != Some(len) {
                return Err(format!("state {i}: {len} bytes do not match shape {shape:?} of {dtype}"));
            }
            state.push(Tensor { dtype, shape, data });
        }
        if r.pos != body.len() {
            return Err("trailing bytes after the last state tensor".into());
        }
        Ok(SessionBlob { model, version, id, steps, state })
    }
}

fn put_str(b: &mut Vec<u8>, s: &str) {
    b.extend_from_slice(&(s.len() as u32).to_le_bytes());
    b.extend_from_slice(s.as_bytes());
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self.pos.checked_add(n).filter(|e| *e <= self.buf.len()).ok_or("truncated blob")?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn byte(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, String> {
        let s = self.take(4)?;
        Ok(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
    }
    fn u64(&mut self) -> Result<u64, String> {
        let s = self.take(8)?;
        Ok(u64::from_le_bytes([s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7]]))
    }
    fn string(&mut self) -> Result<String, String> {
        let n = self.u32()? as usize;
        String::from_utf8(self.take(n)?.to_vec()).map_err(|_| "a name is not UTF-8".to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> SessionBlob {
        SessionBlob {
            model: "gru".into(),
            version: 1,
            id: SequenceId::Str("user-7".into()),
            steps: 42,
            state: vec![Tensor::from_f32(vec![3], &[1.0, -2.5, 0.25])],
        }
    }

    #[test]
    fn round_trips_and_detects_every_single_byte_flip() {
        let b = sample().encode();
        assert_eq!(SessionBlob::decode(&b), Ok(sample()));
        for i in 0..b.len() {
            let mut c = b.clone();
            c[i] ^= 0x40;
            assert!(SessionBlob::decode(&c).is_err(), "flip at {i} accepted");
        }
        for n in 0..b.len() {
            assert!(SessionBlob::decode(&b[..n]).is_err());
        }
        let u = SessionBlob { id: SequenceId::Uint(9), ..sample() };
        assert_eq!(SessionBlob::decode(&u.encode()).map(|b| b.id), Ok(SequenceId::Uint(9)));
    }
}
