//! Why a NEFF file could not be read or written.

use crate::header::HEADER_LEN;

/// Why a NEFF file could not be read (or, for [`NeffError::InvalidBuild`], written). Every
/// variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum NeffError {
    /// The file could not be read from disk.
    #[error("{file}: cannot read: {source}")]
    Io {
        /// The file.
        file: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is shorter than the 1024-byte header.
    #[error("{file}: truncated header: {len} bytes, a NEFF header is {HEADER_LEN}")]
    TruncatedHeader {
        /// The file.
        file: String,
        /// The file's length in bytes.
        len: u64,
    },
    /// A header field is impossible (e.g. `header_size` below 1024).
    #[error("{file}: bad header: {reason}")]
    BadHeader {
        /// The file.
        file: String,
        /// What is wrong.
        reason: String,
    },
    /// The file is shorter than `header_size + data_size` says.
    #[error("{file}: truncated payload: header says {expected} bytes in all, file has {actual}")]
    TruncatedPayload {
        /// The file.
        file: String,
        /// `header_size + data_size` (saturating).
        expected: u64,
        /// The file's length in bytes.
        actual: u64,
    },
    /// The payload is not a valid gzip stream.
    #[error("{file}: bad gzip payload: {reason}")]
    BadGzip {
        /// The file.
        file: String,
        /// What the decompressor said.
        reason: String,
    },
    /// The decompressed payload is not a valid tar archive.
    #[error("{file}: bad tar archive in payload: {reason}")]
    BadTar {
        /// The file.
        file: String,
        /// What the tar reader said.
        reason: String,
    },
    /// An archive entry the reader needs is larger than it will hold in memory.
    #[error("{file}: archive entry '{entry}' is {size} bytes, more than the {limit}-byte limit")]
    EntryTooLarge {
        /// The file.
        file: String,
        /// The entry's path in the archive.
        entry: String,
        /// Its declared size.
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// The archive holds no `neff.json`.
    #[error("{file}: the archive holds no neff.json (not a NEFF, or a damaged one)")]
    MissingNeffJson {
        /// The file.
        file: String,
    },
    /// An archive entry is not valid JSON.
    #[error("{file}: {entry} is not valid JSON: {source}")]
    BadJson {
        /// The file.
        file: String,
        /// The entry's path in the archive.
        entry: String,
        /// The parser's error.
        source: serde_json::Error,
    },
    /// JSON is valid but does not have the expected structure.
    #[error("{file}: {entry}: {reason}")]
    BadMetadata {
        /// The file.
        file: String,
        /// The entry's path in the archive.
        entry: String,
        /// What is wrong.
        reason: String,
    },
    /// A NEFF writer was given an inconsistent description.
    #[error("cannot build NEFF '{name}': {reason}")]
    InvalidBuild {
        /// The NEFF's name.
        name: String,
        /// What is inconsistent.
        reason: String,
    },
}

/// Result of NEFF operations.
pub type Result<T, E = NeffError> = std::result::Result<T, E>;
