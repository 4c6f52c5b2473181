//! Authentication: checks the credentials a `HELLO` carries against `[auth]` and gives the
//! connection its [`Identity`].
//!
//! A token is compared in constant time (as fixed-size BLAKE2b digests, so that not even its
//! length leaks). A password is verified with argon2id on the blocking pool, at most
//! [`VERIFY_SLOTS`] at once: each verification costs tens of milliseconds and about 19 MiB, and
//! a crowd of handshakes must not take the I/O threads or the memory with it. An unknown user is
//! verified against a dummy hash, so that the time taken does not tell which names exist. An
//! address with recent failures waits before its credentials are even looked at, 100 ms doubling
//! with each failure up to [`MAX_DELAY`], so that guessing from one address is slow and costs the
//! broker no hashing while it waits; the connection task calls this module and sends the one
//! generic `ERR`.
//!
//! Called by `connection.rs` during the handshake, within the handshake timeout. Does not decide
//! what an identity may do after that: [`brokerd_core::Permissions`] does.

use crate::config::{AllowResponses, AuthConfig, UserConfig};
use argon2::Argon2;
use argon2::password_hash::phc::PasswordHash;
use argon2::password_hash::{PasswordHasher, PasswordVerifier};
use blake2::{Blake2b512, Digest};
use brokerd_core::{Identity, Permissions, Quota, ResponsePolicy, Rules};
use brokerd_proto::Credentials;
use brokerd_proto::Filter;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use subtle::ConstantTimeEq;
use tokio::sync::Semaphore;

/// Password verifications running at once, across all connections.
pub const VERIFY_SLOTS: usize = 2;

/// The longest an attempt waits, before its credentials are checked, for its address's failures.
pub const MAX_DELAY: Duration = Duration::from_secs(2);

/// The wait after one recent failure; each further failure from the same address doubles it.
const BASE_DELAY: Duration = Duration::from_millis(100);

/// Failures older than this are forgotten.
const FAILURE_MEMORY: Duration = Duration::from_secs(600);

/// Addresses whose failures are remembered at once; the stalest go first when it is full.
const MAX_TRACKED: usize = 4096;

/// Longest memory cost accepted in a configured hash, in KiB (1 GiB): the hash's own parameters
/// decide what each verification costs.
const MAX_MEMORY_KIB: u32 = 1 << 20;

/// Longest user name or secret read from a `HELLO`; longer ones fail without being hashed.
pub const MAX_SECRET: usize = 4096;

/// Why a `HELLO` was not accepted; the client is told only [`AuthError::client_message`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthError {
    /// The server requires credentials and there were none.
    Missing,
    /// The credentials were not accepted.
    Rejected,
}

impl AuthError {
    /// The `ERR` text: the same whether the user, the password or the token was wrong.
    pub fn client_message(&self) -> &'static str {
        match self {
            AuthError::Missing => {
                "this server requires authentication: connect with a token or a user and password"
            }
            AuthError::Rejected => "authentication failed",
        }
    }
}

struct User {
    hash: String,
    identity: Identity,
}

/// The server's authentication state, built from `[auth]`.
pub struct Authenticator {
    token: Option<[u8; 64]>,
    users: HashMap<String, User>,
    /// Users by the certificate DNS name that identifies them under mutual TLS.
    by_certificate: HashMap<String, String>,
    /// Verified when the user is unknown, so that it costs what a known user costs.
    dummy: String,
    verifying: Arc<Semaphore>,
    failures: Mutex<HashMap<IpAddr, (u32, Instant)>>,
}

fn digest(secret: &str) -> [u8; 64] {
    Blake2b512::digest(secret.as_bytes()).into()
}

/// Whether `hash` is an argon2 PHC string this server can verify against.
///
/// # Errors
/// What is wrong with it.
pub fn check_hash(hash: &str) -> Result<(), String> {
    let parsed = PasswordHash::new(hash).map_err(|e| format!("not a PHC hash string ({e})"))?;
    if !parsed.algorithm.as_str().starts_with("argon2") {
        return Err(format!("algorithm {} is not argon2", parsed.algorithm));
    }
    let memory = parsed
        .params
        .get_decimal("m")
        .ok_or("the hash has no memory cost (m)")?;
    if memory > MAX_MEMORY_KIB {
        return Err(format!(
            "memory cost m={memory} KiB is above the {MAX_MEMORY_KIB} KiB this server accepts"
        ));
    }
    Ok(())
}

/// Hashes `password` with argon2id, the default parameters and a random salt, as a PHC string.
///
/// # Errors
/// The system's random source failed.
pub fn hash_password(password: &str) -> Result<String, String> {
    Argon2::default()
        .hash_password(password.as_bytes())
        .map(|h| h.to_string())
        .map_err(|e| e.to_string())
}

fn rules(r: &crate::config::RulesConfig) -> Rules {
    // Validated with the configuration: every filter parses.
    let parse =
        |v: &Vec<String>| -> Vec<Filter> { v.iter().filter_map(|f| Filter::new(f).ok()).collect() };
    Rules {
        allow: r.allow.as_ref().map(parse),
        deny: parse(&r.deny),
    }
}

fn identity(u: &UserConfig) -> Identity {
    let responses = match &u.allow_responses {
        None | Some(AllowResponses::Flag(false)) => None,
        Some(AllowResponses::Flag(true)) => Some(ResponsePolicy::default()),
        Some(AllowResponses::Limits { max, expires }) => Some(ResponsePolicy {
            max: *max,
            expires: *expires,
        }),
    };
    let limit = |n: usize| if n == 0 { usize::MAX } else { n };
    Identity {
        user: Some(u.name.as_str().into()),
        permissions: Some(Arc::new(Permissions {
            publish: rules(&u.publish),
            subscribe: rules(&u.subscribe),
            queue_groups: u.queue_groups.clone(),
            admin: u.admin,
            responses,
        })),
        quota: Some(Arc::new(Quota::new(
            limit(u.max_connections),
            limit(u.max_subscriptions),
        ))),
    }
}

impl Authenticator {
    /// The authenticator for a validated `[auth]`.
    pub fn new(config: &AuthConfig) -> Authenticator {
        Authenticator::build(config, None)
    }

    /// The authenticator for a reloaded `[auth]`. It takes over `old`'s remembered failures
    /// and verification slots, and for each user in both, the user's counts of connections and
    /// subscriptions (under the new limits), so a reload neither forgives an address nor resets
    /// a quota.
    pub fn reloaded(config: &AuthConfig, old: &Authenticator) -> Authenticator {
        let dummy = (!old.dummy.is_empty()).then(|| old.dummy.clone());
        let mut new = Authenticator::build(config, dummy);
        new.verifying = old.verifying.clone();
        *new.failures.get_mut() = old.failures.lock().clone();
        for (name, user) in &mut new.users {
            let (Some(old_user), Some(quota)) = (old.users.get(name), &user.identity.quota) else {
                continue;
            };
            if let Some(kept) = &old_user.identity.quota {
                kept.set_limits(quota.max_connections(), quota.max_subscriptions());
                user.identity.quota = Some(kept.clone());
            }
        }
        new
    }

    /// The identity of configured user `name`, if there is one.
    pub fn user(&self, name: &str) -> Option<&Identity> {
        self.users.get(name).map(|u| &u.identity)
    }

    fn build(config: &AuthConfig, dummy: Option<String>) -> Authenticator {
        let users = config
            .users
            .iter()
            .map(|u| {
                (
                    u.name.clone(),
                    User {
                        hash: u.password_hash.clone(),
                        identity: identity(u),
                    },
                )
            })
            .collect();
        // A hash with the default parameters, as `hash-password` makes them; needed only when
        // there are users to pretend to be.
        let dummy = if config.users.is_empty() {
            String::new()
        } else {
            dummy.unwrap_or_else(|| hash_password("brokerd: no such user").unwrap_or_default())
        };
        let by_certificate = config
            .users
            .iter()
            .filter_map(|u| Some((u.certificate.clone()?, u.name.clone())))
            .collect();
        Authenticator {
            token: config.token.as_deref().map(digest),
            users,
            by_certificate,
            dummy,
            verifying: Arc::new(Semaphore::new(VERIFY_SLOTS)),
            failures: Mutex::new(HashMap::new()),
        }
    }

    /// Whether clients must present credentials.
    pub fn required(&self) -> bool {
        self.token.is_some() || !self.users.is_empty()
    }

    /// Checks `credentials`. Without authentication configured, every client may do everything
    /// and credentials are ignored. The caller waits [`Authenticator::penalty`] first, and
    /// records a failure with [`Authenticator::failed`].
    ///
    /// # Errors
    /// Missing or rejected credentials.
    pub async fn authenticate(
        &self,
        credentials: Option<&Credentials>,
        certificate_names: &[String],
    ) -> Result<Identity, AuthError> {
        if !self.required() {
            return Ok(Identity::default());
        }
        match credentials {
            // A verified client certificate naming a user is that user.
            None => certificate_names
                .iter()
                .find_map(|n| self.by_certificate.get(n))
                .and_then(|user| self.users.get(user))
                .map(|u| u.identity.clone())
                .ok_or(AuthError::Missing),
            Some(Credentials::Token(token)) => match &self.token {
                Some(expected) if bool::from(digest(token).ct_eq(expected)) => {
                    Ok(Identity::default())
                }
                _ => Err(AuthError::Rejected),
            },
            Some(Credentials::Password { user, password }) => {
                if user.len() > MAX_SECRET || password.len() > MAX_SECRET {
                    return Err(AuthError::Rejected);
                }
                let known = self.users.get(user);
                let hash = known.map_or(self.dummy.clone(), |u| u.hash.clone());
                let ok = self.verify(hash, password.clone()).await;
                match known {
                    Some(u) if ok => Ok(u.identity.clone()),
                    _ => Err(AuthError::Rejected),
                }
            }
        }
    }

    /// Verifies on the blocking pool, waiting for one of [`VERIFY_SLOTS`].
    async fn verify(&self, hash: String, password: String) -> bool {
        let Ok(permit) = self.verifying.clone().acquire_owned().await else {
            return false;
        };
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            PasswordHash::new(&hash).is_ok_and(|parsed| {
                Argon2::default()
                    .verify_password(password.as_bytes(), &parsed)
                    .is_ok()
            })
        })
        .await
        .unwrap_or(false)
    }

    /// How long a new attempt from `peer` waits before its credentials are checked: nothing
    /// without recent failures, then 100 ms doubling per failure up to [`MAX_DELAY`].
    pub fn penalty(&self, peer: IpAddr, now: Instant) -> Duration {
        match self.failures.lock().get(&peer) {
            Some((n, at)) if *n > 0 && now.duration_since(*at) < FAILURE_MEMORY => BASE_DELAY
                .saturating_mul(1u32 << (n - 1).min(16))
                .min(MAX_DELAY),
            _ => Duration::ZERO,
        }
    }

    /// Records a failure from `peer`; returns how many recent failures the address has.
    pub fn failed(&self, peer: IpAddr, now: Instant) -> u32 {
        let mut failures = self.failures.lock();
        if failures.len() >= MAX_TRACKED && !failures.contains_key(&peer) {
            failures.retain(|_, (_, at)| now.duration_since(*at) < FAILURE_MEMORY);
            if failures.len() >= MAX_TRACKED {
                let stalest = failures
                    .iter()
                    .min_by_key(|(_, (_, at))| *at)
                    .map(|(ip, _)| *ip);
                if let Some(ip) = stalest {
                    failures.remove(&ip);
                }
            }
        }
        let entry = failures.entry(peer).or_insert((0, now));
        if now.duration_since(entry.1) >= FAILURE_MEMORY {
            entry.0 = 0;
        }
        entry.0 = entry.0.saturating_add(1);
        entry.1 = now;
        entry.0
    }

    /// Forgets `peer`'s failures after it authenticated.
    pub fn succeeded(&self, peer: IpAddr) {
        if self.required() {
            self.failures.lock().remove(&peer);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RulesConfig;

    fn config() -> AuthConfig {
        AuthConfig {
            token: Some("s3cret-token".into()),
            allow_anonymous: false,
            users: vec![UserConfig {
                name: "orders".into(),
                password_hash: hash_password("pw").unwrap(),
                publish: RulesConfig {
                    allow: Some(vec!["order.>".into()]),
                    deny: vec![],
                },
                ..UserConfig::default()
            }],
        }
    }

    fn password(user: &str, password: &str) -> Credentials {
        Credentials::Password {
            user: user.into(),
            password: password.into(),
        }
    }

    impl Authenticator {
        async fn authenticate_plain(
            &self,
            credentials: Option<&Credentials>,
        ) -> Result<Identity, AuthError> {
            self.authenticate(credentials, &[]).await
        }
    }

    #[tokio::test]
    async fn each_mode_is_accepted_and_rejected() {
        let a = Authenticator::new(&config());
        let token = a
            .authenticate_plain(Some(&Credentials::Token("s3cret-token".into())))
            .await
            .unwrap();
        assert!(token.is_admin());
        for wrong in ["s3cret-toke", "s3cret-token!", ""] {
            assert_eq!(
                a.authenticate_plain(Some(&Credentials::Token(wrong.into())))
                    .await
                    .unwrap_err(),
                AuthError::Rejected
            );
        }
        let user = a
            .authenticate_plain(Some(&password("orders", "pw")))
            .await
            .unwrap();
        assert_eq!(user.user.as_deref(), Some("orders"));
        assert!(!user.is_admin());
        for (u, p) in [("orders", "PW"), ("nobody", "pw"), ("", "")] {
            assert_eq!(
                a.authenticate_plain(Some(&password(u, p)))
                    .await
                    .unwrap_err(),
                AuthError::Rejected
            );
        }
        assert_eq!(
            a.authenticate_plain(None).await.unwrap_err(),
            AuthError::Missing
        );
        // Without authentication configured, anything goes.
        let open = Authenticator::new(&AuthConfig::default());
        assert!(open.authenticate_plain(None).await.unwrap().is_admin());
        assert!(
            open.authenticate_plain(Some(&Credentials::Token("x".into())))
                .await
                .unwrap()
                .is_admin()
        );
    }

    #[test]
    fn failures_slow_down_per_address_and_are_bounded() {
        let a = Authenticator::new(&config());
        let t0 = Instant::now();
        let ip: IpAddr = [10, 0, 0, 1].into();
        assert_eq!(a.penalty(ip, t0), Duration::ZERO);
        assert_eq!(a.failed(ip, t0), 1);
        assert_eq!(a.penalty(ip, t0), BASE_DELAY);
        assert_eq!(a.failed(ip, t0), 2);
        assert_eq!(a.penalty(ip, t0), BASE_DELAY * 2);
        for _ in 0..40 {
            a.failed(ip, t0);
        }
        assert_eq!(a.penalty(ip, t0), MAX_DELAY);
        // Another address starts afresh, and a long quiet forgets.
        assert_eq!(a.penalty([10, 0, 0, 2].into(), t0), Duration::ZERO);
        assert_eq!(a.penalty(ip, t0 + FAILURE_MEMORY), Duration::ZERO);
        assert_eq!(a.failed(ip, t0 + FAILURE_MEMORY), 1);
        a.succeeded(ip);
        assert_eq!(a.penalty(ip, t0), Duration::ZERO);
        for i in 0..MAX_TRACKED as u32 + 10 {
            a.failed(IpAddr::from(i.to_be_bytes()), t0);
        }
        assert!(a.failures.lock().len() <= MAX_TRACKED);
    }

    #[test]
    fn hashes_are_checked() {
        assert!(check_hash(&hash_password("x").unwrap()).is_ok());
        assert!(check_hash("plain-text").is_err());
        assert!(
            check_hash("$argon2id$v=19$m=4194304,t=2,p=1$c29tZXNhbHQ$aGFzaGhhc2hoYXNoaGFzaA")
                .is_err()
        );
    }
}
