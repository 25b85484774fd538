//! The cluster's certificate authority: `baton cluster init` makes a CA and one certificate per
//! node, named for the node (a DNS name) and its control address. A node trusts exactly the
//! certificates this CA signed.

use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::config::ClusterConfig;

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("certificate generation: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

/// What a node needs to join: its certificate and key, and the cluster CA to check peers.
pub struct NodeIdentity {
    pub name: String,
    pub cert: CertificateDer<'static>,
    pub key: PrivatePkcs8KeyDer<'static>,
    pub ca: CertificateDer<'static>,
}

impl std::fmt::Debug for NodeIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeIdentity").field("name", &self.name).finish_non_exhaustive()
    }
}

impl Clone for NodeIdentity {
    fn clone(&self) -> Self {
        NodeIdentity { name: self.name.clone(), cert: self.cert.clone(), key: self.key.clone_key(), ca: self.ca.clone() }
    }
}

impl NodeIdentity {
    pub fn private_key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(self.key.clone_key())
    }
}

/// A freshly made CA and its node identities (in memory).
pub struct ClusterPki {
    pub ca: CertificateDer<'static>,
    pub nodes: Vec<NodeIdentity>,
}

/// Makes a CA named after `cluster` and a certificate for every `(name, ip)` node.
pub fn generate(cluster: &str, nodes: &[(String, std::net::IpAddr)]) -> Result<ClusterPki, PkiError> {
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(DnType::CommonName, format!("baton cluster {cluster} CA"));
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let ca_key = KeyPair::generate()?;
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let ca_der = ca_cert.der().clone();
    let issuer = Issuer::new(ca_params, ca_key);
    let mut out = Vec::with_capacity(nodes.len());
    for (name, ip) in nodes {
        let mut p = CertificateParams::new(vec![name.clone()])?;
        p.subject_alt_names.push(SanType::IpAddress(*ip));
        p.distinguished_name.push(DnType::CommonName, name.clone());
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        let key = KeyPair::generate()?;
        let cert = p.signed_by(&key, &issuer)?;
        out.push(NodeIdentity {
            name: name.clone(),
            cert: cert.der().clone(),
            key: PrivatePkcs8KeyDer::from(key.serialize_der()),
            ca: ca_der.clone(),
        });
    }
    Ok(ClusterPki { ca: ca_der, nodes: out })
}

fn write(path: &Path, bytes: &[u8]) -> Result<(), PkiError> {
    std::fs::write(path, bytes).map_err(|source| PkiError::Io { path: path.to_path_buf(), source })
}

fn read(path: &Path) -> Result<Vec<u8>, PkiError> {
    std::fs::read(path).map_err(|source| PkiError::Io { path: path.to_path_buf(), source })
}

/// `baton cluster init`: writes `ca.der` and `<node>.der` / `<node>.key.der` into the
/// cluster's TLS directory. The CA's private key is not kept: adding a node means running init
/// again (new CA, new certificates for everyone).
pub fn init(config: &ClusterConfig) -> Result<PathBuf, PkiError> {
    let dir = config.tls_dir.clone();
    std::fs::create_dir_all(&dir).map_err(|source| PkiError::Io { path: dir.clone(), source })?;
    let nodes: Vec<(String, std::net::IpAddr)> = config.nodes.iter().map(|n| (n.name.clone(), n.control.ip())).collect();
    let pki = generate(&config.name, &nodes)?;
    write(&dir.join("ca.der"), &pki.ca)?;
    for n in &pki.nodes {
        write(&dir.join(format!("{}.der", n.name)), &n.cert)?;
        let key_path = dir.join(format!("{}.key.der", n.name));
        write(&key_path, n.key.secret_pkcs8_der())?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600));
        }
    }
    Ok(dir)
}

/// Reads node `name`'s identity from the cluster's TLS directory.
pub fn load(tls_dir: &Path, name: &str) -> Result<NodeIdentity, PkiError> {
    let cert = read(&tls_dir.join(format!("{name}.der")))?;
    let key = read(&tls_dir.join(format!("{name}.key.der")))?;
    let ca = read(&tls_dir.join("ca.der"))?;
    if ca.is_empty() || cert.is_empty() || key.is_empty() {
        return Err(PkiError::Invalid { path: tls_dir.to_path_buf(), message: "empty certificate or key file".into() });
    }
    Ok(NodeIdentity {
        name: name.to_string(),
        cert: CertificateDer::from(cert),
        key: PrivatePkcs8KeyDer::from(key),
        ca: CertificateDer::from(ca),
    })
}
