//! A test PKI for the TLS tests: a CA, a server certificate for `localhost` and a client
//! certificate, both signed by the CA, the server's files written to a temporary folder.

use std::path::PathBuf;

use neuron_worker::server::ServeOptions;

/// The PEMs a client needs and the server's files (kept while this lives).
pub struct TestPki {
    _dir: tempfile::TempDir,
    /// The CA certificate (PEM).
    pub ca: String,
    /// The client's certificate (PEM).
    pub client_cert: String,
    /// The client's key (PEM).
    pub client_key: String,
    server_cert: PathBuf,
    server_key: PathBuf,
    ca_file: PathBuf,
}

impl TestPki {
    /// Generates the CA, the server and the client certificates.
    pub fn new() -> TestPki {
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
        let server_cert = write("server.pem", server.pem());
        let server_key_file = write("server.key", server_key.serialize_pem());
        let ca_file = write("ca.pem", ca.pem());
        TestPki {
            ca: ca.pem(),
            client_cert: client.pem(),
            client_key: client_key.serialize_pem(),
            server_cert,
            server_key: server_key_file,
            ca_file,
            _dir: dir,
        }
    }

    /// Sets `opts` to serve TLS with the server certificate and to require client certificates
    /// signed by the CA (mutual TLS).
    pub fn mutual_tls(&self, opts: &mut ServeOptions) {
        opts.tls_cert = Some(self.server_cert.clone());
        opts.tls_key = Some(self.server_key.clone());
        opts.tls_client_ca = Some(self.ca_file.clone());
    }
}
