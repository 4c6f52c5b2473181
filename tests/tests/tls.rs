//! TLS end to end: certificates made in the test (rcgen), a real broker on `127.0.0.1:0`, the
//! real client. TLS alone and beside a plain listener; mutual TLS with a certificate mapped to a
//! user; each side told clearly when the other speaks the wrong transport; a certificate
//! replaced on disk is served to new connections without dropping the open ones.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use brokerd_client::{Client, ConnectOptions, Error, TlsOptions};
use brokerd_proto::ErrorCode;
use brokerd_server::config::{RulesConfig, UserConfig};
use brokerd_tests::pki::{TestCa, temp_dir};
use brokerd_tests::{TestBroker, wait_until};
use std::net::SocketAddr;

fn tls_to(ca: &TestCa) -> TlsOptions {
    TlsOptions::new(&ca.cert, "localhost").unwrap()
}

async fn connect(addr: SocketAddr, options: ConnectOptions) -> Result<Client, Error> {
    Client::connect(addr, options).await
}

#[tokio::test]
async fn a_tls_listener_alone_and_beside_a_plain_one() {
    let dir = temp_dir("listeners");
    let ca = TestCa::new(&dir, "main");
    let server = ca.issue("server", &["localhost", "127.0.0.1"]);

    // `listen` itself speaks TLS.
    let b = TestBroker::with_config(|c| {
        c.tls.cert = Some(server.cert.clone());
        c.tls.key = Some(server.key.clone());
    })
    .await;
    let client = connect(b.addr, ConnectOptions::new("t").tls(tls_to(&ca)))
        .await
        .unwrap();
    let mut sub = client.subscribe("secure.>").await.unwrap();
    assert_eq!(client.publish("secure.x", b"hi").acked().await.unwrap(), 1);
    assert_eq!(&sub.next().await.unwrap().payload()[..], b"hi");
    // A plain client is told, in a frame it can read, that this port needs TLS.
    let e = connect(b.addr, ConnectOptions::new("plain"))
        .await
        .unwrap_err();
    match &e {
        Error::Server { code, message } => {
            assert_eq!(*code, ErrorCode::HandshakeRequired);
            assert!(message.contains("requires TLS"), "{message}");
        }
        other => panic!("expected the server's ERR, got {other:?}"),
    }
    assert_eq!(b.closes("wrong-transport"), 1);
    b.stop().await;

    // Side by side: plain on `listen`, TLS on `tls.listen`, one broker behind both.
    let b = TestBroker::with_config(|c| {
        c.tls.cert = Some(server.cert.clone());
        c.tls.key = Some(server.key.clone());
        c.tls.listen = Some("127.0.0.1:0".parse().unwrap());
    })
    .await;
    let tls_addr = b.tls_addr.unwrap();
    let secure = connect(tls_addr, ConnectOptions::new("s").tls(tls_to(&ca)))
        .await
        .unwrap();
    let plain = connect(b.addr, ConnectOptions::new("p")).await.unwrap();
    let mut sub = secure.subscribe("mixed").await.unwrap();
    assert_eq!(plain.publish("mixed", b"across").acked().await.unwrap(), 1);
    assert_eq!(&sub.next().await.unwrap().payload()[..], b"across");
    // TLS to the plain port: the client's error says what is wrong.
    let e = connect(b.addr, ConnectOptions::new("t").tls(tls_to(&ca)))
        .await
        .unwrap_err();
    assert!(
        matches!(&e, Error::Tls(text) if text.contains("plain port")),
        "{e:?}"
    );
    wait_until("the server to count the wrong transport", || {
        b.closes("wrong-transport") == 1
    })
    .await;
    // A certificate from a CA the client does not trust is refused by the client.
    let stranger = TestCa::new(&dir, "stranger");
    let e = connect(tls_addr, ConnectOptions::new("t").tls(tls_to(&stranger)))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Tls(_)), "{e:?}");
    b.stop().await;
}

#[tokio::test]
async fn mutual_tls_maps_a_certificate_to_a_user_and_refuses_the_rest() {
    let dir = temp_dir("mutual");
    let ca = TestCa::new(&dir, "main");
    let clients_ca = TestCa::new(&dir, "clients");
    let stranger = TestCa::new(&dir, "stranger");
    let server = ca.issue("server", &["localhost"]);
    let orders = clients_ca.issue("orders", &["orders.svc.internal"]);
    let unknown = clients_ca.issue("unknown", &["nobody.svc.internal"]);
    let forged = stranger.issue("forged", &["orders.svc.internal"]);
    let b = TestBroker::with_config(|c| {
        c.tls.cert = Some(server.cert.clone());
        c.tls.key = Some(server.key.clone());
        c.tls.client_ca = Some(clients_ca.cert.clone());
        c.auth.users = vec![UserConfig {
            name: "orders".into(),
            password_hash: brokerd_server::auth::hash_password("pw").unwrap(),
            certificate: Some("orders.svc.internal".into()),
            publish: RulesConfig {
                allow: Some(vec!["orders.>".into()]),
                deny: vec![],
            },
            ..UserConfig::default()
        }];
    })
    .await;
    let with_cert = |pair: &brokerd_tests::pki::Pair| {
        TlsOptions::with_client_certificate(&ca.cert, "localhost", &pair.cert, &pair.key).unwrap()
    };
    // The certificate is the credential: no password, and the user's rules apply.
    let c = connect(b.addr, ConnectOptions::new("o").tls(with_cert(&orders)))
        .await
        .unwrap();
    assert_eq!(c.publish("orders.created", b"x").acked().await.unwrap(), 0);
    let e = c.publish("payments.x", b"x").acked().await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::PermissionDenied), "{e}");
    // A trusted certificate naming no user: credentials are still required.
    let e = connect(b.addr, ConnectOptions::new("u").tls(with_cert(&unknown)))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::AuthenticationFailed), "{e:?}");
    // ... and with the user's password it gets in.
    connect(
        b.addr,
        ConnectOptions::new("u")
            .tls(with_cert(&unknown))
            .user_password("orders", "pw"),
    )
    .await
    .unwrap();
    // No certificate, or one from another CA: the TLS handshake itself fails.
    for options in [tls_to(&ca), with_cert(&forged)] {
        let r = connect(b.addr, ConnectOptions::new("x").tls(options)).await;
        assert!(r.is_err(), "a client without a trusted certificate got in");
    }
    wait_until("the refused handshakes to be counted", || {
        b.closes("tls-failed") == 2
    })
    .await;
    b.stop().await;
}

#[tokio::test]
async fn a_replaced_certificate_is_served_without_dropping_connections() {
    let dir = temp_dir("reload");
    let old_ca = TestCa::new(&dir, "old");
    let new_ca = TestCa::new(&dir, "new");
    let server = old_ca.issue("server", &["localhost"]);
    let b = TestBroker::with_config(|c| {
        c.tls.cert = Some(server.cert.clone());
        c.tls.key = Some(server.key.clone());
    })
    .await;
    let open = connect(b.addr, ConnectOptions::new("old").tls(tls_to(&old_ca)))
        .await
        .unwrap();
    assert!(
        connect(b.addr, ConnectOptions::new("new").tls(tls_to(&new_ca)))
            .await
            .is_err()
    );
    // The same files, now holding a certificate from the new CA (mtime moves forward even on a
    // coarse clock: the file is rewritten until it does).
    let deadline = tokio::time::Instant::now() + brokerd_tests::DEADLINE;
    let before = std::fs::metadata(&server.cert).unwrap().modified().unwrap();
    loop {
        new_ca.issue("server", &["localhost"]);
        if std::fs::metadata(&server.cert).unwrap().modified().unwrap() != before {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the file's mtime never moved"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    loop {
        if connect(b.addr, ConnectOptions::new("new").tls(tls_to(&new_ca)))
            .await
            .is_ok()
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the new certificate was never served"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    // The connection made before the change still works.
    assert_eq!(open.publish("still.here", b"x").acked().await.unwrap(), 0);
    b.stop().await;
}

#[test]
fn a_key_that_is_not_the_certificates_is_refused_at_start_and_on_reload() {
    use brokerd_server::config::TlsConfig;
    use brokerd_server::tls::TlsState;
    let dir = temp_dir("mismatch");
    let ca = TestCa::new(&dir, "ca");
    let server = ca.issue("server", &["localhost"]);
    let other = ca.issue("other", &["localhost"]);
    let config = |cert: &std::path::Path, key: &std::path::Path| TlsConfig {
        cert: Some(cert.to_path_buf()),
        key: Some(key.to_path_buf()),
        ..TlsConfig::default()
    };
    // At start-up (and `--check-config`, which loads the same way): refused, naming the key.
    let e = TlsState::load(&config(&server.cert, &other.key))
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        e.contains("does not belong") && e.contains("other.key"),
        "{e:?}"
    );
    // On reload: the other certificate's key put in place of this one's is not taken.
    let state = TlsState::load(&config(&server.cert, &server.key))
        .unwrap()
        .unwrap();
    let before = std::fs::metadata(&server.key).unwrap().modified().unwrap();
    let deadline = std::time::Instant::now() + brokerd_tests::DEADLINE;
    loop {
        std::fs::copy(&other.key, &server.key).unwrap();
        if std::fs::metadata(&server.key).unwrap().modified().unwrap() != before {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the file's mtime never moved"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let e = state.reload_if_changed().err().map(|e| e.to_string());
    assert!(
        e.as_deref().is_some_and(|e| e.contains("does not belong")),
        "{e:?}"
    );
}
