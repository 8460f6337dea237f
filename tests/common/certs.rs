//! Certificates made at test time (rcgen, ECDSA P-256), written as PEM files into a
//! folder of the test's choosing, so no key material lives in the repository.
//!
//! In: a folder. Out: [`TestCerts`], the paths of a CA, server certificates (one for
//! 127.0.0.1 and localhost, one for a wrong name), a client certificate with its key in
//! plain and password-encrypted PKCS#8, and an unrelated CA that trusts none of them.

use std::path::{Path, PathBuf};

pub const CLIENT_KEY_PASSWORD: &str = "correct horse battery staple";

#[derive(Debug, Clone)]
pub struct TestCerts {
    /// The CA that signed every certificate below.
    pub ca: PathBuf,
    /// A CA that signed none of them.
    pub other_ca: PathBuf,
    /// Valid for 127.0.0.1 and localhost.
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    /// Valid only for `wrong.example`.
    pub wrong_name_cert: PathBuf,
    pub wrong_name_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    /// `client_key` encrypted (PBES2, PBKDF2-SHA256, AES-256-CBC) with [`CLIENT_KEY_PASSWORD`].
    pub client_key_encrypted: PathBuf,
}

pub fn generate(dir: &Path) -> TestCerts {
    use rcgen::{
        BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose,
        IsCa, Issuer, KeyPair, KeyUsagePurpose,
    };

    fn named(common_name: &str, sans: Vec<String>) -> CertificateParams {
        let mut params = CertificateParams::new(sans).expect("certificate params");
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, common_name);
        params.distinguished_name = dn;
        params
    }
    fn ca(common_name: &str) -> CertificateParams {
        let mut params = named(common_name, Vec::new());
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params
    }
    let write = |name: &str, contents: &str| -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, contents).expect("write a PEM file");
        path
    };

    let ca_key = KeyPair::generate().expect("CA key");
    let ca_params = ca("luadriver test CA");
    let ca_cert = ca_params.self_signed(&ca_key).expect("CA certificate");
    let issuer = Issuer::new(ca_params, ca_key);

    let other_key = KeyPair::generate().expect("other CA key");
    let other_cert = ca("luadriver unrelated CA")
        .self_signed(&other_key)
        .expect("other CA certificate");

    let leaf = |common_name: &str, sans: Vec<String>, usage: ExtendedKeyUsagePurpose| {
        let key = KeyPair::generate().expect("leaf key");
        let mut params = named(common_name, sans);
        params.extended_key_usages = vec![usage];
        let cert = params.signed_by(&key, &issuer).expect("leaf certificate");
        (cert, key)
    };
    let (server, server_key) = leaf(
        "localhost",
        vec!["127.0.0.1".to_string(), "localhost".to_string()],
        ExtendedKeyUsagePurpose::ServerAuth,
    );
    let (wrong, wrong_key) = leaf(
        "wrong.example",
        vec!["wrong.example".to_string()],
        ExtendedKeyUsagePurpose::ServerAuth,
    );
    let (client, client_key) = leaf(
        "luadriver test client",
        vec!["client.example".to_string()],
        ExtendedKeyUsagePurpose::ClientAuth,
    );

    let info = pkcs8::PrivateKeyInfoRef::try_from(client_key.serialized_der())
        .expect("client key as PKCS#8");
    let salt: [u8; 16] = rand::random();
    let iv: [u8; 16] = rand::random();
    let params =
        pkcs8::pkcs5::pbes2::Parameters::generate_pbkdf2_sha256_aes256cbc(10_000, &salt, iv)
            .expect("PBES2 parameters");
    let encrypted = info
        .encrypt_with_params(params, CLIENT_KEY_PASSWORD)
        .expect("encrypt the client key")
        .to_pem("ENCRYPTED PRIVATE KEY", pkcs8::LineEnding::LF)
        .expect("encrypted key as PEM");

    TestCerts {
        ca: write("ca.pem", &ca_cert.pem()),
        other_ca: write("other-ca.pem", &other_cert.pem()),
        server_cert: write("server.pem", &server.pem()),
        server_key: write("server.key", &server_key.serialize_pem()),
        wrong_name_cert: write("wrong-name.pem", &wrong.pem()),
        wrong_name_key: write("wrong-name.key", &wrong_key.serialize_pem()),
        client_cert: write("client.pem", &client.pem()),
        client_key: write("client.key", &client_key.serialize_pem()),
        client_key_encrypted: write("client.enc.key", &encrypted),
    }
}
