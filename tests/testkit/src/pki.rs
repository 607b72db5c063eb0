//! A throwaway PKI for TLS tests.

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};

/// A CA, a server certificate for 127.0.0.1/localhost and a client certificate, as PEM.
pub struct Pki {
    /// CA certificate.
    pub ca: String,
    /// Server certificate chain and key.
    pub server: (String, String),
    /// Client certificate chain and key.
    pub client: (String, String),
}

impl Pki {
    /// Generates a fresh PKI.
    pub fn generate() -> Self {
        let ca_key = KeyPair::generate().expect("CA key");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.distinguished_name.push(DnType::CommonName, "fleetline test ca");
        let ca = ca_params.self_signed(&ca_key).expect("CA certificate");
        let leaf = |names: Vec<String>, cn: &str| {
            let key = KeyPair::generate().expect("leaf key");
            let mut params = CertificateParams::new(names).expect("leaf params");
            params.distinguished_name.push(DnType::CommonName, cn);
            let cert = params.signed_by(&key, &ca, &ca_key).expect("leaf certificate");
            (cert.pem(), key.serialize_pem())
        };
        Self {
            ca: ca.pem(),
            server: leaf(vec!["127.0.0.1".into(), "localhost".into()], "broker"),
            client: leaf(vec!["client".into()], "client"),
        }
    }
}
