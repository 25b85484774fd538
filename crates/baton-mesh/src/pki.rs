//! The cluster's certificate authority: `baton cluster init` makes a CA and one certificate per
//! node, named for the node (a DNS name) and its control address; `baton cluster add-node`
//! signs one more with the CA's key (kept in the TLS directory, mode 0600); `baton cluster
//! revoke` lists a name in the directory's `revoked` file. A node trusts exactly the
//! certificates this CA signed, less the revoked names.

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

/// The CA's parameters: the same for the self-signed CA and for signing later, so certificates
/// signed by `add-node` chain to the CA made by `init`.
fn ca_params(cluster: &str) -> Result<CertificateParams, PkiError> {
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(DnType::CommonName, format!("baton cluster {cluster} CA"));
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    Ok(ca_params)
}

fn node_identity(name: &str, ip: std::net::IpAddr, issuer: &Issuer<'_, KeyPair>, ca: &CertificateDer<'static>) -> Result<NodeIdentity, PkiError> {
    let mut p = CertificateParams::new(vec![name.to_string()])?;
    p.subject_alt_names.push(SanType::IpAddress(ip));
    p.distinguished_name.push(DnType::CommonName, name.to_string());
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    let key = KeyPair::generate()?;
    let cert = p.signed_by(&key, issuer)?;
    Ok(NodeIdentity { name: name.to_string(), cert: cert.der().clone(), key: PrivatePkcs8KeyDer::from(key.serialize_der()), ca: ca.clone() })
}

/// Makes a CA named after `cluster` and a certificate for every `(name, ip)` node.
pub fn generate(cluster: &str, nodes: &[(String, std::net::IpAddr)]) -> Result<ClusterPki, PkiError> {
    generate_keeping_key(cluster, nodes).map(|(pki, _)| pki)
}

fn generate_keeping_key(cluster: &str, nodes: &[(String, std::net::IpAddr)]) -> Result<(ClusterPki, Vec<u8>), PkiError> {
    let params = ca_params(cluster)?;
    let ca_key = KeyPair::generate()?;
    let ca_cert = params.self_signed(&ca_key)?;
    let ca_der = ca_cert.der().clone();
    let key_der = ca_key.serialize_der();
    let issuer = Issuer::new(params, ca_key);
    let out = nodes.iter().map(|(name, ip)| node_identity(name, *ip, &issuer, &ca_der)).collect::<Result<Vec<_>, _>>()?;
    Ok((ClusterPki { ca: ca_der, nodes: out }, key_der))
}

fn write_secret(path: &Path, bytes: &[u8]) -> Result<(), PkiError> {
    write(path, bytes)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
    }
    Ok(())
}

fn write_node(dir: &Path, n: &NodeIdentity) -> Result<(), PkiError> {
    write(&dir.join(format!("{}.der", n.name)), &n.cert)?;
    write_secret(&dir.join(format!("{}.key.der", n.name)), n.key.secret_pkcs8_der())
}

/// `baton cluster add-node NAME`: signs a certificate for a new node with the CA key `init`
/// kept, into the same directory. The node joins a running mesh through its seeds.
pub fn add_node(tls_dir: &Path, cluster: &str, name: &str, ip: std::net::IpAddr) -> Result<NodeIdentity, PkiError> {
    if rustls::pki_types::ServerName::try_from(name).is_err() || name.parse::<std::net::IpAddr>().is_ok() {
        return Err(PkiError::Invalid { path: tls_dir.to_path_buf(), message: format!("{name:?} is not a node name (a DNS name such as node-d)") });
    }
    let key_path = tls_dir.join("ca.key.der");
    let key_der = read(&key_path)?;
    let key = KeyPair::try_from(key_der.as_slice()).map_err(|e| PkiError::Invalid { path: key_path.clone(), message: e.to_string() })?;
    let ca = CertificateDer::from(read(&tls_dir.join("ca.der"))?);
    let issuer = Issuer::new(ca_params(cluster)?, key);
    let id = node_identity(name, ip, &issuer, &ca)?;
    write_node(tls_dir, &id)?;
    Ok(id)
}

/// The names in the TLS directory's `revoked` file (one per line; `#` starts a comment). A
/// missing file revokes nothing.
pub fn revoked(tls_dir: &Path) -> Result<std::collections::HashSet<String>, PkiError> {
    let path = tls_dir.join("revoked");
    match std::fs::read_to_string(&path) {
        Ok(text) => Ok(text.lines().map(|l| l.split('#').next().unwrap_or("").trim()).filter(|l| !l.is_empty()).map(str::to_string).collect()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Default::default()),
        Err(source) => Err(PkiError::Io { path, source }),
    }
}

/// `baton cluster revoke NAME`: adds NAME to the `revoked` file (nodes re-read it on SIGHUP).
pub fn revoke(tls_dir: &Path, name: &str) -> Result<PathBuf, PkiError> {
    let path = tls_dir.join("revoked");
    if revoked(tls_dir)?.contains(name) {
        return Ok(path);
    }
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(&path).map_err(|source| PkiError::Io { path: path.clone(), source })?;
    writeln!(f, "{name}").map_err(|source| PkiError::Io { path: path.clone(), source })?;
    Ok(path)
}

fn write(path: &Path, bytes: &[u8]) -> Result<(), PkiError> {
    std::fs::write(path, bytes).map_err(|source| PkiError::Io { path: path.to_path_buf(), source })
}

fn read(path: &Path) -> Result<Vec<u8>, PkiError> {
    std::fs::read(path).map_err(|source| PkiError::Io { path: path.to_path_buf(), source })
}

/// `baton cluster init`: writes `ca.der`, the CA's key `ca.key.der` (for `add-node`; keep the
/// directory private) and `<node>.der` / `<node>.key.der` into the cluster's TLS directory.
pub fn init(config: &ClusterConfig) -> Result<PathBuf, PkiError> {
    let dir = config.tls_dir.clone();
    std::fs::create_dir_all(&dir).map_err(|source| PkiError::Io { path: dir.clone(), source })?;
    let nodes: Vec<(String, std::net::IpAddr)> = config.nodes.iter().map(|n| (n.name.clone(), n.control.ip())).collect();
    let (pki, ca_key) = generate_keeping_key(&config.name, &nodes)?;
    write(&dir.join("ca.der"), &pki.ca)?;
    write_secret(&dir.join("ca.key.der"), &ca_key)?;
    for n in &pki.nodes {
        write_node(&dir, n)?;
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
