//! Authentication and permissions, end to end: a real broker on `127.0.0.1:0`, the real client
//! and raw frames. Each mode accepted and rejected; a permissions matrix (allowed, denied,
//! overlapping allow and deny, wildcards, queue groups, the reply-to rule, `allow_responses`,
//! `$SYS` and the statistics); per-user quotas; and each attack issue 10 lists, now refused.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use brokerd_client::{Client, ConnectOptions, Error};
use brokerd_proto::{Credentials, ErrorCode, Frame, Hello, PROTOCOL_VERSION};
use brokerd_server::Config;
use brokerd_server::config::{AllowResponses, RulesConfig, UserConfig};
use brokerd_tests::{RawConn, TestBroker, wire};
use std::sync::OnceLock;
use std::time::Duration;

const TOKEN: &str = "a-long-shared-token-0123456789";

/// One hash for every test user: hashing is deliberately slow.
fn hash() -> String {
    static HASH: OnceLock<String> = OnceLock::new();
    HASH.get_or_init(|| brokerd_server::auth::hash_password("pw").unwrap())
        .clone()
}

fn rules(allow: Option<&[&str]>, deny: &[&str]) -> RulesConfig {
    RulesConfig {
        allow: allow.map(|a| a.iter().map(|s| s.to_string()).collect()),
        deny: deny.iter().map(|s| s.to_string()).collect(),
    }
}

fn user(name: &str) -> UserConfig {
    UserConfig {
        name: name.into(),
        password_hash: hash(),
        ..UserConfig::default()
    }
}

/// The users of the permissions matrix.
fn users() -> Vec<UserConfig> {
    vec![
        UserConfig {
            admin: true,
            ..user("admin")
        },
        // Publishes orders, reads payments and its own inbox, works in one queue group.
        UserConfig {
            publish: rules(Some(&["orders.>"]), &["orders.secret.>"]),
            subscribe: rules(
                Some(&["payments.>", "orders.>", "_INBOX.orders.>"]),
                &["orders.secret.>"],
            ),
            queue_groups: Some(vec!["orders-workers".into()]),
            ..user("orders")
        },
        // Answers requests on `svc.>` and may publish nothing else.
        UserConfig {
            publish: rules(Some(&[]), &[]),
            subscribe: rules(Some(&["svc.>"]), &[]),
            allow_responses: Some(AllowResponses::Limits {
                max: 1,
                expires: Duration::from_secs(60),
            }),
            ..user("responder")
        },
        UserConfig {
            max_connections: 1,
            max_subscriptions: 2,
            ..user("limited")
        },
    ]
}

async fn broker_with_users() -> TestBroker {
    TestBroker::with_config(|c| {
        c.auth.token = Some(TOKEN.into());
        c.auth.users = users();
    })
    .await
}

async fn connect(b: &TestBroker, options: ConnectOptions) -> Result<Client, Error> {
    Client::connect(b.addr, options).await
}

async fn as_user(b: &TestBroker, name: &str) -> Client {
    connect(
        b,
        ConnectOptions::new(name)
            .user_password(name, "pw")
            .inbox_prefix(format!("_INBOX.{name}")),
    )
    .await
    .unwrap_or_else(|e| panic!("{name} connects: {e}"))
}

fn server_code(e: &Error) -> Option<ErrorCode> {
    match e {
        Error::Server { code, .. } => Some(*code),
        _ => None,
    }
}

fn assert_denied(r: Result<impl std::fmt::Debug, Error>, rule: &str) {
    match r {
        Err(Error::Server { code, message }) => {
            assert_eq!(code, ErrorCode::PermissionDenied, "{message}");
            assert!(message.contains(rule), "{message:?} should name {rule:?}");
        }
        other => panic!("expected permission-denied naming {rule:?}, got {other:?}"),
    }
}

#[tokio::test]
async fn a_token_is_accepted_and_anything_else_refused() {
    let b = TestBroker::with_config(|c| c.auth.token = Some(TOKEN.into())).await;
    let ok = connect(&b, ConnectOptions::new("t").token(TOKEN))
        .await
        .unwrap();
    assert_eq!(ok.publish("any.topic", b"x").acked().await.unwrap(), 0);
    for wrong in [
        "",
        "a-long-shared-token-012345678",
        "a-long-shared-token-01234567890",
    ] {
        let e = connect(&b, ConnectOptions::new("t").token(wrong))
            .await
            .unwrap_err();
        assert_eq!(
            server_code(&e),
            Some(ErrorCode::AuthenticationFailed),
            "{e}"
        );
        assert!(e.to_string().contains("authentication failed"), "{e}");
    }
    // No credentials: told what is needed, not left hanging.
    let e = connect(&b, ConnectOptions::new("t")).await.unwrap_err();
    assert_eq!(server_code(&e), Some(ErrorCode::AuthenticationFailed));
    assert!(e.to_string().contains("requires authentication"), "{e}");
    // A user name against a token-only server fails the same way.
    let e = connect(&b, ConnectOptions::new("t").user_password("admin", "pw"))
        .await
        .unwrap_err();
    assert_eq!(server_code(&e), Some(ErrorCode::AuthenticationFailed));
    assert_eq!(b.closes("authentication-failed"), 5);
    b.stop().await;
}

#[tokio::test]
async fn users_are_accepted_and_wrong_passwords_and_names_refused_alike() {
    let b = broker_with_users().await;
    let orders = as_user(&b, "orders").await;
    assert_eq!(
        orders
            .publish("orders.created", b"x")
            .acked()
            .await
            .unwrap(),
        0
    );
    let mut messages = Vec::new();
    for (u, p) in [("orders", "PW"), ("nobody", "pw"), ("", "")] {
        let e = connect(&b, ConnectOptions::new("x").user_password(u, p))
            .await
            .unwrap_err();
        assert_eq!(server_code(&e), Some(ErrorCode::AuthenticationFailed));
        messages.push(e.to_string());
    }
    assert!(
        messages.iter().all(|m| *m == messages[0]),
        "one generic message: {messages:?}"
    );
    b.stop().await;
}

#[tokio::test]
async fn frames_sent_behind_a_failed_hello_are_discarded_and_the_connection_closes() {
    let b = broker_with_users().await;
    let watcher = as_user(&b, "admin").await;
    let mut seen = watcher.subscribe("orders.>").await.unwrap();
    let mut c = RawConn::connect(b.addr).await;
    let mut bytes = Frame::Hello(Hello {
        req_id: 1,
        version: PROTOCOL_VERSION,
        no_echo: false,
        overflow: None,
        name: "intruder".into(),
        credentials: Some(Credentials::Password {
            user: "orders".into(),
            password: "guess".into(),
        }),
    })
    .to_bytes()
    .to_vec();
    bytes.extend(wire::publish(2, true, "orders.created", b"forged"));
    c.send_bytes(&bytes).await;
    let err = c.expect_err().await;
    assert_eq!(err.code, ErrorCode::AuthenticationFailed as u16);
    assert_eq!(err.req_id, 0);
    c.expect_closed().await;
    // Nothing was routed: the next message the watcher sees is this one.
    let admin = as_user(&b, "admin").await;
    admin.publish("orders.real", b"real").acked().await.unwrap();
    assert_eq!(seen.next().await.unwrap().topic(), "orders.real");
    b.stop().await;
}

#[tokio::test]
async fn publish_and_subscribe_rules_deny_wins_and_nothing_is_delivered() {
    let b = broker_with_users().await;
    let admin = as_user(&b, "admin").await;
    let mut everything = admin.subscribe(">").await.unwrap();
    let orders = as_user(&b, "orders").await;

    // Allowed, and its wildcard subscription inside the allow rule.
    let mut payments = orders.subscribe("payments.*").await.unwrap();
    assert_eq!(
        orders
            .publish("orders.created", b"1")
            .acked()
            .await
            .unwrap(),
        1
    );
    // Not covered by any allow rule; and denied although `orders.>` allows it.
    assert_denied(
        orders.publish("payments.completed", b"x").acked().await,
        "payments.completed",
    );
    assert_denied(
        orders.publish("orders.secret.plan", b"x").acked().await,
        "orders.secret.>",
    );
    // The same denial again comes from the connection's memo, and says the same.
    assert_denied(
        orders.publish("orders.secret.plan", b"x").acked().await,
        "orders.secret.>",
    );
    // Subscriptions: outside the allow rules, overlapping a deny rule, and `$`.
    assert_denied(orders.subscribe("users.>").await, "no allow rule");
    assert_denied(orders.subscribe(">").await, "orders.secret.>");
    assert_denied(orders.subscribe("*.created").await, "no allow rule");
    assert_denied(orders.subscribe("orders.>").await, "orders.secret.>");
    assert_denied(orders.subscribe("orders.*.plan").await, "orders.secret.>");
    assert_denied(orders.subscribe("$SYS.>").await, "admin");
    let _fine = orders.subscribe("orders.*").await.unwrap();
    // Queue groups: its own only.
    let _worker = orders
        .subscribe_queue("orders.*", "orders-workers")
        .await
        .unwrap();
    assert_denied(
        orders.subscribe_queue("payments.*", "billing").await,
        "queue groups",
    );

    // Only the allowed publish reached anyone.
    assert_eq!(everything.next().await.unwrap().topic(), "orders.created");
    admin
        .publish("payments.completed", b"p")
        .acked()
        .await
        .unwrap();
    assert_eq!(payments.next().await.unwrap().topic(), "payments.completed");
    assert_eq!(
        everything.next().await.unwrap().topic(),
        "payments.completed"
    );
    b.stop().await;
}

#[tokio::test]
async fn a_reply_to_must_be_one_the_sender_may_subscribe_to() {
    let b = broker_with_users().await;
    let orders = as_user(&b, "orders").await;
    // Into someone else's inbox, or at the broker's own topics: refused, naming the reply-to.
    assert_denied(
        orders
            .publish("orders.q", b"x")
            .reply_to("_INBOX.responder.1")
            .acked()
            .await,
        "_INBOX.responder.1",
    );
    assert_denied(
        orders
            .publish("orders.q", b"x")
            .reply_to("$SYS.req.stats")
            .acked()
            .await,
        "admin",
    );
    // Its own inbox is fine.
    assert_eq!(
        orders
            .publish("orders.q", b"x")
            .reply_to("_INBOX.orders.7")
            .acked()
            .await
            .unwrap(),
        0
    );
    b.stop().await;
}

#[tokio::test]
async fn a_responder_answers_each_request_once_and_nothing_else() {
    let b = broker_with_users().await;
    let responder = as_user(&b, "responder").await;
    let mut requests = responder.subscribe("svc.>").await.unwrap();
    let admin = as_user(&b, "admin").await;

    let asker = tokio::spawn({
        let admin = admin.clone();
        async move {
            admin
                .request("svc.time", b"now?", Duration::from_secs(10))
                .await
        }
    });
    let req = requests.next().await.unwrap();
    let reply_to = req.reply().unwrap().to_string();
    assert_eq!(
        responder
            .publish(&reply_to, b"12:00")
            .acked()
            .await
            .unwrap(),
        1
    );
    assert_eq!(&asker.await.unwrap().unwrap().payload()[..], b"12:00");
    // A second answer to the same request, and a publish anywhere else: refused.
    assert_denied(
        responder.publish(&reply_to, b"again").acked().await,
        "no allow rule",
    );
    assert_denied(
        responder
            .publish("_INBOX.admin.x.1", b"forged")
            .acked()
            .await,
        "no allow rule",
    );
    assert_denied(
        responder.publish("svc.time", b"x").acked().await,
        "no allow rule",
    );
    b.stop().await;
}

#[tokio::test]
async fn only_admins_see_other_connections_in_the_statistics() {
    let b = broker_with_users().await;
    let _admin_idle = as_user(&b, "admin").await;
    let orders = as_user(&b, "orders").await;
    let stats = |c: Client| async move {
        let m = c
            .request(
                brokerd_proto::topic::STATS_REQUEST,
                b"",
                Duration::from_secs(10),
            )
            .await
            .unwrap();
        serde_json::from_slice::<serde_json::Value>(&m.payload()).unwrap()
    };
    let own = stats(orders.clone()).await;
    assert_eq!(own["user"], "orders");
    let rows = own["clients"].as_array().unwrap();
    assert_eq!(rows.len(), 1, "{own}");
    assert!(rows.iter().all(|r| r["user"] == "orders"), "{own}");
    assert!(
        own.get("msgs_in").is_none(),
        "no server-wide figures: {own}"
    );
    let admin = as_user(&b, "admin").await;
    let all = stats(admin).await;
    let users: Vec<&str> = all["clients"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r["user"].as_str())
        .collect();
    assert!(
        users.contains(&"orders") && users.contains(&"admin"),
        "{all}"
    );
    b.stop().await;
}

#[tokio::test]
async fn per_user_connection_and_subscription_quotas() {
    let b = broker_with_users().await;
    let limited = as_user(&b, "limited").await;
    let e = connect(&b, ConnectOptions::new("x").user_password("limited", "pw"))
        .await
        .unwrap_err();
    assert_eq!(server_code(&e), Some(ErrorCode::TooManyConnections), "{e}");
    let _a = limited.subscribe("a").await.unwrap();
    let mut b_sub = limited.subscribe("b").await.unwrap();
    let e = limited.subscribe("c").await.unwrap_err();
    assert_eq!(
        server_code(&e),
        Some(ErrorCode::TooManySubscriptions),
        "{e}"
    );
    // Ending one gives its place back, and so does closing the connection.
    b_sub.unsubscribe().await.unwrap();
    let _c = limited.subscribe("c").await.unwrap();
    drop(limited);
    brokerd_tests::wait_until("the limited user's connection to end", || {
        b.broker
            .clients()
            .iter()
            .all(|c| c.identity.user.as_deref() != Some("limited"))
    })
    .await;
    let again = as_user(&b, "limited").await;
    let _d = again.subscribe("d").await.unwrap();
    let _e = again.subscribe("e").await.unwrap();
    b.stop().await;
}

#[test]
fn a_reachable_address_without_authentication_is_refused_unless_allowed() {
    let mut c = Config {
        listen: "0.0.0.0:7654".parse().unwrap(),
        ..Config::default()
    };
    let e = c.validate().unwrap_err().to_string();
    for hint in [
        "--auth-token",
        "BROKERD_AUTH_TOKEN",
        "--allow-anonymous",
        "0.0.0.0:7654",
    ] {
        assert!(e.contains(hint), "{e} should mention {hint}");
    }
    c.auth.allow_anonymous = true;
    c.validate().unwrap();
    c.auth.allow_anonymous = false;
    c.auth.token = Some(TOKEN.into());
    c.validate().unwrap();
    c.auth.token = None;
    c.auth.users = vec![user("u")];
    c.validate().unwrap();
    // Loopback needs nothing.
    c.auth.users.clear();
    c.listen = "[::1]:7654".parse().unwrap();
    c.validate().unwrap();
}

#[test]
fn bad_auth_configuration_names_the_key() {
    let cases = [
        ("[auth]\ntoken = \"\"\n", "auth.token"),
        (
            "[[auth.users]]\nname = \"u\"\npassword_hash = \"plain\"\n",
            "auth.users.password_hash",
        ),
        (
            "[[auth.users]]\nname = \"u\"\npassword_hash = \"HASH\"\n[auth.users.publish]\nallow = [\"a..b\"]\n",
            "auth.users.publish",
        ),
        (
            "[[auth.users]]\nname = \"u\"\npassword_hash = \"HASH\"\n[[auth.users]]\nname = \"u\"\npassword_hash = \"HASH\"\n",
            "defined twice",
        ),
    ];
    for (text, key) in cases {
        let text = text.replace("HASH", &hash());
        let e = Config::from_toml(&text, "t").unwrap_err().to_string();
        assert!(e.contains(key), "{e} should name {key}");
    }
    // And a good one, with a responses table.
    let text = format!(
        "[[auth.users]]\nname = \"svc\"\npassword_hash = \"{}\"\nallow_responses = {{ max = 2, expires = \"5s\" }}\n\
         queue_groups = [\"w\"]\n[auth.users.subscribe]\nallow = [\"svc.>\"]\ndeny = [\"svc.secret\"]\n",
        hash()
    );
    let c = Config::from_toml(&text, "t").unwrap();
    assert_eq!(
        c.auth.users[0].allow_responses,
        Some(AllowResponses::Limits {
            max: 2,
            expires: Duration::from_secs(5)
        })
    );
}

#[tokio::test]
async fn the_token_is_never_printed() {
    let c = Config {
        auth: brokerd_server::config::AuthConfig {
            token: Some(TOKEN.into()),
            ..Default::default()
        },
        ..Config::default()
    };
    assert!(!c.to_toml().contains(TOKEN));
    assert!(!format!("{c:?}").contains(TOKEN));
    let hello = Hello {
        req_id: 1,
        version: 1,
        no_echo: false,
        overflow: None,
        name: String::new(),
        credentials: Some(Credentials::Token(TOKEN.into())),
    };
    assert!(!format!("{hello:?}").contains(TOKEN));
}

#[tokio::test]
async fn a_durable_consumer_is_joined_only_by_its_owner_or_an_admin() {
    use brokerd_client::{ConsumerOptions, StreamConfig};
    let dir = brokerd_tests::TempDir::new("security-consumers");
    let path = dir.0.clone();
    let worker = |name: &str| UserConfig {
        subscribe: rules(Some(&["job.>", &format!("_INBOX.{name}.>")]), &[]),
        publish: rules(Some(&["job.>"]), &[]),
        ..user(name)
    };
    let b = TestBroker::with_config(move |c| {
        c.auth.token = Some(TOKEN.into());
        c.auth.users = vec![
            worker("billing"),
            worker("snoop"),
            UserConfig {
                admin: true,
                ..user("admin")
            },
        ];
        c.data_dir = path;
        c.streams = vec![StreamConfig {
            name: "JOBS".into(),
            filters: vec!["job.>".into()],
            ..StreamConfig::default()
        }];
    })
    .await;
    let jobs = || ConsumerOptions::new().filter("job.>");
    let billing = as_user(&b, "billing").await;
    let snoop = as_user(&b, "snoop").await;
    let admin = as_user(&b, "admin").await;
    let _mine = billing.consume("JOBS", "invoices", jobs()).await.unwrap();
    // Another user allowed the same topics may not join it, nor take its messages.
    assert_denied(
        snoop.consume("JOBS", "invoices", jobs()).await,
        "another user",
    );
    // Its owner may, again, and so may an admin.
    let _again = billing.consume("JOBS", "invoices", jobs()).await.unwrap();
    let _admin = admin.consume("JOBS", "invoices", jobs()).await.unwrap();
    // A consumer made with the token has no owner: any client the topics allow may join it.
    let shared = connect(&b, ConnectOptions::new("shared").token(TOKEN))
        .await
        .unwrap();
    let _open = shared.consume("JOBS", "open", jobs()).await.unwrap();
    let _joined = snoop.consume("JOBS", "open", jobs()).await.unwrap();
    // One user owns at most 64 consumers of a stream, so it cannot take all 256 places.
    let mut owned = Vec::new();
    for i in 0..64 {
        owned.push(
            snoop
                .consume("JOBS", &format!("junk{i}"), jobs())
                .await
                .unwrap(),
        );
    }
    assert_denied(
        snoop.consume("JOBS", "junk64", jobs()).await,
        "already owns",
    );
    // The others still have their places.
    let _theirs = billing.consume("JOBS", "payroll", jobs()).await.unwrap();
    // A reload that takes the admin role away applies to the connection already open.
    let mut demoted = (*b.reload.config()).clone();
    for u in &mut demoted.auth.users {
        u.admin = false;
    }
    b.reload.reload(demoted.clone()).await;
    assert_denied(
        admin.consume("JOBS", "payroll", jobs()).await,
        "another user",
    );
    drop((billing, snoop, admin, shared, owned));
    b.stop().await;
    // After a restart the owners come from the saved states, and the consumers saved before
    // count against their owners' limit.
    let b = TestBroker::with_config(move |c| *c = demoted).await;
    let billing = as_user(&b, "billing").await;
    let snoop = as_user(&b, "snoop").await;
    assert_denied(
        snoop.consume("JOBS", "invoices", jobs()).await,
        "another user",
    );
    let _mine = billing.consume("JOBS", "invoices", jobs()).await.unwrap();
    assert_denied(
        snoop.consume("JOBS", "junk65", jobs()).await,
        "already owns",
    );
    b.stop().await;
}
