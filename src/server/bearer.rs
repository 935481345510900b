//! The `Authorization` header's bearer token, read the same way by the gRPC and HTTP fronts: the
//! scheme name is case-insensitive (RFC 7235), the token is compared in constant time.

/// What an `Authorization` value says about the token.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Presented<'a> {
    /// No `Authorization` header (or not text).
    Missing,
    /// A header with another scheme than Bearer (named).
    OtherScheme(&'a str),
    /// A bearer token.
    Token(&'a str),
}

/// Reads an `Authorization` header value.
pub(crate) fn presented(header: Option<&str>) -> Presented<'_> {
    let Some(value) = header else { return Presented::Missing };
    let value = value.trim();
    let (scheme, rest) = value.split_once([' ', '\t']).unwrap_or((value, ""));
    if scheme.eq_ignore_ascii_case("bearer") {
        Presented::Token(rest.trim_start())
    } else {
        Presented::OtherScheme(scheme)
    }
}

/// Why a request is refused, or `None` when it carries `expected`.
pub(crate) fn refusal(header: Option<&str>, expected: &str) -> Option<String> {
    match presented(header) {
        Presented::Token(t) if constant_time_eq::constant_time_eq(t.as_bytes(), expected.as_bytes()) => None,
        Presented::Token(_) => Some("invalid bearer token".into()),
        Presented::OtherScheme(s) => {
            Some(format!("authorization scheme '{s}' is not accepted; send 'authorization: Bearer <token>'"))
        }
        Presented::Missing => Some("missing 'authorization: Bearer <token>'; this worker requires a token".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_scheme_is_case_insensitive_and_other_schemes_are_named() {
        for h in ["Bearer t0k", "bearer t0k", "BEARER   t0k", " Bearer t0k "] {
            assert_eq!(refusal(Some(h), "t0k"), None, "{h}");
        }
        assert_eq!(refusal(Some("Bearer nope"), "t0k").as_deref(), Some("invalid bearer token"));
        assert!(refusal(Some("Basic dXNlcg=="), "t0k").is_some_and(|m| m.contains("scheme 'Basic'")));
        assert!(refusal(None, "t0k").is_some_and(|m| m.starts_with("missing")));
        assert_eq!(refusal(Some("Bearer"), "t0k").as_deref(), Some("invalid bearer token"));
    }
}
