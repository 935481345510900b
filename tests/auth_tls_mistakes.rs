//! Auth and TLS set up wrong: an empty token is refused at start (flag and variable), the Bearer
//! scheme is case-insensitive on both fronts, and every TLS file mistake names the file and the
//! cause instead of "transport error".
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)] // test code may panic on setup failures

mod common;

use std::path::PathBuf;

use common::*;
use neuron_worker::proto::inference::ServerLiveRequest;
use neuron_worker::proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use neuron_worker::repository::{BackendSelection, ModelControlMode, Repository};
use tonic::Code;
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;

async fn start_err(opts: neuron_worker::server::ServeOptions) -> String {
    let repo = std::sync::Arc::new(Repository::new(None, BackendSelection::Cpu, ModelControlMode::None));
    match neuron_worker::server::start(opts, repo).await {
        Ok(_) => panic!("the server started"),
        Err(e) => e.to_string(),
    }
}

#[tokio::test]
async fn an_empty_token_is_refused_at_start() {
    let mut opts = options();
    opts.auth_token = Some(String::new());
    let e = start_err(opts).await;
    assert!(e.contains("--auth-token") && e.contains("empty"), "{e}");
    // The binary: the flag, and the variable.
    for (args, env) in [(vec!["--auth-token", ""], None), (vec![], Some(""))] {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_neuron-worker"));
        cmd.arg("serve").args(["--grpc-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0"]);
        cmd.args(["--metrics-addr", "127.0.0.1:0"]).args(&args).env_remove("NEURON_WORKER_AUTH_TOKEN");
        if let Some(v) = env {
            cmd.env("NEURON_WORKER_AUTH_TOKEN", v);
        }
        let out = cmd.output().expect("the worker runs");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} {env:?}: the worker started without a token");
        assert!(stderr.contains("empty"), "{args:?} {env:?}: {stderr}");
    }
}

#[tokio::test]
async fn the_bearer_scheme_is_case_insensitive() {
    let mut opts = options();
    opts.auth_token = Some("s3cret".into());
    let w = start_with(None, ModelControlMode::None, opts).await;
    let channel =
        Channel::from_shared(format!("http://{}", w.server.grpc_addr)).expect("url").connect().await.expect("connect");
    let call = |header: &'static str| {
        let channel = channel.clone();
        async move {
            let v: MetadataValue<_> = header.parse().expect("header");
            let mut c = GrpcInferenceServiceClient::with_interceptor(channel, move |mut r: tonic::Request<()>| {
                r.metadata_mut().insert("authorization", v.clone());
                Ok(r)
            });
            c.server_live(ServerLiveRequest {}).await
        }
    };
    for ok in ["Bearer s3cret", "bearer s3cret", "BEARER s3cret"] {
        assert!(call(ok).await.unwrap_or_else(|e| panic!("{ok}: {e:?}")).into_inner().live);
    }
    let e = call("Basic czNjcmV0").await.expect_err("another scheme");
    assert_eq!(e.code(), Code::Unauthenticated);
    assert!(e.message().contains("scheme 'Basic'"), "{}", e.message());
    // The HTTP front reads the header the same way.
    let http = w.server.http_addr.expect("http front");
    let r = common::http::send(http, "GET", "/v2/health/ready", &[], Vec::new()).await;
    assert_eq!(r.status, 200);
    let r = common::http::send(http, "GET", "/v2", &[("authorization", "bearer s3cret")], Vec::new()).await;
    assert_eq!(r.status, 200, "{}", r.text());
}

/// What is wrong, cert, key, client CA, and the files the error must name.
type Case<'a> = (&'a str, PathBuf, PathBuf, Option<PathBuf>, Vec<&'a PathBuf>);

#[tokio::test]
async fn tls_mistakes_name_the_file_and_the_cause() {
    let key = rcgen::KeyPair::generate().expect("key");
    let cert =
        rcgen::CertificateParams::new(vec!["localhost".to_string()]).expect("params").self_signed(&key).expect("cert");
    let other_key = rcgen::KeyPair::generate().expect("key");
    let dir = tempfile::tempdir().expect("tmp");
    let write = |name: &str, pem: String| -> PathBuf {
        let p = dir.path().join(name);
        std::fs::write(&p, pem).expect("write pem");
        p
    };
    let (good_cert, good_key) = (write("cert.pem", cert.pem()), write("key.pem", key.serialize_pem()));
    let garbage = write("garbage.pem", "not a PEM file\n".into());
    let other = write("other.key", other_key.serialize_pem());
    let cases: Vec<Case<'_>> = vec![
        ("garbage certificate", garbage.clone(), good_key.clone(), None, vec![&garbage]),
        ("garbage key", good_cert.clone(), garbage.clone(), None, vec![&garbage]),
        ("swapped files", good_key.clone(), good_cert.clone(), None, vec![&good_key]),
        ("a key of another certificate", good_cert.clone(), other.clone(), None, vec![&good_cert, &other]),
        ("garbage client CA", good_cert.clone(), good_key.clone(), Some(garbage.clone()), vec![&garbage]),
    ];
    for (what, cert, key, ca, named) in cases {
        let mut opts = options();
        (opts.tls_cert, opts.tls_key, opts.tls_client_ca) = (Some(cert), Some(key), ca);
        let e = start_err(opts).await;
        assert!(!e.contains("transport error"), "{what}: {e}");
        for p in named {
            assert!(e.contains(&p.display().to_string()), "{what}: the error names {}: {e}", p.display());
        }
    }
}
