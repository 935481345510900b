//! The HTTP front over TLS and mutual TLS (the gRPC front's files and rules): a client trusting the
//! CA and presenting a certificate is served; one without a certificate, and a plain-text client,
//! are not.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)] // test code may panic on setup failures

mod common;

use std::sync::Arc;

use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use neuron_worker::repository::ModelControlMode;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::{ClientConfig, RootCertStore};

struct Pki {
    ca: String,
    client_cert: String,
    client_key: String,
}

fn tls_config(pki: &Pki, with_cert: bool) -> ClientConfig {
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
    let ca_key = rcgen::KeyPair::generate().expect("key");
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).expect("ca");
    let issuer = rcgen::Issuer::from_params(&ca_params, &ca_key);
    let server_key = rcgen::KeyPair::generate().expect("key");
    let server = rcgen::CertificateParams::new(vec!["localhost".to_string()])
        .expect("params")
        .signed_by(&server_key, &issuer)
        .expect("server cert");
    let client_key = rcgen::KeyPair::generate().expect("key");
    let client = rcgen::CertificateParams::new(vec!["client".to_string()])
        .expect("params")
        .signed_by(&client_key, &issuer)
        .expect("client cert");
    let dir = tempfile::tempdir().expect("tmp");
    let write = |name: &str, pem: String| {
        let p = dir.path().join(name);
        std::fs::write(&p, pem).expect("write pem");
        p
    };
    let mut opts = options();
    opts.tls_cert = Some(write("server.pem", server.pem()));
    opts.tls_key = Some(write("server.key", server_key.serialize_pem()));
    opts.tls_client_ca = Some(write("ca.pem", ca.pem()));
    let w = start_with(None, ModelControlMode::None, opts).await;
    let pki = Pki { ca: ca.pem(), client_cert: client.pem(), client_key: client_key.serialize_pem() };

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
