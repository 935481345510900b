//! The NEFF file format (Neuron Executable File Format), in one place for the worker and the
//! test-only stand-in libnrt: the 1024-byte header ([`header`]), the gzip'd tar archive and the
//! tensors it declares ([`archive`]), the stand-in program format ([`program`], its decoder op in
//! [`decoder`]) and, with the
//! `writer` feature, a writer for tests (`writer`).
//!
//! A NEFF is a 1024-byte little-endian header followed by a gzip'd tar archive holding
//! `neff.json` (signatures) and `sgNN/def.json` (subgraph variables). NEFFs written for the
//! stand-in also carry `standin/program.json` and weight blobs; real hardware cannot run those
//! files, and the stand-in cannot run compiler output.

pub mod archive;
pub mod decoder;
pub mod error;
pub mod header;
pub mod program;
pub mod tensor;
#[cfg(feature = "writer")]
pub mod writer;

use std::collections::BTreeMap;
use std::path::Path;

pub use error::{NeffError, Result};
pub use header::{HEADER_LEN, NeffHeader};
pub use tensor::{NeffTensor, element_count, element_size, shape_bytes};

/// Everything the reader learns from a NEFF file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NeffInfo {
    /// The decoded header.
    pub header: NeffHeader,
    /// Input tensors, in signature (`id`) order.
    pub inputs: Vec<NeffTensor>,
    /// Output tensors, in signature order, then subgraph definition order.
    pub outputs: Vec<NeffTensor>,
}

/// Reads and parses the NEFF file at `path`.
pub fn read_neff(path: impl AsRef<Path>) -> Result<NeffInfo> {
    let path = path.as_ref();
    let file = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|source| NeffError::Io { file: file.clone(), source })?;
    parse_neff(&bytes, &file)
}

/// Parses a NEFF held in memory; `name_for_errors` names it in errors.
pub fn parse_neff(bytes: &[u8], name_for_errors: &str) -> Result<NeffInfo> {
    parse_neff_keeping(bytes, name_for_errors, |_| false).map(|(info, _)| info)
}

/// Parses a NEFF held in memory and also returns the archive entries `keep` accepts (paths
/// without a leading `./`), e.g. the stand-in's `standin/...` files.
pub fn parse_neff_keeping(
    bytes: &[u8],
    name_for_errors: &str,
    keep: impl Fn(&str) -> bool,
) -> Result<(NeffInfo, BTreeMap<String, Vec<u8>>)> {
    let file = name_for_errors;
    let header_bytes: &[u8; HEADER_LEN] = bytes
        .get(..HEADER_LEN)
        .and_then(|head| head.try_into().ok())
        .ok_or(NeffError::TruncatedHeader { file: file.to_string(), len: bytes.len() as u64 })?;
    let header = NeffHeader::decode(header_bytes);
    if header.header_size < HEADER_LEN as u64 {
        return Err(NeffError::BadHeader {
            file: file.to_string(),
            reason: format!("header_size {} is below {HEADER_LEN}", header.header_size),
        });
    }
    let expected = header.header_size.saturating_add(header.data_size);
    let actual = bytes.len() as u64;
    let payload = usize::try_from(header.header_size)
        .ok()
        .zip(usize::try_from(expected).ok())
        .filter(|_| expected <= actual)
        .and_then(|(start, end)| bytes.get(start..end))
        .ok_or(NeffError::TruncatedPayload { file: file.to_string(), expected, actual })?;
    let contents = archive::read_archive(payload, file, keep)?;
    Ok((NeffInfo { header, inputs: contents.inputs, outputs: contents.outputs }, contents.files))
}
