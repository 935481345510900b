//! `sampling_parameters`: the JSON object of Triton's vLLM-backend convention, parsed and checked.

use serde_json::{Map, Value};

/// Why a `sampling_parameters` object was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ParamsError {
    /// The text is not a JSON object.
    #[error("sampling_parameters must be a JSON object: {reason}")]
    NotAnObject {
        /// What the parser said.
        reason: String,
    },
    /// A key this server does not know (or does not implement).
    #[error(
        "sampling_parameters: unknown key '{key}' (known: max_tokens, temperature, top_p, top_k, min_p, seed, stop, ignore_eos, logprobs)"
    )]
    UnknownKey {
        /// The key as sent.
        key: String,
    },
    /// A known key with a value of the wrong type or out of range.
    #[error("sampling_parameters: '{key}' {reason}")]
    BadValue {
        /// The key.
        key: String,
        /// What is expected.
        reason: String,
    },
}

/// How one request samples and when it stops. Defaults follow vLLM's `SamplingParams`
/// (temperature 1, max_tokens 16) unless the model's generation config says otherwise.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// Most tokens to generate.
    pub max_tokens: usize,
    /// Softmax temperature; 0 means greedy.
    pub temperature: f32,
    /// Nucleus sampling: keep the smallest set of most likely tokens whose probability reaches this.
    pub top_p: f32,
    /// Keep only the k most likely tokens; 0 keeps all (vLLM's -1 is accepted too).
    pub top_k: usize,
    /// Drop tokens whose probability is below `min_p` times the most likely token's.
    pub min_p: f32,
    /// Seed of the sampling randomness; `None` draws one per request.
    pub seed: Option<u64>,
    /// Strings that end generation when they appear in the output (they are not returned).
    pub stop: Vec<String>,
    /// Keep generating after the end-of-sequence token.
    pub ignore_eos: bool,
    /// Number of most likely alternatives reported per token in `logprobs` (vLLM's `logprobs`);
    /// `None`: the `logprobs` output is `null`.
    pub logprobs: Option<usize>,
    /// Session turns only: rewind the session to its first N tokens before appending this turn's
    /// input (edit, regenerate, branch). `None`: append to the whole history.
    pub truncate_to: Option<usize>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            max_tokens: 16,
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            seed: None,
            stop: Vec::new(),
            ignore_eos: false,
            logprobs: None,
            truncate_to: None,
        }
    }
}

impl SamplingParams {
    /// Parses a `sampling_parameters` JSON text over `defaults`. Numbers may be sent as JSON
    /// numbers or as numeric strings (the vLLM backend's own examples send strings); unknown keys
    /// are refused by name.
    pub fn parse(json: &str, defaults: &SamplingParams) -> Result<SamplingParams, ParamsError> {
        let value: Value =
            serde_json::from_str(json).map_err(|e| ParamsError::NotAnObject { reason: e.to_string() })?;
        let Value::Object(map) = value else {
            return Err(ParamsError::NotAnObject { reason: format!("got {}", kind(&value)) });
        };
        Self::from_map(&map, defaults)
    }

    /// Applies the keys of a parsed JSON object over `defaults`.
    pub fn from_map(map: &Map<String, Value>, defaults: &SamplingParams) -> Result<SamplingParams, ParamsError> {
        let mut p = defaults.clone();
        for (key, value) in map {
            match key.as_str() {
                "max_tokens" => {
                    p.max_tokens = uint(key, value)? as usize;
                    if p.max_tokens == 0 {
                        return Err(bad(key, "must be at least 1"));
                    }
                }
                "temperature" => p.temperature = float(key, value, 0.0, f32::MAX)?,
                "top_p" => {
                    p.top_p = float(key, value, 0.0, 1.0)?;
                    if p.top_p == 0.0 {
                        return Err(bad(key, "must be in (0, 1]"));
                    }
                }
                "top_k" => p.top_k = top_k(key, value)?,
                "min_p" => p.min_p = float(key, value, 0.0, 1.0)?,
                "seed" => p.seed = if value.is_null() { None } else { Some(uint(key, value)?) },
                "stop" => p.stop = stop(key, value)?,
                "ignore_eos" => p.ignore_eos = boolean(key, value)?,
                "logprobs" => p.logprobs = if value.is_null() { None } else { Some(uint(key, value)? as usize) },
                "truncate_to" => p.truncate_to = if value.is_null() { None } else { Some(uint(key, value)? as usize) },
                _ => return Err(ParamsError::UnknownKey { key: key.clone() }),
            }
        }
        Ok(p)
    }

    /// True when sampling is greedy (temperature 0 or top_k 1).
    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0 || self.top_k == 1
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn bad(key: &str, reason: &str) -> ParamsError {
    ParamsError::BadValue { key: key.to_owned(), reason: reason.to_owned() }
}

fn number(key: &str, v: &Value) -> Result<f64, ParamsError> {
    match v {
        Value::Number(n) => n.as_f64().ok_or_else(|| bad(key, "must be a number")),
        Value::String(s) => {
            s.trim().parse::<f64>().map_err(|_| bad(key, &format!("must be a number, got the string \"{s}\"")))
        }
        other => Err(bad(key, &format!("must be a number, got {}", kind(other)))),
    }
}

fn uint(key: &str, v: &Value) -> Result<u64, ParamsError> {
    if let Value::Number(n) = v
        && let Some(u) = n.as_u64()
    {
        return Ok(u);
    }
    let x = number(key, v)?;
    if x < 0.0 || x.fract() != 0.0 || x > u64::MAX as f64 {
        return Err(bad(key, &format!("must be a non-negative integer, got {x}")));
    }
    Ok(x as u64)
}

fn float(key: &str, v: &Value, lo: f32, hi: f32) -> Result<f32, ParamsError> {
    let x = number(key, v)? as f32;
    if !x.is_finite() || x < lo || x > hi {
        return Err(bad(key, &format!("must be in [{lo}, {hi}], got {x}")));
    }
    Ok(x)
}

fn top_k(key: &str, v: &Value) -> Result<usize, ParamsError> {
    let x = number(key, v)?;
    if x == -1.0 || x == 0.0 {
        return Ok(0);
    }
    if x < 0.0 || x.fract() != 0.0 {
        return Err(bad(key, &format!("must be a positive integer or -1 (all), got {x}")));
    }
    Ok(x as usize)
}

fn boolean(key: &str, v: &Value) -> Result<bool, ParamsError> {
    match v {
        Value::Bool(b) => Ok(*b),
        Value::String(s) if s.eq_ignore_ascii_case("true") => Ok(true),
        Value::String(s) if s.eq_ignore_ascii_case("false") => Ok(false),
        Value::Number(n) if n.as_u64() == Some(0) => Ok(false),
        Value::Number(n) if n.as_u64() == Some(1) => Ok(true),
        other => Err(bad(key, &format!("must be true or false, got {}", kind(other)))),
    }
}

fn stop(key: &str, v: &Value) -> Result<Vec<String>, ParamsError> {
    let list = match v {
        Value::Null => return Ok(Vec::new()),
        Value::String(s) => vec![s.clone()],
        Value::Array(items) => items
            .iter()
            .map(|i| match i {
                Value::String(s) => Ok(s.clone()),
                other => Err(bad(key, &format!("must hold strings, got {}", kind(other)))),
            })
            .collect::<Result<Vec<_>, _>>()?,
        other => return Err(bad(key, &format!("must be a string or a list of strings, got {}", kind(other)))),
    };
    if list.iter().any(String::is_empty) {
        return Err(bad(key, "must not contain an empty string"));
    }
    Ok(list)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<SamplingParams, ParamsError> {
        SamplingParams::parse(s, &SamplingParams::default())
    }

    #[test]
    fn parses_every_key_as_numbers_or_strings() {
        let p = parse(
            r#"{"max_tokens": 32, "temperature": "0.5", "top_p": 0.9, "top_k": "40", "min_p": 0.05,
                "seed": 7, "stop": ["\n\n", "END"], "ignore_eos": "true", "logprobs": 2}"#,
        )
        .unwrap();
        assert_eq!(p.max_tokens, 32);
        assert_eq!(p.temperature, 0.5);
        assert_eq!(p.top_p, 0.9);
        assert_eq!(p.top_k, 40);
        assert_eq!(p.min_p, 0.05);
        assert_eq!(p.seed, Some(7));
        assert_eq!(p.stop, vec!["\n\n".to_owned(), "END".to_owned()]);
        assert!(p.ignore_eos);
        assert_eq!(p.logprobs, Some(2));
    }

    #[test]
    fn defaults_apply_and_stop_may_be_one_string() {
        let d = SamplingParams { temperature: 0.0, max_tokens: 100, ..SamplingParams::default() };
        let p = SamplingParams::parse(r#"{"stop": "x", "top_k": -1}"#, &d).unwrap();
        assert_eq!(p.temperature, 0.0);
        assert_eq!(p.max_tokens, 100);
        assert_eq!(p.top_k, 0);
        assert_eq!(p.stop, vec!["x".to_owned()]);
        assert!(p.is_greedy());
    }

    #[test]
    fn unknown_key_is_named() {
        let e = parse(r#"{"temperature": 1, "best_of": 2}"#).unwrap_err();
        assert_eq!(e, ParamsError::UnknownKey { key: "best_of".into() });
        assert!(e.to_string().contains("'best_of'"));
    }

    #[test]
    fn bad_values_are_refused() {
        for (json, key) in [
            (r#"{"max_tokens": -1}"#, "max_tokens"),
            (r#"{"max_tokens": 1.5}"#, "max_tokens"),
            (r#"{"max_tokens": 0}"#, "max_tokens"),
            (r#"{"temperature": "hot"}"#, "temperature"),
            (r#"{"top_p": 0}"#, "top_p"),
            (r#"{"top_p": 1.5}"#, "top_p"),
            (r#"{"min_p": -0.1}"#, "min_p"),
            (r#"{"top_k": -2}"#, "top_k"),
            (r#"{"stop": [1]}"#, "stop"),
            (r#"{"stop": [""]}"#, "stop"),
            (r#"{"ignore_eos": "maybe"}"#, "ignore_eos"),
        ] {
            match parse(json) {
                Err(ParamsError::BadValue { key: k, .. }) => assert_eq!(k, key, "{json}"),
                other => panic!("{json}: {other:?}"),
            }
        }
        assert!(matches!(parse("[1]"), Err(ParamsError::NotAnObject { .. })));
        assert!(matches!(parse("{"), Err(ParamsError::NotAnObject { .. })));
    }
}
