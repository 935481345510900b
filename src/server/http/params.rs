//! Request and response parameters: JSON values ↔ the core's `InferParameter` (bool, integer,
//! double, string), as Triton's HTTP front reads them.

use serde_json::{Map, Value};

use super::error::HttpError;
use crate::proto::inference::InferParameter;
use crate::proto::inference::infer_parameter::ParameterChoice;

/// One JSON parameter value as the core's parameter (integers that fit i64 stay signed).
pub fn to_param(key: &str, v: &Value) -> Result<InferParameter, HttpError> {
    let choice = match v {
        Value::Bool(b) => ParameterChoice::BoolParam(*b),
        Value::String(s) => ParameterChoice::StringParam(s.clone()),
        Value::Number(n) => match (n.as_i64(), n.as_u64(), n.as_f64()) {
            (Some(i), _, _) => ParameterChoice::Int64Param(i),
            (None, Some(u), _) => ParameterChoice::Uint64Param(u),
            (None, None, Some(f)) => ParameterChoice::DoubleParam(f),
            _ => return Err(HttpError::bad_request(format!("parameter '{key}': {n} is not a representable number"))),
        },
        other => {
            return Err(HttpError::bad_request(format!(
                "parameter '{key}' must be a bool, number or string, got {other}"
            )));
        }
    };
    Ok(InferParameter { parameter_choice: Some(choice) })
}

/// The parameters of `map` except `skip`, as the core's parameters.
pub fn to_params(
    map: &Map<String, Value>,
    skip: &[&str],
) -> Result<std::collections::HashMap<String, InferParameter>, HttpError> {
    map.iter().filter(|(k, _)| !skip.contains(&k.as_str())).map(|(k, v)| Ok((k.clone(), to_param(k, v)?))).collect()
}

/// A core parameter as JSON.
pub fn to_json(p: &InferParameter) -> Value {
    match &p.parameter_choice {
        Some(ParameterChoice::BoolParam(b)) => Value::Bool(*b),
        Some(ParameterChoice::Int64Param(i)) => Value::from(*i),
        Some(ParameterChoice::Uint64Param(u)) => Value::from(*u),
        Some(ParameterChoice::DoubleParam(f)) => Value::from(*f),
        Some(ParameterChoice::StringParam(s)) => Value::String(s.clone()),
        None => Value::Null,
    }
}

/// Reads a boolean front-only parameter (`binary_data`, `binary_data_output`).
pub fn flag(map: &Map<String, Value>, key: &str) -> Result<Option<bool>, HttpError> {
    match map.get(key) {
        None => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(other) => Err(HttpError::bad_request(format!("parameter '{key}' must be true or false, got {other}"))),
    }
}
