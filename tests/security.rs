//! Bearer-token auth on every RPC except health, and TLS / mutual TLS with rustls.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)] // test and benchmark code may panic on setup failures

mod common;

use common::tls::TestPki;
use common::*;
use neuron_worker::proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use neuron_worker::proto::inference::{ServerLiveRequest, ServerReadyRequest};
use neuron_worker::repository::ModelControlMode;
use tonic::Code;
use tonic::metadata::MetadataValue;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

#[tokio::test]
async fn bearer_token_is_required_except_for_health() {
    let mut opts = options();
    opts.auth_token = Some("s3cret".into());
    let w = start_with(None, ModelControlMode::None, opts).await;
    let url = format!("http://{}", w.server.grpc_addr);
    let channel = Channel::from_shared(url).expect("url").connect().await.expect("connect");
    let mut anon = GrpcInferenceServiceClient::new(channel.clone());
    let e = anon.server_live(ServerLiveRequest {}).await.expect_err("no token");
    assert_eq!(e.code(), Code::Unauthenticated);
    assert!(e.message().contains("authorization: Bearer"));
    let wrong: MetadataValue<_> = "Bearer nope".parse().expect("header");
    let mut bad = GrpcInferenceServiceClient::with_interceptor(channel.clone(), move |mut r: tonic::Request<()>| {
        r.metadata_mut().insert("authorization", wrong.clone());
        Ok(r)
    });
    assert_eq!(bad.server_live(ServerLiveRequest {}).await.expect_err("wrong token").code(), Code::Unauthenticated);
    let right: MetadataValue<_> = "Bearer s3cret".parse().expect("header");
    let mut good = GrpcInferenceServiceClient::with_interceptor(channel.clone(), move |mut r: tonic::Request<()>| {
        r.metadata_mut().insert("authorization", right.clone());
        Ok(r)
    });
    assert!(good.server_live(ServerLiveRequest {}).await.expect("token accepted").into_inner().live);
    let x = tagged_rows(0, 1);
    good.model_infer(fp32_request("linear", "INPUT0", vec![1, 64], &x)).await.expect("infer with token");
    // Health probes (Kubernetes) carry no token.
    let mut health = HealthClient::new(channel);
    let st =
        health.check(HealthCheckRequest { service: "linear".into() }).await.expect("health without token").into_inner();
    assert_eq!(st.status, 1, "SERVING");
}

#[tokio::test]
async fn tls_and_mutual_tls() {
    let pki = TestPki::new();
    let mut opts = options();
    pki.mutual_tls(&mut opts);
    let w = start_with(None, ModelControlMode::None, opts).await;
    let url = format!("https://localhost:{}", w.server.grpc_addr.port());

    let tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&pki.ca)).domain_name("localhost");
    let with_cert = tls.clone().identity(Identity::from_pem(&pki.client_cert, &pki.client_key));
    let channel = Channel::from_shared(url.clone())
        .expect("url")
        .tls_config(with_cert)
        .expect("tls")
        .connect()
        .await
        .expect("mTLS connect");
    let mut c = GrpcInferenceServiceClient::new(channel);
    assert!(c.server_ready(ServerReadyRequest {}).await.expect("ready over mTLS").into_inner().ready);

    // Without a client certificate the handshake or the first call fails.
    let refused = match Channel::from_shared(url).expect("url").tls_config(tls).expect("tls").connect().await {
        Err(_) => true,
        Ok(ch) => GrpcInferenceServiceClient::new(ch).server_ready(ServerReadyRequest {}).await.is_err(),
    };
    assert!(refused, "a client without a certificate was served");
}
