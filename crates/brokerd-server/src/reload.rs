//! Configuration reloads: what a new configuration changes on a running broker, without
//! dropping a connection.
//!
//! `main.rs` reads the file again on SIGHUP, applies the same flags and environment as at
//! start-up, validates the result, and hands it to [`ReloadHandle::reload`]; a file that does not
//! load never gets here, so the configuration in force stays. What applies at once:
//! - `limits.max_payload` and `limits.max_subs_per_connection`, to every connection;
//! - `limits.max_connections`, `max_handshakes` and `max_connections_per_address`, to new
//!   connections (a lower limit never closes an admitted one);
//! - `outbound.*`, `limits.max_frame`, `limits.min_frame_rate` and `timeouts.*`, to
//!   connections made from now on (`timeouts.shutdown_grace` at the next shutdown);
//! - `[auth]`: new logins use the new users and token at once. A connected user whose rules
//!   changed gets them at once (subscriptions they no longer allow end with a notice); one whose
//!   user was removed, or whose password hash or certificate changed, is closed with
//!   `authentication-failed`, as is every connection without a user when the token changed or
//!   authentication became required;
//! - `log_level`, which `main.rs` applies to the log filter itself.
//!
//! The rest (`listen`, `http`, `log_format`, `[tls]` paths, `[routing]`, `limits.max_memory`, the
//! topic limits, `data_dir` and `[[streams]]`) keeps its old value until a restart, and the reload says so. The TLS
//! certificate's contents are reloaded on their own when the files change.
//!
//! Cost: one pass over the connections when `[auth]` changed, taking each client's handle from
//! a snapshot of the client map (the map's lock is not held while permissions change), plus one
//! argon2 hash on the blocking pool when users exist and the dummy hash is not already known.

use crate::auth::Authenticator;
use crate::config::Config;
use crate::server::Shared;
use brokerd_core::CloseReason;
use std::collections::BTreeMap;
use std::sync::Arc;

/// Keys, or sections, that keep their old value until a restart.
const NEED_RESTART: &[&str] = &[
    "listen",
    "http",
    "log_format",
    "limits.max_memory",
    "limits.max_topic_len",
    "limits.max_topic_tokens",
    "routing",
    "tls",
    // Streams are opened from their directory at start-up; a reload neither moves them nor
    // opens or closes declared ones (streams made at run time go through the protocol).
    "data_dir",
    "streams",
];

/// Whether a change to `key` waits for a restart.
fn needs_restart(key: &str) -> bool {
    NEED_RESTART
        .iter()
        .any(|r| key == *r || key.starts_with(&format!("{r}.")))
}

/// What a reload changed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Reloaded {
    /// Keys whose new values are in force, dotted (`limits.max_payload`, `auth.users`).
    pub applied: Vec<String>,
    /// Keys whose new values wait for a restart; their old values stay in force.
    pub need_restart: Vec<String>,
    /// Connections whose permissions changed.
    pub permissions_changed: usize,
    /// Subscriptions ended because the new permissions no longer allow them.
    pub subscriptions_ended: usize,
    /// Connections closed because their credentials are no longer valid.
    pub closed: usize,
}

/// Applies a new configuration to a running server. Cloning is cheap.
#[derive(Clone)]
pub struct ReloadHandle(pub(crate) Arc<Shared>);

impl std::fmt::Debug for ReloadHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ReloadHandle")
    }
}

impl ReloadHandle {
    /// The configuration in force.
    pub fn config(&self) -> Arc<Config> {
        self.0.config.load_full()
    }

    /// Puts `new`, already validated, in force as far as a running server can (the module
    /// documentation lists what waits for a restart).
    pub async fn reload(&self, mut new: Config) -> Reloaded {
        let shared = &self.0;
        let old = shared.config.load_full();
        let changed = changed_keys(&old, &new);
        let (need_restart, applied): (Vec<String>, Vec<String>) =
            changed.into_iter().partition(|k| needs_restart(k));
        new.listen = old.listen;
        new.http = old.http;
        new.log_format = old.log_format;
        new.limits.max_memory = old.limits.max_memory;
        new.limits.max_topic_len = old.limits.max_topic_len;
        new.limits.max_topic_tokens = old.limits.max_topic_tokens;
        new.routing = old.routing.clone();
        new.tls = old.tls.clone();
        new.data_dir = old.data_dir.clone();
        new.streams = old.streams.clone();

        shared.broker.set_limits(new.broker_limits());
        shared.gate.set_limits(
            new.limits.max_handshakes,
            new.limits.max_connections,
            new.limits.max_connections_per_address,
        );
        let mut report = Reloaded {
            applied,
            need_restart,
            ..Reloaded::default()
        };
        if old.auth != new.auth || old.auth.token != new.auth.token {
            let previous = shared.auth.load_full();
            let config = new.auth.clone();
            // Building it may hash (the dummy password), which belongs off the I/O threads.
            let auth = match tokio::task::spawn_blocking(move || {
                Authenticator::reloaded(&config, &previous)
            })
            .await
            {
                Ok(a) => a,
                Err(_) => Authenticator::reloaded(&new.auth, &shared.auth.load_full()),
            };
            let auth = Arc::new(auth);
            shared.auth.store(auth.clone());
            apply_auth(shared, &old, &new, &auth, &mut report);
        }
        shared.config.store(Arc::new(new));
        report
    }
}

/// Gives every connected user its new permissions, and closes the connections whose
/// credentials the new `[auth]` would no longer accept.
fn apply_auth(
    shared: &Shared,
    old: &Config,
    new: &Config,
    auth: &Authenticator,
    report: &mut Reloaded,
) {
    let token_changed =
        new.auth.required() && (!old.auth.required() || old.auth.token != new.auth.token);
    let credentials_changed = |name: &str| {
        let before = old.auth.users.iter().find(|u| u.name == name);
        let after = new.auth.users.iter().find(|u| u.name == name);
        match (before, after) {
            (Some(b), Some(a)) => {
                b.password_hash != a.password_hash || b.certificate != a.certificate
            }
            _ => true,
        }
    };
    for client in shared.broker.clients() {
        let close = match client.identity.user.as_deref() {
            None => token_changed,
            Some(name) => credentials_changed(name),
        };
        if close {
            client.outbox.close(
                CloseReason::AuthenticationFailed(
                    "credentials no longer accepted after a configuration reload",
                ),
                false,
            );
            report.closed += 1;
            continue;
        }
        let Some(name) = client.identity.user.as_deref() else {
            continue;
        };
        let Some(identity) = auth.user(name) else {
            continue;
        };
        if client.permissions() != identity.permissions {
            report.subscriptions_ended += shared
                .broker
                .set_permissions(&client, identity.permissions.clone());
            report.permissions_changed += 1;
        }
    }
}

/// The dotted keys whose values differ between `old` and `new` (a table array such as
/// `auth.users` counts as one key).
fn changed_keys(old: &Config, new: &Config) -> Vec<String> {
    let (a, b) = (flatten(old), flatten(new));
    let mut keys: Vec<String> = a
        .keys()
        .chain(b.keys())
        .filter(|k| a.get(*k) != b.get(*k))
        .cloned()
        .collect();
    keys.sort();
    keys.dedup();
    // Never serialized, so compared apart.
    if old.auth.token != new.auth.token {
        keys.push("auth.token".into());
    }
    keys
}

fn flatten(config: &Config) -> BTreeMap<String, toml::Value> {
    fn walk(prefix: &str, value: toml::Value, out: &mut BTreeMap<String, toml::Value>) {
        match value {
            toml::Value::Table(t) => {
                for (k, v) in t {
                    let key = if prefix.is_empty() {
                        k
                    } else {
                        format!("{prefix}.{k}")
                    };
                    walk(&key, v, out);
                }
            }
            other => {
                out.insert(prefix.to_string(), other);
            }
        }
    }
    let mut out = BTreeMap::new();
    if let Ok(table) = toml::from_str::<toml::Table>(&config.to_toml()) {
        walk("", toml::Value::Table(table), &mut out);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changed_keys_are_dotted_and_include_the_token() {
        let old = Config::default();
        let mut new = Config::default();
        new.limits.max_payload = 1000;
        new.routing.match_cache = 7;
        new.auth.token = Some("t".into());
        assert_eq!(
            changed_keys(&old, &new),
            vec![
                "limits.max_payload".to_string(),
                "routing.match_cache".to_string(),
                "auth.token".to_string()
            ]
        );
        assert!(changed_keys(&old, &old.clone()).is_empty());
    }

    #[test]
    fn where_streams_live_waits_for_a_restart() {
        let old = Config::default();
        let new = Config {
            data_dir: "/elsewhere".into(),
            streams: vec![brokerd_proto::streams::StreamConfig {
                name: "ORDERS".into(),
                filters: vec!["orders.>".into()],
                ..Default::default()
            }],
            log_level: "debug".into(),
            ..Config::default()
        };
        let (restart, applied): (Vec<String>, Vec<String>) = changed_keys(&old, &new)
            .into_iter()
            .partition(|k| needs_restart(k));
        assert_eq!(restart, vec!["data_dir".to_string(), "streams".to_string()]);
        assert_eq!(applied, vec!["log_level".to_string()]);
    }
}
