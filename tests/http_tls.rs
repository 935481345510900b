//! The HTTP front over TLS and mutual TLS (the gRPC front's files and rules): a client trusting the
//! CA and presenting a certificate is served; one without a certificate, and a plain-text client,
//! are not.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)] // test code may panic on setup failures

mod common;

use std::sync::Arc;

use bytes::Bytes;
use common::tls::TestPki;
use common::*;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use neuron_worker::repository::ModelControlMode;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::{ClientConfig, RootCertStore};

fn tls_config(pki: &TestPki, with_cert: bool) -> ClientConfig {
    let mut roots = RootCertStore::empty();
    roots.add(CertificateDer::from_pem_slice(pki.ca.as_bytes()).expect("ca pem")).expect("ca");
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots);
    if with_cert {
        let cert = CertificateDer::from_pem_slice(pki.client_cert.as_bytes()).expect("cert pem");
        let key = PrivateKeyDer::from_pem_slice(pki.client_key.as_bytes()).expect("key pem");
        builder.with_client_auth_cert(vec![cert], key).expect("client auth")
    } else {
        builder.with_no_client_auth()
    }
}

/// `GET /v2/health/ready` over TLS: the status, or why the connection failed.
async fn ready_over_tls(addr: std::net::SocketAddr, config: ClientConfig) -> Result<u16, String> {
    let tcp = tokio::net::TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let name = ServerName::try_from("localhost").expect("name");
    let tls = TlsConnector::from(Arc::new(config)).connect(name, tcp).await.map_err(|e| e.to_string())?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(TokioIo::new(tls)).await.map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let req = hyper::Request::get("/v2/health/ready").header("host", "localhost").body(Full::new(Bytes::new()));
    let resp = sender.send_request(req.expect("request")).await.map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    resp.into_body().collect().await.map_err(|e| e.to_string())?;
    Ok(status)
}

#[tokio::test]
async fn http_front_serves_tls_and_mutual_tls() {
    let pki = TestPki::new();
    let mut opts = options();
    pki.mutual_tls(&mut opts);
    let w = start_with(None, ModelControlMode::None, opts).await;

    assert_eq!(ready_over_tls(w.http(), tls_config(&pki, true)).await, Ok(200));
    assert!(
        ready_over_tls(w.http(), tls_config(&pki, false)).await.is_err(),
        "a client without a certificate was served"
    );
    // Plain HTTP to the TLS port gets no HTTP answer.
    let tcp = tokio::net::TcpStream::connect(w.http()).await.expect("connect");
    let plain = async {
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await.ok()?;
        tokio::spawn(conn);
        let req = hyper::Request::get("/v2/health/ready").header("host", "x").body(Full::new(Bytes::new())).ok()?;
        sender.send_request(req).await.ok().map(|r| r.status().as_u16())
    };
    let answered = tokio::time::timeout(std::time::Duration::from_secs(15), plain).await.ok().flatten();
    assert_eq!(answered, None, "plain HTTP was answered on the TLS port");
}
