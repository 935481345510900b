//! Why a `bench` run stopped: each message names what failed and what to do about it.

use std::path::PathBuf;

/// A failure of the `bench` command.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// A flag has a value the run cannot use.
    #[error("{flag}: {reason}")]
    Arg {
        /// The flag, e.g. `--concurrency`.
        flag: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// No connection could be opened to the worker.
    #[error(
        "cannot connect to the worker at {url}: {reason}; is a worker running there? \
         start one with `neuron-worker serve --grpc-addr {url}` or pass the --url HOST:PORT of a running worker"
    )]
    Connect {
        /// The address tried.
        url: String,
        /// The transport error, with its causes.
        reason: String,
    },
    /// The worker does not serve the model.
    #[error("the worker at {url} has no model '{model}'; it serves: {available}")]
    UnknownModel {
        /// The worker address.
        url: String,
        /// The model asked for.
        model: String,
        /// What RepositoryIndex lists, `name (STATE)` comma-separated.
        available: String,
    },
    /// The worker knows the model but cannot run it now.
    #[error("model '{model}' on {url} is not ready ({state}{reason}); wait for it to load or check the worker's log")]
    NotReady {
        /// The worker address.
        url: String,
        /// The model.
        model: String,
        /// Its state in the index.
        state: String,
        /// Why, when the worker says (starts with `: `).
        reason: String,
    },
    /// An RPC other than the load itself failed.
    #[error("{rpc} on {url} failed: {code}: {message}{hint}")]
    Rpc {
        /// The RPC, e.g. `ModelMetadata`.
        rpc: &'static str,
        /// The worker address.
        url: String,
        /// The gRPC status code name.
        code: &'static str,
        /// The server's message.
        message: String,
        /// What to try (starts with `; `), or empty.
        hint: String,
    },
    /// The input data file cannot be used.
    #[error("--input-data {path}: {reason}")]
    InputData {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The model's inputs cannot be generated.
    #[error("model '{model}': {reason}")]
    Inputs {
        /// The model.
        model: String,
        /// What is wrong.
        reason: String,
    },
    /// The first request, sent before any load, was refused.
    #[error("a single test request to '{model}' failed: {code}: {message}; fix that before load-testing")]
    Probe {
        /// The model.
        model: String,
        /// The gRPC status code name.
        code: &'static str,
        /// The server's message.
        message: String,
    },
    /// The latency histogram could not be set up.
    #[error("latency histogram: {0}")]
    Histogram(String),
    /// A result file could not be written.
    #[error("cannot write {path}: {reason}")]
    Output {
        /// The file.
        path: PathBuf,
        /// The OS or rendering error.
        reason: String,
    },
}

impl BenchError {
    /// Builds [`BenchError::Rpc`] from a failed status, with a hint for the common causes.
    pub fn rpc(rpc: &'static str, url: &str, status: &tonic::Status) -> BenchError {
        let hint = match status.code() {
            tonic::Code::Unauthenticated => {
                "; the worker requires a bearer token: pass --auth-token TOKEN (the value of its --auth-token)"
            }
            tonic::Code::Unavailable => "; is the worker still running? check its log",
            tonic::Code::Unimplemented => {
                "; this server does not offer that RPC: is --url pointing at a KServe v2 / Triton gRPC endpoint?"
            }
            _ => "",
        };
        BenchError::Rpc {
            rpc,
            url: url.to_string(),
            code: code_name(status.code()),
            message: status.message().to_string(),
            hint: hint.to_string(),
        }
    }
}

/// The canonical upper-case gRPC name of a status code (`UNAVAILABLE`, `RESOURCE_EXHAUSTED`, ...).
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

/// An error and its causes, joined with `: ` (transport errors hide the useful part in the chain).
pub fn with_causes(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        let s = e.to_string();
        if !out.contains(&s) {
            out.push_str(": ");
            out.push_str(&s);
        }
        cur = e.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_names_are_canonical() {
        assert_eq!(code_name(tonic::Code::ResourceExhausted), "RESOURCE_EXHAUSTED");
        assert_eq!(code_name(tonic::Code::Unavailable), "UNAVAILABLE");
    }

    #[test]
    fn unauthenticated_suggests_the_token_flag() {
        let e = BenchError::rpc("ModelMetadata", "h:1", &tonic::Status::unauthenticated("missing"));
        let s = e.to_string();
        assert!(s.starts_with("ModelMetadata on h:1 failed: UNAUTHENTICATED: missing; "), "{s}");
        assert!(s.contains("--auth-token"), "{s}");
    }

    #[test]
    fn connect_error_suggests_serve() {
        let e = BenchError::Connect { url: "127.0.0.1:9".into(), reason: "Connection refused".into() };
        assert!(e.to_string().contains("neuron-worker serve --grpc-addr 127.0.0.1:9"));
    }
}
