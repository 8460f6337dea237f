//! TLS for `C4:MQTT`: turns the files given to `SetTlsCertificates` (and the
//! `SetTlsInsecure` flag) into a rustls client configuration.
//!
//! In: a [`TlsFiles`] (CA file, client certificate, client key, key password) and the
//! `insecure` flag. Out: an `Arc<ClientConfig>` the worker hands to `tokio-rustls`, or a
//! readable sentence naming the file at fault, which the binding returns from
//! `SetTlsCertificates` at once (code 8).
//!
//! - A CA file verifies the server against that CA alone; without one, the system's root
//!   certificates are used (`rustls-native-certs`).
//! - A certificate and a key together turn on mutual TLS. Keys may be PKCS#8, PKCS#1
//!   (`RSA PRIVATE KEY`) or SEC1 (`EC PRIVATE KEY`) PEM, or an encrypted PKCS#8 key
//!   (`ENCRYPTED PRIVATE KEY`, PBES2 with PBKDF2 or scrypt and AES, as written by
//!   `openssl pkcs8 -topk8`), decrypted with the password. The older OpenSSL-only
//!   encryption (`Proc-Type: 4,ENCRYPTED` headers) is refused with the command that
//!   converts it.
//! - `insecure` skips only the host name check: the chain must still lead to a trusted
//!   CA, the validity dates and signatures are still checked.
//!
//! TLS-PSK (`SetTlsPsk`): rustls implements no pre-shared-key cipher suites, so the binding
//! answers `SetTlsPsk` with code 10, "This feature is not supported", rather than pretend.

use crate::mqtt::Secret;
use pkcs8::EncryptedPrivateKeyInfoRef;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio_rustls::rustls::client::WebPkiServerVerifier;
use tokio_rustls::rustls::client::danger::{
    HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier,
};
use tokio_rustls::rustls::crypto::{CryptoProvider, ring};
use tokio_rustls::rustls::pki_types::{
    CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime,
};
use tokio_rustls::rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, Error as TlsError, RootCertStore,
    SignatureScheme,
};

/// Every message starts with the call that reported it, so a driver's log says where to look.
const CALL: &str = "SetTlsCertificates";

/// The files given to `SetTlsCertificates`. Paths are used as given (relative to the
/// process's working directory when not absolute).
#[derive(Debug, Clone, Default)]
pub struct TlsFiles {
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub key_password: Option<Secret>,
}

/// Reads and checks every file now, so a bad path or password is reported by
/// `SetTlsCertificates` rather than by a failed connection later.
pub fn build_client_config(files: &TlsFiles, insecure: bool) -> Result<Arc<ClientConfig>, String> {
    let provider = Arc::new(ring::default_provider());
    let roots = Arc::new(match &files.ca {
        Some(ca) => ca_roots(ca)?,
        None => system_roots()?,
    });

    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("{CALL}: TLS set-up failed: {e}"))?;
    let builder = if insecure {
        let verifier = NoHostnameCheck::new(roots, provider)?;
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
    } else {
        builder.with_root_certificates(roots)
    };

    let config = match (&files.cert, &files.key) {
        (Some(cert_path), Some(key_path)) => {
            let chain = read_certificates("certificate", cert_path)?;
            let key = read_private_key(key_path, files.key_password.as_ref())?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| client_auth_error(cert_path, key_path, e))?
        }
        (Some(cert_path), None) => {
            return Err(format!(
                "{CALL}: certificate file {} given without a key file; mutual TLS needs both",
                cert_path.display()
            ));
        }
        (None, Some(key_path)) => {
            return Err(format!(
                "{CALL}: key file {} given without a certificate file; mutual TLS needs both",
                key_path.display()
            ));
        }
        (None, None) => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

fn client_auth_error(cert_path: &Path, key_path: &Path, error: TlsError) -> String {
    match error {
        TlsError::InconsistentKeys(_) => format!(
            "{CALL}: key file {} does not belong to certificate file {}",
            key_path.display(),
            cert_path.display()
        ),
        other => format!(
            "{CALL}: cannot use certificate file {} with key file {}: {other}",
            cert_path.display(),
            key_path.display()
        ),
    }
}

/// Certificates and keys are small; anything bigger is not one. The cap also keeps a
/// driver thread from reading `/dev/zero` or a named pipe forever.
const MAX_PEM_FILE: u64 = 4 * 1024 * 1024;

fn read_file(what: &str, path: &Path) -> Result<Vec<u8>, String> {
    use std::io::Read;
    let cannot =
        |e: std::io::Error| format!("{CALL}: cannot read {what} file {}: {e}", path.display());
    let meta = std::fs::metadata(path).map_err(cannot)?;
    if !meta.is_file() {
        return Err(format!(
            "{CALL}: {what} file {} is not a regular file",
            path.display()
        ));
    }
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .map_err(cannot)?
        .take(MAX_PEM_FILE + 1)
        .read_to_end(&mut bytes)
        .map_err(cannot)?;
    if bytes.len() as u64 > MAX_PEM_FILE {
        return Err(format!(
            "{CALL}: {what} file {} is over {} MiB: not a PEM certificate or key",
            path.display(),
            MAX_PEM_FILE / 1024 / 1024
        ));
    }
    Ok(bytes)
}

fn read_certificates(what: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let pem = read_file(what, path)?;
    let certs = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| {
            format!(
                "{CALL}: {what} file {} is not valid PEM: {e}",
                path.display()
            )
        })?;
    if certs.is_empty() {
        return Err(format!(
            "{CALL}: {what} file {} holds no certificate (expected PEM \"-----BEGIN CERTIFICATE-----\")",
            path.display()
        ));
    }
    Ok(certs)
}

fn ca_roots(path: &Path) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    for (index, cert) in read_certificates("CA", path)?.into_iter().enumerate() {
        roots.add(cert).map_err(|e| {
            format!(
                "{CALL}: certificate {} in CA file {} cannot be used: {e}",
                index + 1,
                path.display()
            )
        })?;
    }
    Ok(roots)
}

fn system_roots() -> Result<RootCertStore, String> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = RootCertStore::empty();
    roots.add_parsable_certificates(found.certs);
    if roots.is_empty() {
        let why = found
            .errors
            .first()
            .map(|e| format!(" ({e})"))
            .unwrap_or_default();
        return Err(format!(
            "{CALL}: no CA file given and no system root certificates found{why}; give a CA file"
        ));
    }
    Ok(roots)
}

fn read_private_key(
    path: &Path,
    password: Option<&Secret>,
) -> Result<PrivateKeyDer<'static>, String> {
    let pem = read_file("key", path)?;
    let text = String::from_utf8_lossy(&pem);
    if text.contains("Proc-Type: 4,ENCRYPTED") {
        return Err(format!(
            "{CALL}: key file {} uses the legacy OpenSSL encryption, which is not supported; \
             convert it with `openssl pkcs8 -topk8 -v2 aes-256-cbc -in OLD.key -out NEW.key`",
            path.display()
        ));
    }
    if let Some(block) = pem_block(&text, "ENCRYPTED PRIVATE KEY") {
        return decrypt_private_key(path, block, password);
    }
    match rustls_pemfile::private_key(&mut pem.as_slice()) {
        Ok(Some(key)) => Ok(key),
        Ok(None) => Err(format!(
            "{CALL}: key file {} holds no private key (expected PEM \"PRIVATE KEY\", \
             \"RSA PRIVATE KEY\", \"EC PRIVATE KEY\" or \"ENCRYPTED PRIVATE KEY\")",
            path.display()
        )),
        Err(e) => Err(format!(
            "{CALL}: key file {} is not valid PEM: {e}",
            path.display()
        )),
    }
}

/// The first `-----BEGIN label-----` … `-----END label-----` block of `text`, markers included.
fn pem_block<'a>(text: &'a str, label: &str) -> Option<&'a str> {
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let start = text.find(&begin)?;
    let stop = text[start..].find(&end)? + start + end.len();
    Some(&text[start..stop])
}

fn decrypt_private_key(
    path: &Path,
    block: &str,
    password: Option<&Secret>,
) -> Result<PrivateKeyDer<'static>, String> {
    let Some(password) = password else {
        return Err(format!(
            "{CALL}: key file {} is encrypted; give its password",
            path.display()
        ));
    };
    let (_, der) = pkcs8::der::pem::decode_vec(block.as_bytes())
        .map_err(|e| format!("{CALL}: key file {} is not valid PEM: {e}", path.display()))?;
    let encrypted = EncryptedPrivateKeyInfoRef::try_from(der.as_slice()).map_err(|e| {
        format!(
            "{CALL}: key file {} is not a valid encrypted PKCS#8 key: {e}",
            path.display()
        )
    })?;
    let plain = encrypted
        .decrypt(password.0.as_bytes())
        .map_err(|e| match e {
            pkcs8::Error::EncryptedPrivateKey(
                pkcs8::pkcs5::Error::UnsupportedAlgorithm { .. }
                | pkcs8::pkcs5::Error::NoPbes1CryptSupport,
            ) => format!(
                "{CALL}: key file {} is encrypted with an unsupported scheme; re-encrypt it with \
             `openssl pkcs8 -topk8 -v2 aes-256-cbc -in KEY -out NEW.key`",
                path.display()
            ),
            _ => format!("{CALL}: wrong password for key file {}", path.display()),
        })?;
    Ok(PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
        plain.as_bytes().to_vec(),
    )))
}

/// `SetTlsInsecure(true)`: full WebPKI verification, except that a certificate issued for
/// another name is accepted. rustls checks the chain before the name, so a
/// `NotValidForName` error means the chain itself was trusted.
#[derive(Debug)]
struct NoHostnameCheck {
    inner: Arc<WebPkiServerVerifier>,
}

impl NoHostnameCheck {
    fn new(roots: Arc<RootCertStore>, provider: Arc<CryptoProvider>) -> Result<Self, String> {
        let inner = WebPkiServerVerifier::builder_with_provider(roots, provider)
            .build()
            .map_err(|e| format!("{CALL}: cannot build the certificate verifier: {e}"))?;
        Ok(NoHostnameCheck { inner })
    }
}

impl ServerCertVerifier for NoHostnameCheck {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, TlsError> {
        match self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        ) {
            Err(TlsError::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    struct Files {
        dir: tempfile::TempDir,
    }

    impl Files {
        /// A CA, a client certificate signed by it, its key in plain PKCS#8 and encrypted
        /// with "hunter2", and an unrelated key.
        fn new() -> Files {
            let dir = tempfile::tempdir().unwrap();
            let ca_key = rcgen::KeyPair::generate().unwrap();
            let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
            ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            let ca = ca_params.self_signed(&ca_key).unwrap();
            let issuer = rcgen::Issuer::new(ca_params, ca_key);

            let client_key = rcgen::KeyPair::generate().unwrap();
            let client = rcgen::CertificateParams::new(vec!["client".to_string()])
                .unwrap()
                .signed_by(&client_key, &issuer)
                .unwrap();
            let other_key = rcgen::KeyPair::generate().unwrap();

            let info = pkcs8::PrivateKeyInfoRef::try_from(client_key.serialized_der()).unwrap();
            let params = pkcs8::pkcs5::pbes2::Parameters::generate_pbkdf2_sha256_aes256cbc(
                2048, &[7u8; 16], [9u8; 16],
            )
            .unwrap();
            let encrypted = info.encrypt_with_params(params, "hunter2").unwrap();
            let encrypted_pem = encrypted
                .to_pem("ENCRYPTED PRIVATE KEY", pkcs8::LineEnding::LF)
                .unwrap();

            let p = dir.path();
            fs::write(p.join("ca.pem"), ca.pem()).unwrap();
            fs::write(p.join("client.pem"), client.pem()).unwrap();
            fs::write(p.join("client.key"), client_key.serialize_pem()).unwrap();
            fs::write(p.join("client.enc.key"), encrypted_pem.as_bytes()).unwrap();
            fs::write(p.join("other.key"), other_key.serialize_pem()).unwrap();
            fs::write(p.join("empty.pem"), "nothing here\n").unwrap();
            Files { dir }
        }

        fn path(&self, name: &str) -> PathBuf {
            self.dir.path().join(name)
        }

        fn tls(
            &self,
            ca: &str,
            cert: Option<&str>,
            key: Option<&str>,
            pw: Option<&str>,
        ) -> TlsFiles {
            TlsFiles {
                ca: Some(self.path(ca)),
                cert: cert.map(|c| self.path(c)),
                key: key.map(|k| self.path(k)),
                key_password: pw.map(|p| Secret(p.to_string())),
            }
        }
    }

    fn error_of(files: &TlsFiles) -> String {
        match build_client_config(files, false) {
            Ok(_) => panic!("expected an error for {files:?}"),
            Err(e) => e,
        }
    }

    #[test]
    fn a_missing_ca_file_is_named_with_the_os_reason() {
        let files = TlsFiles {
            ca: Some(PathBuf::from("/nonexistent/ca.pem")),
            ..TlsFiles::default()
        };
        assert_eq!(
            error_of(&files),
            "SetTlsCertificates: cannot read CA file /nonexistent/ca.pem: \
             No such file or directory (os error 2)"
        );
    }

    #[test]
    fn a_ca_file_without_certificates_is_refused() {
        let f = Files::new();
        let e = error_of(&f.tls("empty.pem", None, None, None));
        assert!(
            e.contains("CA file") && e.contains("holds no certificate"),
            "{e}"
        );
        assert!(e.contains("empty.pem"), "{e}");
    }

    #[test]
    fn ca_only_and_mutual_tls_build() {
        let f = Files::new();
        assert!(build_client_config(&f.tls("ca.pem", None, None, None), false).is_ok());
        let mtls = f.tls("ca.pem", Some("client.pem"), Some("client.key"), None);
        let config = build_client_config(&mtls, false).unwrap();
        assert!(config.client_auth_cert_resolver.has_certs());
        let insecure = build_client_config(&mtls, true).unwrap();
        assert!(insecure.client_auth_cert_resolver.has_certs());
    }

    #[test]
    fn a_certificate_without_a_key_or_the_reverse_is_an_error() {
        let f = Files::new();
        let e = error_of(&f.tls("ca.pem", Some("client.pem"), None, None));
        assert!(e.contains("without a key file"), "{e}");
        let e = error_of(&f.tls("ca.pem", None, Some("client.key"), None));
        assert!(e.contains("without a certificate file"), "{e}");
    }

    #[test]
    fn an_encrypted_key_needs_its_password_and_the_right_one() {
        let f = Files::new();
        let e = error_of(&f.tls("ca.pem", Some("client.pem"), Some("client.enc.key"), None));
        assert!(
            e.ends_with("client.enc.key is encrypted; give its password"),
            "{e}"
        );
        let e = error_of(&f.tls(
            "ca.pem",
            Some("client.pem"),
            Some("client.enc.key"),
            Some("wrong"),
        ));
        assert!(
            e.contains("wrong password for key file") && e.contains("client.enc.key"),
            "{e}"
        );
        let ok = f.tls(
            "ca.pem",
            Some("client.pem"),
            Some("client.enc.key"),
            Some("hunter2"),
        );
        assert!(build_client_config(&ok, false).is_ok());
    }

    #[test]
    fn devices_and_folders_are_refused_without_reading_them() {
        let f = Files::new();
        let zero = TlsFiles {
            ca: Some("/dev/zero".into()),
            ..Default::default()
        };
        let e = build_client_config(&zero, false).expect_err("refused");
        assert!(e.contains("/dev/zero is not a regular file"), "{e}");
        let dir = TlsFiles {
            ca: Some(f.path("")),
            ..Default::default()
        };
        assert!(build_client_config(&dir, false).is_err());
    }

    #[test]
    fn a_key_of_another_certificate_is_refused() {
        let f = Files::new();
        let e = error_of(&f.tls("ca.pem", Some("client.pem"), Some("other.key"), None));
        assert!(e.contains("does not belong to certificate file"), "{e}");
    }

    #[test]
    fn a_file_that_is_not_a_key_or_a_certificate_is_refused() {
        let f = Files::new();
        let e = error_of(&f.tls("ca.pem", Some("client.pem"), Some("empty.pem"), None));
        assert!(e.contains("holds no private key"), "{e}");
        let e = error_of(&f.tls("ca.pem", Some("client.key"), Some("client.key"), None));
        assert!(
            e.contains("certificate file") && e.contains("holds no certificate"),
            "{e}"
        );
    }

    #[test]
    fn a_legacy_encrypted_key_gets_the_conversion_command() {
        let f = Files::new();
        fs::write(
            f.path("legacy.key"),
            "-----BEGIN RSA PRIVATE KEY-----\nProc-Type: 4,ENCRYPTED\n\
             DEK-Info: AES-256-CBC,00\n\nAAAA\n-----END RSA PRIVATE KEY-----\n",
        )
        .unwrap();
        let e = error_of(&f.tls("ca.pem", Some("client.pem"), Some("legacy.key"), Some("x")));
        assert!(e.contains("openssl pkcs8 -topk8"), "{e}");
    }
}
