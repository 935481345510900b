//! A generation request's session: Triton's `sequence_id` / `sequence_start` / `sequence_end`
//! parameters, or the `x-session-id` header (which a gateway can route on without parsing the
//! body, and which starts a session on first use because OpenAI-style clients cannot send START).

use super::decode::sequence_param;
use super::error::ServerError;
use crate::batching::SequenceControl;
use crate::batching::generative::request::SessionTurn;
use crate::proto::inference::infer_parameter::ParameterChoice;
use crate::proto::inference::{InferParameter, ModelInferRequest};
use crate::sessions::SequenceId;

/// The header naming a session (HTTP and gRPC metadata).
pub const SESSION_HEADER: &str = "x-session-id";

/// The request parameter the fronts carry the header's value in, to the one decode path.
const HEADER_PARAM: &str = "x-session-id";

/// Copies an `x-session-id` header value into `req` (the fronts call this; decode reads it back).
pub fn apply_session_header(req: &mut ModelInferRequest, value: &str) {
    req.parameters.insert(
        HEADER_PARAM.to_string(),
        InferParameter { parameter_choice: Some(ParameterChoice::StringParam(value.to_string())) },
    );
}

/// Whether a request parameter belongs to the session (so sampling-parameter parsing skips it).
pub fn is_session_param(name: &str) -> bool {
    matches!(name, "sequence_id" | "sequence_start" | "sequence_end" | HEADER_PARAM)
}

/// The session turn `params` describe: `None` for a stateless request. A header id and a
/// `sequence_id` that differ are refused; a header id starts its session on first use.
pub fn session_turn<'a>(
    params: impl IntoIterator<Item = (&'a String, &'a InferParameter)>,
) -> Result<Option<SessionTurn>, ServerError> {
    let mut control = SequenceControl::default();
    let mut header: Option<SequenceId> = None;
    for (k, v) in params {
        if k == HEADER_PARAM {
            let Some(ParameterChoice::StringParam(s)) = &v.parameter_choice else {
                return Err(ServerError::InvalidRequest(format!("{SESSION_HEADER} must be a string")));
            };
            let id = SequenceId::Str(s.clone());
            id.check().map_err(|reason| ServerError::InvalidRequest(format!("header {SESSION_HEADER}: {reason}")))?;
            header = Some(id);
        } else if is_session_param(k) {
            sequence_param(&mut control, k, v)?;
        }
    }
    let id = match (control.id.take(), header.clone()) {
        (Some(a), Some(b)) if a != b => {
            return Err(ServerError::InvalidRequest(format!(
                "the {SESSION_HEADER} header ({b}) and the sequence_id parameter ({a}) name different sessions; \
                 send one, or the same id in both"
            )));
        }
        (Some(id), _) | (None, Some(id)) => id,
        (None, None) if control.start || control.end => {
            return Err(ServerError::InvalidRequest(
                "sequence_start / sequence_end need a non-zero sequence_id (or an x-session-id header)".into(),
            ));
        }
        (None, None) => return Ok(None),
    };
    Ok(Some(SessionTurn { id, start: control.start, end: control.end, implicit_start: header.is_some() }))
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn p(c: ParameterChoice) -> InferParameter {
        InferParameter { parameter_choice: Some(c) }
    }

    #[test]
    fn reads_triton_parameters_and_the_header() {
        let mut m = HashMap::new();
        assert_eq!(session_turn(&m).ok().flatten(), None);
        m.insert("sequence_id".to_string(), p(ParameterChoice::Uint64Param(7)));
        m.insert("sequence_start".to_string(), p(ParameterChoice::BoolParam(true)));
        let t = session_turn(&m).ok().flatten();
        assert_eq!(t, Some(SessionTurn { id: SequenceId::Uint(7), start: true, end: false, implicit_start: false }));
        m.insert(HEADER_PARAM.to_string(), p(ParameterChoice::StringParam("abc".into())));
        assert!(session_turn(&m).is_err(), "differing ids are refused");
        let mut h = HashMap::new();
        h.insert(HEADER_PARAM.to_string(), p(ParameterChoice::StringParam("abc".into())));
        let t = session_turn(&h).ok().flatten();
        assert_eq!(
            t,
            Some(SessionTurn { id: SequenceId::Str("abc".into()), start: false, end: false, implicit_start: true })
        );
        h.insert(HEADER_PARAM.to_string(), p(ParameterChoice::StringParam(String::new())));
        assert!(session_turn(&h).is_err(), "an empty header id is refused");
    }
}
