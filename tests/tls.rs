//! `build_client_config` against a real Mosquitto TLS listener: a raw tokio-rustls
//! handshake followed by an MQTT 3.1.1 CONNECT/CONNACK exchange proves each
//! configuration end to end, without the MQTT worker.

mod common;

use bytes::BytesMut;
use common::certs::{self, CLIENT_KEY_PASSWORD, TestCerts};
use common::mosquitto::{Mosquitto, MosquittoConfig};
use luadriver::mqtt::Secret;
use luadriver::mqtt::tls::{TlsFiles, build_client_config};
use rumqttc::mqttbytes::v4::{Connect, ConnectReturnCode, Packet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::ClientConfig;
use tokio_rustls::rustls::pki_types::ServerName;

/// A Mosquitto TLS listener presenting `cert`/`key`, trusting `certs.ca` for clients.
fn tls_broker(certs: &TestCerts, cert: &Path, key: &Path, require_client_cert: bool) -> Mosquitto {
    let mut listener_extra = vec![
        format!("cafile {}", certs.ca.display()),
        format!("certfile {}", cert.display()),
        format!("keyfile {}", key.display()),
    ];
    if require_client_cert {
        listener_extra.push("require_certificate true".to_string());
    }
    Mosquitto::start_with(MosquittoConfig {
        listener_extra,
        ..MosquittoConfig::default()
    })
}

fn files(ca: &Path, client: Option<(&Path, &Path)>, password: Option<&str>) -> TlsFiles {
    TlsFiles {
        ca: Some(ca.to_path_buf()),
        cert: client.map(|(cert, _)| cert.to_path_buf()),
        key: client.map(|(_, key)| key.to_path_buf()),
        key_password: password.map(|p| Secret(p.to_string())),
    }
}

/// TLS handshake to 127.0.0.1:`port` as `server_name`, then CONNECT; `Ok` once the broker
/// accepts with CONNACK 0. Every error is the text a user would see.
async fn tls_connect(
    port: u16,
    config: Arc<ClientConfig>,
    server_name: &str,
) -> Result<(), String> {
    let exchange = async {
        let tcp = TcpStream::connect(("127.0.0.1", port))
            .await
            .map_err(|e| format!("tcp: {e}"))?;
        let name = ServerName::try_from(server_name.to_string()).map_err(|e| e.to_string())?;
        let mut tls = TlsConnector::from(config)
            .connect(name, tcp)
            .await
            .map_err(|e| format!("handshake: {e}"))?;

        let mut out = BytesMut::new();
        Connect::new("tls-test")
            .write(&mut out)
            .map_err(|e| format!("encode: {e:?}"))?;
        tls.write_all(&out)
            .await
            .map_err(|e| format!("write: {e}"))?;

        let mut incoming = BytesMut::new();
        loop {
            match Packet::read(&mut incoming, 1024) {
                Ok(Packet::ConnAck(ack)) if ack.code == ConnectReturnCode::Success => return Ok(()),
                Ok(other) => return Err(format!("unexpected reply: {other:?}")),
                Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {}
                Err(e) => return Err(format!("decode: {e:?}")),
            }
            let read = tls
                .read_buf(&mut incoming)
                .await
                .map_err(|e| format!("read: {e}"))?;
            if read == 0 {
                return Err("read: the broker closed the connection".to_string());
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(5), exchange)
        .await
        .map_err(|_| "no CONNACK within 5 s".to_string())?
}

struct Setup {
    dir: tempfile::TempDir,
    certs: TestCerts,
}

fn setup() -> Option<Setup> {
    if !Mosquitto::available() {
        eprintln!("skipped: mosquitto not on PATH");
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let certs = certs::generate(dir.path());
    Some(Setup { dir, certs })
}

#[tokio::test]
async fn a_ca_file_alone_connects_by_ip_and_by_name() {
    let Some(setup) = setup() else { return };
    let c = &setup.certs;
    let broker = tls_broker(c, &c.server_cert, &c.server_key, false);
    let config = build_client_config(&files(&c.ca, None, None), false).unwrap();
    tls_connect(broker.port, config.clone(), "127.0.0.1")
        .await
        .unwrap();
    tls_connect(broker.port, config, "localhost").await.unwrap();
}

#[tokio::test]
async fn the_wrong_ca_fails_with_a_readable_error_even_when_insecure() {
    let Some(setup) = setup() else { return };
    let c = &setup.certs;
    let broker = tls_broker(c, &c.server_cert, &c.server_key, false);
    for insecure in [false, true] {
        let config = build_client_config(&files(&c.other_ca, None, None), insecure).unwrap();
        let error = tls_connect(broker.port, config, "127.0.0.1")
            .await
            .unwrap_err();
        assert!(
            error.contains("invalid peer certificate") && error.contains("UnknownIssuer"),
            "insecure={insecure}: {error}"
        );
    }
}

#[tokio::test]
async fn a_certificate_for_another_name_fails_unless_insecure() {
    let Some(setup) = setup() else { return };
    let c = &setup.certs;
    let broker = tls_broker(c, &c.wrong_name_cert, &c.wrong_name_key, false);

    let strict = build_client_config(&files(&c.ca, None, None), false).unwrap();
    let error = tls_connect(broker.port, strict, "127.0.0.1")
        .await
        .unwrap_err();
    assert!(error.contains("not valid for name"), "{error}");

    let insecure = build_client_config(&files(&c.ca, None, None), true).unwrap();
    tls_connect(broker.port, insecure, "127.0.0.1")
        .await
        .unwrap();
}

#[tokio::test]
async fn mutual_tls_works_with_a_plain_and_an_encrypted_key() {
    let Some(setup) = setup() else { return };
    let c = &setup.certs;
    let broker = tls_broker(c, &c.server_cert, &c.server_key, true);

    let plain = files(&c.ca, Some((&c.client_cert, &c.client_key)), None);
    let config = build_client_config(&plain, false).unwrap();
    tls_connect(broker.port, config, "127.0.0.1").await.unwrap();

    let encrypted = files(
        &c.ca,
        Some((&c.client_cert, &c.client_key_encrypted)),
        Some(CLIENT_KEY_PASSWORD),
    );
    let config = build_client_config(&encrypted, false).unwrap();
    tls_connect(broker.port, config, "127.0.0.1").await.unwrap();
}

#[tokio::test]
async fn a_broker_that_requires_a_client_certificate_refuses_a_client_without_one() {
    let Some(setup) = setup() else { return };
    let c = &setup.certs;
    let broker = tls_broker(c, &c.server_cert, &c.server_key, true);
    let config = build_client_config(&files(&c.ca, None, None), false).unwrap();
    let error = tls_connect(broker.port, config, "127.0.0.1")
        .await
        .unwrap_err();
    assert!(
        error.starts_with("handshake:") || error.starts_with("read:"),
        "{error}"
    );
}

/// The real-world case: a key encrypted by the `openssl` command line tool, as its users
/// make them, rather than by the same library that decrypts it.
#[tokio::test]
async fn a_key_encrypted_by_openssl_is_accepted() {
    let Some(setup) = setup() else { return };
    let c = &setup.certs;
    let openssl_key: PathBuf = setup.dir.path().join("client.openssl.key");
    let status = std::process::Command::new("openssl")
        .args(["pkcs8", "-topk8", "-v2", "aes-256-cbc", "-in"])
        .arg(&c.client_key)
        .arg("-out")
        .arg(&openssl_key)
        .args(["-passout", "pass:s3cret"])
        .status();
    match status {
        Ok(s) if s.success() => {}
        _ => {
            eprintln!("skipped: no working openssl command");
            return;
        }
    }
    let broker = tls_broker(c, &c.server_cert, &c.server_key, true);
    let good = files(&c.ca, Some((&c.client_cert, &openssl_key)), Some("s3cret"));
    let config = build_client_config(&good, false).unwrap();
    tls_connect(broker.port, config, "127.0.0.1").await.unwrap();

    let bad = files(&c.ca, Some((&c.client_cert, &openssl_key)), Some("nope"));
    let error = build_client_config(&bad, false).unwrap_err();
    assert!(error.contains("wrong password for key file"), "{error}");
}
