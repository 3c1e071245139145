//! The certificate authority: an ECDSA P-256 root (or a user's root/intermediate)
//! that signs short-lived SPIFFE certificates.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType, SerialNumber,
};
use time::OffsetDateTime;

use crate::error::WeftError;

const CA_CERT_FILE: &str = "ca-cert.pem";
const CA_KEY_FILE: &str = "ca-key.pem";
/// The root Weft creates lives ten years; rotating it is an explicit operation.
const ROOT_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Certificates start a little in the past so small clock skew does not reject them.
const BACKDATE: Duration = Duration::from_secs(60);

/// Where the CA comes from.
#[derive(Clone, Debug)]
pub enum CaSource {
    /// Created on first start and persisted in this directory (0600 key file).
    StateDir(PathBuf),
    /// Supplied by the user: a CA certificate (root or intermediate), its key, and the
    /// chain up to the root (empty when the certificate is the root).
    Files {
        /// PEM CA certificate.
        cert: PathBuf,
        /// PEM private key of that certificate.
        key: PathBuf,
        /// PEM certificates between it and the root, root included (optional).
        chain: Option<PathBuf>,
    },
}

/// An issued workload certificate (X.509 SVID) and its key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Svid {
    /// The SPIFFE ID in the URI SAN.
    pub spiffe_id: String,
    /// Leaf first, then any intermediates (PEM).
    pub cert_chain_pem: String,
    /// The leaf's private key (PKCS#8 PEM).
    pub key_pem: String,
    /// Serial number, hex.
    pub serial: String,
    /// Start of validity.
    pub not_before: SystemTime,
    /// End of validity.
    pub not_after: SystemTime,
}

/// Weft's CA: signs SVIDs and knows the trust bundle proxies verify them with.
#[derive(Debug)]
pub struct CertificateAuthority {
    issuer: Issuer<'static, KeyPair>,
    /// The CA certificate and its chain up to the root (PEM), appended to every leaf.
    chain_pem: String,
    /// Roots proxies trust: this CA's root plus any extra roots (PEM).
    trust_bundle_pem: String,
    /// PEM of this CA's own root certificate.
    root_pem: String,
    /// End of the CA certificate's validity.
    not_after: SystemTime,
}

fn read(path: &Path) -> Result<String, WeftError> {
    std::fs::read_to_string(path).map_err(|e| WeftError::io(path, e))
}

fn identity_err(what: &str, e: impl std::fmt::Display) -> WeftError {
    WeftError::Identity(format!("{what}: {e}"))
}

fn write_private(path: &Path, text: &str) -> Result<(), WeftError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| WeftError::io(path, e))?;
    file.write_all(text.as_bytes())
        .map_err(|e| WeftError::io(path, e))
}

/// The end of validity of the first certificate in `pem`.
pub fn certificate_not_after(pem: &str) -> Result<SystemTime, WeftError> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(pem.as_bytes())
        .map_err(|e| identity_err("certificate PEM", e))?;
    let cert = pem
        .parse_x509()
        .map_err(|e| identity_err("certificate", e))?;
    let secs = cert.validity().not_after.timestamp();
    Ok(SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(secs).unwrap_or(0)))
}

fn offset(t: SystemTime) -> OffsetDateTime {
    OffsetDateTime::from(t)
}

/// 128 random bits, positive: unpredictable serials as the CA/B baseline asks.
fn random_serial() -> Result<SerialNumber, WeftError> {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 16];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| WeftError::Identity("no system randomness for a serial number".to_string()))?;
    bytes[0] &= 0x7f;
    Ok(SerialNumber::from_slice(&bytes))
}

impl CertificateAuthority {
    /// Loads the CA from `source`, creating (and persisting) a root on first start.
    pub fn load(source: &CaSource, extra_trust: Option<&Path>) -> Result<Self, WeftError> {
        let (cert_pem, key_pem, chain) = match source {
            CaSource::StateDir(dir) => Self::load_or_create_root(dir)?,
            CaSource::Files { cert, key, chain } => {
                let chain = match chain {
                    Some(p) => read(p)?,
                    None => String::new(),
                };
                (read(cert)?, read(key)?, chain)
            }
        };
        let extra = match extra_trust {
            Some(path) => read(path)?,
            None => String::new(),
        };
        Self::from_pem(&cert_pem, &key_pem, &chain, &extra)
    }

    /// A CA from PEM text: its certificate and key, the chain up to the root (empty
    /// when the certificate is the root), and extra roots to trust (may be empty).
    pub fn from_pem(
        cert_pem: &str,
        key_pem: &str,
        chain: &str,
        extra_trust_pem: &str,
    ) -> Result<Self, WeftError> {
        let (cert_pem, chain) = (cert_pem.to_string(), chain.to_string());
        let key = KeyPair::from_pem(key_pem).map_err(|e| identity_err("CA key", e))?;
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, key)
            .map_err(|e| identity_err("CA certificate", e))?;
        let not_after = certificate_not_after(&cert_pem)?;
        // The root is the last certificate of the chain, or the CA certificate itself.
        let root_pem = split_pem(&chain).pop().unwrap_or_else(|| cert_pem.clone());
        let mut trust_bundle_pem = root_pem.clone();
        for cert in split_pem(extra_trust_pem) {
            if cert != root_pem {
                trust_bundle_pem.push_str(&cert);
            }
        }
        let chain_pem = if chain.is_empty() {
            String::new()
        } else {
            // Leaves carry the intermediate(s); the root itself is in the trust bundle.
            let mut certs = vec![cert_pem.clone()];
            certs.extend(split_pem(&chain).into_iter().filter(|c| *c != root_pem));
            certs.concat()
        };
        Ok(Self {
            issuer,
            chain_pem,
            trust_bundle_pem,
            root_pem,
            not_after,
        })
    }

    fn load_or_create_root(dir: &Path) -> Result<(String, String, String), WeftError> {
        let cert_path = dir.join(CA_CERT_FILE);
        let key_path = dir.join(CA_KEY_FILE);
        if cert_path.exists() || key_path.exists() {
            return Ok((read(&cert_path)?, read(&key_path)?, String::new()));
        }
        std::fs::create_dir_all(dir).map_err(|e| WeftError::io(dir, e))?;
        let (cert_pem, key_pem) = Self::generate_root()?;
        // Key first: a crash in between leaves a key without a certificate, which fails
        // loudly on the next start instead of silently creating a second root.
        write_private(&key_path, &key_pem)?;
        std::fs::write(&cert_path, &cert_pem).map_err(|e| WeftError::io(&cert_path, e))?;
        tracing::info!(dir = %dir.display(), "created a new root CA");
        Ok((cert_pem, key_pem, String::new()))
    }

    /// When the CA certificate expires (every certificate it issues ends before).
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// A new self-signed root: its certificate and private key (PEM).
    pub fn generate_root() -> Result<(String, String), WeftError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
            .map_err(|e| identity_err("root key", e))?;
        let mut params = CertificateParams::default();
        let mut name = DistinguishedName::new();
        name.push(DnType::OrganizationName, "weft");
        name.push(DnType::CommonName, "weft root CA");
        params.distinguished_name = name;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = SystemTime::now();
        params.not_before = offset(now - BACKDATE);
        params.not_after = offset(now + ROOT_LIFETIME);
        params.serial_number = Some(random_serial()?);
        let cert = params
            .self_signed(&key)
            .map_err(|e| identity_err("root certificate", e))?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// PEM of this CA's root certificate.
    pub fn root_pem(&self) -> &str {
        &self.root_pem
    }

    /// PEM of every root proxies trust (this CA's root first).
    pub fn trust_bundle_pem(&self) -> &str {
        &self.trust_bundle_pem
    }

    /// Issues a certificate for `spiffe_id`, valid for `ttl` from `now`.
    pub fn issue(
        &self,
        spiffe_id: &str,
        ttl: Duration,
        now: SystemTime,
    ) -> Result<Svid, WeftError> {
        self.issue_with(
            spiffe_id,
            ttl,
            now,
            Vec::new(),
            vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
        )
    }

    /// Issues a server certificate for the control plane itself (its xDS port).
    pub fn issue_server(
        &self,
        spiffe_id: &str,
        hosts: &[String],
        ttl: Duration,
        now: SystemTime,
    ) -> Result<Svid, WeftError> {
        let mut sans = Vec::new();
        for host in hosts {
            let san = match host.parse() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName(
                    host.clone()
                        .try_into()
                        .map_err(|e| identity_err("DNS name", e))?,
                ),
            };
            sans.push(san);
        }
        self.issue_with(
            spiffe_id,
            ttl,
            now,
            sans,
            vec![ExtendedKeyUsagePurpose::ServerAuth],
        )
    }

    fn issue_with(
        &self,
        spiffe_id: &str,
        ttl: Duration,
        now: SystemTime,
        mut sans: Vec<SanType>,
        usages: Vec<ExtendedKeyUsagePurpose>,
    ) -> Result<Svid, WeftError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
            .map_err(|e| identity_err("workload key", e))?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        sans.insert(
            0,
            SanType::URI(
                spiffe_id
                    .to_string()
                    .try_into()
                    .map_err(|e| identity_err("SPIFFE ID", e))?,
            ),
        );
        params.subject_alt_names = sans;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyAgreement,
        ];
        params.extended_key_usages = usages;
        params.use_authority_key_identifier_extension = true;
        let not_before = now - BACKDATE.min(ttl / 4);
        let not_after = now + ttl;
        params.not_before = offset(not_before);
        params.not_after = offset(not_after);
        let serial = random_serial()?;
        let serial_hex: String = serial
            .to_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        params.serial_number = Some(serial);
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(|e| identity_err("workload certificate", e))?;
        Ok(Svid {
            spiffe_id: spiffe_id.to_string(),
            cert_chain_pem: format!("{}{}", cert.pem(), self.chain_pem),
            key_pem: key.serialize_pem(),
            serial: serial_hex,
            // Seconds precision: X.509 times carry no more.
            not_before: truncate_to_secs(not_before),
            not_after: truncate_to_secs(not_after),
        })
    }
}

fn truncate_to_secs(t: SystemTime) -> SystemTime {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
}

/// Splits concatenated PEM certificates (each kept with its BEGIN/END lines).
fn split_pem(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        if line.starts_with("-----BEGIN") {
            current.clear();
        }
        current.push_str(line);
        current.push('\n');
        if line.starts_with("-----END") {
            out.push(std::mem::take(&mut current));
        }
    }
    out
}
