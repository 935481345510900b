//! Pages of ListSessions: sessions ordered by (model, version, sequence id); a page token names
//! the last session of the previous page, so a page starts after it even when sessions come and go
//! between calls.

use super::error::ServerError;
use crate::sessions::{SequenceId, SessionInfo};

/// The most sessions one page holds (and the size of a page when the request names none).
pub(super) const MAX_PAGE: usize = 1000;

/// Where a page starts: after this (model, version, id).
pub(super) type Key = (String, i64, SequenceId);

/// The page size a request asks for, bounded.
pub(super) fn size(asked: u32) -> usize {
    match asked as usize {
        0 => MAX_PAGE,
        n => n.min(MAX_PAGE),
    }
}

fn key(s: &SessionInfo) -> Key {
    (s.model.clone(), s.version, s.id.clone())
}

/// The token naming `k`.
fn encode_token(k: &Key) -> String {
    let id = match &k.2 {
        SequenceId::Uint(v) => format!("u{v}"),
        SequenceId::Str(s) => format!("s{s}"),
    };
    format!("{}\u{1f}{}\u{1f}{id}", k.0, k.1)
}

/// The session a token names; `None` for the empty token (the first page).
pub(super) fn decode_token(token: &str) -> Result<Option<Key>, ServerError> {
    if token.is_empty() {
        return Ok(None);
    }
    let bad =
        || ServerError::InvalidRequest("page_token is not one this worker returned; start again without it".into());
    let mut parts = token.splitn(3, '\u{1f}');
    let (Some(model), Some(version), Some(id)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(bad());
    };
    let version: i64 = version.parse().map_err(|_| bad())?;
    let id = match (id.get(..1), id.get(1..)) {
        (Some("u"), Some(v)) => SequenceId::Uint(v.parse().map_err(|_| bad())?),
        (Some("s"), Some(s)) => SequenceId::Str(s.to_string()),
        _ => return Err(bad()),
    };
    Ok(Some((model.to_string(), version, id)))
}

/// The page of `all` after `after`, at most `size` long, and the token of the next page (empty
/// when this is the last).
pub(super) fn select(mut all: Vec<SessionInfo>, after: Option<&Key>, size: usize) -> (Vec<SessionInfo>, String) {
    all.sort_by_key(key);
    let start = after.map_or(0, |a| all.partition_point(|s| key(s) <= *a));
    let rest = all.split_off(start.min(all.len()));
    let more = rest.len() > size;
    let page: Vec<SessionInfo> = rest.into_iter().take(size).collect();
    let next = match page.last() {
        Some(last) if more => encode_token(&key(last)),
        _ => String::new(),
    };
    (page, next)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(model: &str, id: SequenceId) -> SessionInfo {
        SessionInfo { model: model.into(), version: 1, id, steps: 1, live: true, idle: Default::default() }
    }

    #[test]
    fn pages_cover_every_session_once_in_order() {
        let mut all = vec![info("b", SequenceId::Uint(1))];
        all.extend((1..=5).map(|i| info("a", SequenceId::Uint(i))));
        all.push(info("a", SequenceId::Str("x\u{1f}y".into())));
        let (mut seen, mut token) = (Vec::new(), None);
        loop {
            let (page, next) = select(all.clone(), token.as_ref(), 3);
            assert!(page.len() <= 3);
            seen.extend(page.iter().map(|s| (s.model.clone(), s.id.clone())));
            if next.is_empty() {
                break;
            }
            token = decode_token(&next).unwrap_or_else(|e| panic!("{e}"));
        }
        let mut want: Vec<(String, SequenceId)> = all.iter().map(|s| (s.model.clone(), s.id.clone())).collect();
        want.sort();
        assert_eq!(seen, want);
        assert!(decode_token("garbage").is_err());
        assert_eq!(size(0), MAX_PAGE);
        assert_eq!(size(5000), MAX_PAGE);
    }
}
