//! Request bodies: read up to the size limit (413 beyond it), undo `Content-Encoding: gzip|deflate`,
//! and split Triton's binary-data bodies into the JSON header and the binary tail
//! (`Inference-Header-Content-Length`).

use std::io::Read;

use axum::body::Body;
use axum::http::{HeaderMap, StatusCode, header};
use bytes::Bytes;
use http_body_util::BodyExt;

use super::error::HttpError;

/// The header naming the length of the JSON part of a binary-data body (request and response).
pub const HEADER_LENGTH: &str = "inference-header-content-length";

fn too_large(limit: usize) -> HttpError {
    HttpError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!("request body exceeds the limit of {limit} bytes; send a smaller request or raise --max-message-size"),
    )
}

/// The whole body, decompressed, at most `limit` bytes.
pub async fn read(headers: &HeaderMap, body: Body, limit: usize) -> Result<Bytes, HttpError> {
    if let Some(len) = headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<usize>().ok())
        && len > limit
    {
        return Err(too_large(limit));
    }
    let collected = http_body_util::Limited::new(body, limit).collect().await.map_err(|e| {
        if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() {
            too_large(limit)
        } else {
            HttpError::bad_request(format!("cannot read the request body: {e}"))
        }
    })?;
    let raw = collected.to_bytes();
    let encoding = headers.get(header::CONTENT_ENCODING).and_then(|v| v.to_str().ok()).unwrap_or("identity");
    let mut out = Vec::new();
    let read = match encoding.trim().to_ascii_lowercase().as_str() {
        "identity" | "" => return Ok(raw),
        "gzip" => flate2::read::GzDecoder::new(raw.as_ref()).take(limit as u64 + 1).read_to_end(&mut out),
        "deflate" => flate2::read::ZlibDecoder::new(raw.as_ref()).take(limit as u64 + 1).read_to_end(&mut out),
        other => {
            return Err(HttpError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                format!("Content-Encoding '{other}' is not supported; use gzip, deflate or none"),
            ));
        }
    };
    read.map_err(|e| HttpError::bad_request(format!("cannot decompress the {encoding} request body: {e}")))?;
    if out.len() > limit {
        return Err(too_large(limit));
    }
    Ok(Bytes::from(out))
}

/// Splits a body into (JSON header, binary tail) by `Inference-Header-Content-Length` (whole body is
/// JSON when the header is absent).
pub fn split(headers: &HeaderMap, body: Bytes) -> Result<(Bytes, Bytes), HttpError> {
    let Some(v) = headers.get(HEADER_LENGTH) else { return Ok((body, Bytes::new())) };
    let len = v.to_str().ok().and_then(|s| s.trim().parse::<usize>().ok()).ok_or_else(|| {
        HttpError::bad_request("Inference-Header-Content-Length must be the byte length of the JSON header")
    })?;
    if len > body.len() {
        return Err(HttpError::bad_request(format!(
            "Inference-Header-Content-Length is {len} but the body has only {} bytes",
            body.len()
        )));
    }
    let tail = body.slice(len..);
    Ok((body.slice(..len), tail))
}

/// Parses JSON, naming the problem (line, column, what was expected) on failure.
pub fn json<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, HttpError> {
    serde_json::from_slice(bytes).map_err(|e| HttpError::bad_request(format!("malformed JSON request: {e}")))
}
