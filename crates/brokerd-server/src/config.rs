//! brokerd's configuration: embedded defaults, a TOML file, environment variables and flags.
//!
//! Precedence, lowest first: the defaults in [`Config::default`] (which `config/brokerd.toml`
//! spells out exactly), the file named by `--config`/`BROKERD_CONFIG`, then the `--listen` and
//! `--log-level` flags or their environment variables. Unknown keys are errors. This module only
//! parses and checks; `main.rs` decides what to do with an error (exit code 2).

use brokerd_core::{Limits, OutboxLimits};
use brokerd_proto::{OverflowPolicy, TopicLimits};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;
use thiserror::Error;

/// File descriptors kept beyond connections and handshakes, for the listener, stdio, the runtime,
/// and connections refused while their `ERR` is written.
pub const FD_HEADROOM: u64 = 64;

/// Why a configuration could not be loaded.
#[derive(Debug, Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The path.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not valid TOML for this configuration.
    #[error("invalid config file {path}: {message}")]
    Parse {
        /// The path.
        path: String,
        /// The parser's message, which names the key and line.
        message: String,
    },
    /// A value is out of range or inconsistent with another.
    #[error("invalid config value for `{key}`: {message}")]
    Invalid {
        /// The offending key, dotted (`limits.max_payload`).
        key: &'static str,
        /// What is wrong with it.
        message: String,
    },
}

/// The whole configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Address to listen on: an IP address and port, or a host name and port (the first
    /// address the name resolves to).
    #[serde(with = "address")]
    pub listen: SocketAddr,
    /// Log filter: `off`, `error`, `warn`, `info`, `debug`, `trace`, or `RUST_LOG`-style
    /// directives whose levels are among those (`info,brokerd_server=debug`).
    pub log_level: String,
    /// Log lines as text for people (`text`) or one JSON object per line (`json`).
    pub log_format: LogFormat,
    /// Size and count limits.
    pub limits: LimitsConfig,
    /// Per-connection outbound queues.
    pub outbound: OutboundConfig,
    /// Timers.
    pub timeouts: TimeoutsConfig,
    /// Routing.
    pub routing: RoutingConfig,
    /// Authentication and permissions.
    pub auth: AuthConfig,
    /// TLS on the client listener.
    pub tls: TlsConfig,
    /// Where the HTTP monitoring endpoints and the web console listen (`docs/operations.md`,
    /// "Monitoring"); `"off"` turns them off.
    #[serde(with = "monitoring_address")]
    pub http: Option<SocketAddr>,
    /// Where streams keep their files, one directory per stream (`docs/operations.md`,
    /// "Streams"); relative to the working directory unless absolute. Nothing is created there
    /// until a stream exists.
    pub data_dir: std::path::PathBuf,
    /// Streams declared here are opened at start-up; more can be added at runtime.
    pub streams: Vec<brokerd_proto::streams::StreamConfig>,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One line of text per event; colour only on a terminal, and never with `NO_COLOR` set.
    #[default]
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// `[tls]`: TLS for clients (`docs/security.md`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// The server's certificate chain, PEM. With `key`, turns TLS on.
    pub cert: Option<std::path::PathBuf>,
    /// The server's private key, PEM.
    pub key: Option<std::path::PathBuf>,
    /// Client certificates must be signed by one of these CAs (PEM): mutual TLS. A client whose
    /// certificate names a user's `certificate` is that user without a password.
    pub client_ca: Option<std::path::PathBuf>,
    /// Where TLS clients connect, beside the plain `listen`. Unset: `listen` itself speaks TLS
    /// only.
    #[serde(with = "optional_address")]
    pub listen: Option<SocketAddr>,
}

impl TlsConfig {
    /// Whether TLS is configured.
    pub fn enabled(&self) -> bool {
        self.cert.is_some()
    }
}

/// `[auth]`: who may connect and what each user may do (`docs/security.md`).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// A shared token: a client presenting it may do everything. Never printed.
    #[serde(skip_serializing)]
    pub token: Option<String>,
    /// Accept clients without credentials on a non-loopback address when no authentication is
    /// configured. Without it, brokerd refuses to start that way.
    pub allow_anonymous: bool,
    /// Named users, each with an argon2id password hash and its permissions.
    pub users: Vec<UserConfig>,
}

// By hand, so that the token never reaches a log or a panic message.
impl std::fmt::Debug for AuthConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthConfig")
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("allow_anonymous", &self.allow_anonymous)
            .field("users", &self.users)
            .finish()
    }
}

/// `[[auth.users]]`: one user.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct UserConfig {
    /// The name a client gives with its password.
    pub name: String,
    /// An argon2id hash in PHC form, as `brokerd hash-password` prints it.
    pub password_hash: String,
    /// May read `$` topics and see every connection in the statistics.
    pub admin: bool,
    /// Topics it may publish to.
    pub publish: RulesConfig,
    /// Filters it may subscribe to, and reply-to topics it may name.
    pub subscribe: RulesConfig,
    /// When set, the only queue groups it may join.
    pub queue_groups: Option<Vec<String>>,
    /// May answer requests it receives, even where it may not publish otherwise: `true`, or a
    /// table `{ max = 1, expires = "1m" }`.
    pub allow_responses: Option<AllowResponses>,
    /// Most connections at once (0: no limit).
    pub max_connections: usize,
    /// Most subscriptions across its connections (0: no limit).
    pub max_subscriptions: usize,
    /// A DNS name in a client certificate's subject alternative names that makes a mutual-TLS
    /// client this user, with no password.
    pub certificate: Option<String>,
}

/// Allow and deny filters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct RulesConfig {
    /// When set, only what these filters cover is allowed.
    pub allow: Option<Vec<String>>,
    /// Never allowed; wins over `allow`.
    pub deny: Vec<String>,
}

/// `allow_responses`: a flag, or the limits of each permit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum AllowResponses {
    /// `true` for one answer within a minute; `false` for none.
    Flag(bool),
    /// How many answers, and for how long after the request arrived.
    Limits {
        /// Publishes allowed per request.
        max: u32,
        /// How long a permit lasts.
        #[serde(with = "duration")]
        expires: Duration,
    },
}

/// `[limits]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Most simultaneous client connections that have completed their handshake.
    pub max_connections: usize,
    /// Most connections accepted but still before their `HELLO` is accepted; they do not count
    /// against `max_connections` until then.
    pub max_handshakes: usize,
    /// Most connections, in their handshake or established, from one source IP address.
    pub max_connections_per_address: usize,
    /// The slowest rate, in bytes per second, at which a client may send a frame it has
    /// started: each frame has `timeouts.frame` plus its length at this rate to arrive.
    pub min_frame_rate: u64,
    /// Largest frame in bytes, length prefix excluded.
    pub max_frame: usize,
    /// Largest message payload in bytes.
    pub max_payload: usize,
    /// Longest topic or filter in bytes.
    pub max_topic_len: usize,
    /// Most tokens in a topic or filter.
    pub max_topic_tokens: usize,
    /// Most live subscriptions per connection.
    pub max_subs_per_connection: usize,
    /// The broker's memory budget in bytes: queued messages and replies, partly read frames and
    /// the match cache. 0 means a quarter of the machine's memory (or of the cgroup's limit,
    /// when lower).
    pub max_memory: usize,
}

/// `[outbound]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OutboundConfig {
    /// Most messages pending per connection.
    pub max_pending_msgs: usize,
    /// Most bytes pending per connection; at least `limits.max_payload`.
    pub max_pending_bytes: usize,
    /// Default overflow policy: `drop-new`, `drop-old` or `disconnect`.
    #[serde(with = "policy")]
    pub overflow: OverflowPolicy,
    /// How long one batch write may take before the connection is closed as a slow consumer.
    #[serde(with = "duration")]
    pub write_deadline: Duration,
    /// How long a publishing connection waits for a subscriber's full queue to drain while
    /// that subscriber's socket still takes bytes; zero turns backpressure off.
    #[serde(with = "duration")]
    pub backpressure_wait: Duration,
}

/// `[timeouts]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TimeoutsConfig {
    /// How long a new connection has to send `HELLO`.
    #[serde(with = "duration")]
    pub handshake: Duration,
    /// The base time a frame has to arrive in full once its first byte has arrived; each byte
    /// the frame announces adds `1 / limits.min_frame_rate` seconds.
    #[serde(with = "duration")]
    pub frame: Duration,
    /// How long a connection may stay quiet before the server pings it.
    #[serde(with = "duration")]
    pub ping_interval: Duration,
    /// Unanswered pings after which the connection is closed.
    pub max_pings_outstanding: u32,
    /// How long shutdown waits for queued messages to be written.
    #[serde(with = "duration")]
    pub shutdown_grace: Duration,
}

/// `[routing]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RoutingConfig {
    /// Topics kept in the match cache (0 disables it).
    pub match_cache: usize,
    /// Bytes the match cache's results may hold (0 disables it).
    pub match_cache_bytes: usize,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 7654)),
            log_level: "info".into(),
            log_format: LogFormat::Text,
            limits: LimitsConfig::default(),
            outbound: OutboundConfig::default(),
            timeouts: TimeoutsConfig::default(),
            routing: RoutingConfig::default(),
            auth: AuthConfig::default(),
            tls: TlsConfig::default(),
            http: Some(SocketAddr::from(([127, 0, 0, 1], 7655))),
            data_dir: "brokerd-data".into(),
            streams: Vec::new(),
        }
    }
}

impl Default for LimitsConfig {
    fn default() -> LimitsConfig {
        let l = Limits::default();
        LimitsConfig {
            max_connections: 10_000,
            max_handshakes: 1_000,
            max_connections_per_address: 1_000,
            min_frame_rate: 64 * 1024,
            max_frame: l.max_frame,
            max_payload: l.max_payload,
            max_topic_len: l.topic.max_len,
            max_topic_tokens: l.topic.max_tokens,
            max_subs_per_connection: l.max_subs,
            max_memory: 0,
        }
    }
}

impl Default for OutboundConfig {
    fn default() -> OutboundConfig {
        let l = Limits::default();
        OutboundConfig {
            max_pending_msgs: l.outbox.max_msgs,
            max_pending_bytes: l.outbox.max_bytes,
            overflow: l.default_policy,
            write_deadline: Duration::from_secs(10),
            backpressure_wait: Duration::from_millis(100),
        }
    }
}

impl Default for TimeoutsConfig {
    fn default() -> TimeoutsConfig {
        TimeoutsConfig {
            handshake: Duration::from_secs(5),
            frame: Duration::from_secs(10),
            ping_interval: Duration::from_secs(30),
            max_pings_outstanding: 2,
            shutdown_grace: Duration::from_secs(10),
        }
    }
}

impl Default for RoutingConfig {
    fn default() -> RoutingConfig {
        RoutingConfig {
            match_cache: Limits::default().match_cache,
            match_cache_bytes: Limits::default().match_cache_bytes,
        }
    }
}

impl Config {
    /// Parses TOML text; `origin` names the source in errors.
    ///
    /// # Errors
    /// Syntax errors, unknown keys, wrong types, and values [`Config::validate`] rejects.
    pub fn from_toml(text: &str, origin: &str) -> Result<Config, ConfigError> {
        let c: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: origin.to_string(),
            message: e.to_string().trim_end().to_string(),
        })?;
        c.validate()?;
        Ok(c)
    }

    /// Reads and parses a file.
    ///
    /// # Errors
    /// As [`Config::from_toml`], or the file cannot be read.
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Config::from_toml(&text, &path.display().to_string())
    }

    /// The configuration as TOML, as `brokerd --print-config` shows it.
    pub fn to_toml(&self) -> String {
        // Serializing plain structs of numbers and strings cannot fail.
        toml::to_string(self).unwrap_or_default()
    }

    /// Checks ranges and consistency.
    ///
    /// # Errors
    /// The first offending key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key, message: &str| {
            Err(ConfigError::Invalid {
                key,
                message: message.to_string(),
            })
        };
        let invalid_owned = |key, message: String| Err(ConfigError::Invalid { key, message });
        check_log_level(&self.log_level)?;
        crate::streams::check_declared(&self.streams).map_err(|message| ConfigError::Invalid {
            key: "streams",
            message,
        })?;
        let l = &self.limits;
        if l.max_connections == 0 {
            return invalid("limits.max_connections", "must be at least 1");
        }
        if l.max_handshakes == 0 {
            return invalid("limits.max_handshakes", "must be at least 1");
        }
        if l.max_connections_per_address == 0 {
            return invalid("limits.max_connections_per_address", "must be at least 1");
        }
        if l.min_frame_rate == 0 {
            return invalid(
                "limits.min_frame_rate",
                "must be at least 1 byte per second",
            );
        }
        if l.max_payload == 0 || l.max_payload > u32::MAX as usize - 65_536 {
            return invalid("limits.max_payload", "must be between 1 and 4294901759");
        }
        if l.max_frame > u32::MAX as usize {
            return invalid("limits.max_frame", "must be at most 4294967295");
        }
        if l.max_frame < l.max_payload + 1024 {
            // Name the key the user most likely changed, and both values.
            let defaults = LimitsConfig::default();
            let key = if l.max_payload != defaults.max_payload && l.max_frame == defaults.max_frame
            {
                "limits.max_payload"
            } else {
                "limits.max_frame"
            };
            return Err(ConfigError::Invalid {
                key,
                message: format!(
                    "limits.max_payload is {} and limits.max_frame is {}, but a frame must hold \
                     the largest payload plus 1024 bytes of headers: set limits.max_frame to at \
                     least {} (or lower limits.max_payload to at most {})",
                    l.max_payload,
                    l.max_frame,
                    l.max_payload + 1024,
                    l.max_frame.saturating_sub(1024)
                ),
            });
        }
        if l.max_topic_len == 0 || l.max_topic_len > u16::MAX as usize {
            return invalid("limits.max_topic_len", "must be between 1 and 65535");
        }
        if l.max_topic_tokens == 0 || l.max_topic_tokens > u16::MAX as usize {
            return invalid("limits.max_topic_tokens", "must be between 1 and 65535");
        }
        if l.max_subs_per_connection == 0 || l.max_subs_per_connection > u32::MAX as usize {
            return invalid("limits.max_subs_per_connection", "must be at least 1");
        }
        if l.max_memory != 0 && l.max_memory < 16 * 1024 * 1024 {
            return invalid(
                "limits.max_memory",
                "must be 0 (a quarter of the machine's memory) or at least 16777216 (16 MiB)",
            );
        }
        let o = &self.outbound;
        if o.max_pending_msgs == 0 || o.max_pending_msgs > u32::MAX as usize {
            return invalid("outbound.max_pending_msgs", "must be at least 1");
        }
        if o.max_pending_bytes < 1024 || o.max_pending_bytes > u32::MAX as usize {
            return invalid(
                "outbound.max_pending_bytes",
                "must be between 1024 and 4294967295",
            );
        }
        // An empty queue takes one message of any size, so a smaller queue would not make a
        // message undeliverable; it would only hold the largest messages one at a time, which is
        // a mistake rather than a choice.
        if o.max_pending_bytes < l.max_payload {
            // Name the key the user most likely changed, and both values.
            let key = if l.max_payload != LimitsConfig::default().max_payload
                && o.max_pending_bytes == OutboundConfig::default().max_pending_bytes
            {
                "limits.max_payload"
            } else {
                "outbound.max_pending_bytes"
            };
            return Err(ConfigError::Invalid {
                key,
                message: format!(
                    "outbound.max_pending_bytes is {} and limits.max_payload is {}, but a \
                     connection's queue must hold at least one largest payload: set \
                     outbound.max_pending_bytes to at least {} (or lower limits.max_payload to \
                     at most {})",
                    o.max_pending_bytes, l.max_payload, l.max_payload, o.max_pending_bytes
                ),
            });
        }
        if o.write_deadline.is_zero() {
            return invalid("outbound.write_deadline", "must be greater than zero");
        }
        if o.backpressure_wait > o.write_deadline {
            return invalid(
                "outbound.backpressure_wait",
                "must not be longer than outbound.write_deadline",
            );
        }
        let t = &self.timeouts;
        if t.handshake.is_zero() {
            return invalid("timeouts.handshake", "must be greater than zero");
        }
        if t.frame.is_zero() {
            return invalid("timeouts.frame", "must be greater than zero");
        }
        if t.ping_interval.is_zero() {
            return invalid("timeouts.ping_interval", "must be greater than zero");
        }
        if t.max_pings_outstanding == 0 {
            return invalid("timeouts.max_pings_outstanding", "must be at least 1");
        }
        self.auth.validate()?;
        let tls = &self.tls;
        if tls.cert.is_some() != tls.key.is_some() {
            return invalid("tls.cert", "tls.cert and tls.key go together");
        }
        if (tls.client_ca.is_some() || tls.listen.is_some()) && !tls.enabled() {
            return invalid(
                "tls.client_ca",
                "tls.client_ca and tls.listen need tls.cert and tls.key",
            );
        }
        // Two listeners on one address would fail at start-up, after the checks said OK: the
        // same port on the same address, or on any address when either is a wildcard
        // (`0.0.0.0`, `::`). Port 0 is the kernel's choice, different for each.
        let same = |a: SocketAddr, b: SocketAddr| {
            a.port() == b.port()
                && a.port() != 0
                && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
        };
        if let Some(t) = tls.listen.filter(|t| same(*t, self.listen)) {
            return invalid_owned(
                "tls.listen",
                format!("{t} is also `listen`: the TLS listener needs an address of its own"),
            );
        }
        if let Some(h) = self
            .http
            .filter(|h| same(*h, self.listen) || tls.listen.is_some_and(|t| same(*h, t)))
        {
            return invalid_owned(
                "http",
                format!("{h} is also a client listener's address: give monitoring its own port"),
            );
        }
        if self.auth.users.iter().any(|u| u.certificate.is_some()) && tls.client_ca.is_none() {
            return invalid(
                "auth.users.certificate",
                "mapping a certificate to a user needs tls.client_ca (mutual TLS)",
            );
        }
        // A listener other hosts can reach must authenticate its clients, unless told otherwise.
        // TLS with a client CA authenticates by certificate; plain TCP only by credentials.
        let plain = (!(tls.enabled() && tls.listen.is_none())).then_some(self.listen);
        let secured = tls.listen.or((tls.enabled()).then_some(self.listen));
        let open = |addr: SocketAddr, by_certificate: bool| {
            !addr.ip().is_loopback()
                && !self.auth.required()
                && !by_certificate
                && !self.auth.allow_anonymous
        };
        let secured_key = if tls.listen.is_some() {
            "tls.listen"
        } else {
            "listen"
        };
        let exposed = plain
            .filter(|a| open(*a, false))
            .map(|a| ("listen", a))
            .or(secured
                .filter(|a| open(*a, tls.client_ca.is_some()))
                .map(|a| (secured_key, a)));
        let exposed = exposed.or(self
            .http
            .filter(|a| {
                !a.ip().is_loopback() && !self.auth.required() && !self.auth.allow_anonymous
            })
            .map(|a| ("http", a)));
        if let Some((key, addr)) = exposed {
            return Err(ConfigError::Invalid {
                key,
                message: format!(
                    "{addr} is reachable from other hosts and no authentication is configured, so \
                     anyone who reaches it could read and publish every message; set a token \
                     (--auth-token, BROKERD_AUTH_TOKEN or auth.token) or users ([[auth.users]]), \
                     or accept an open broker explicitly with --allow-anonymous \
                     (BROKERD_ALLOW_ANONYMOUS=true or auth.allow_anonymous = true)"
                ),
            });
        }
        Ok(())
    }

    /// How long a frame announcing `len` bytes (length prefix excluded) may take to arrive in
    /// full, counted from its first byte: `timeouts.frame` plus `len` at `limits.min_frame_rate`.
    pub fn frame_allowance(&self, len: usize) -> Duration {
        let rate = self.limits.min_frame_rate.max(1);
        let nanos = (len as u128 * 1_000_000_000) / u128::from(rate);
        self.timeouts.frame.saturating_add(Duration::from_nanos(
            u64::try_from(nanos).unwrap_or(u64::MAX),
        ))
    }

    /// File descriptors the limits can ask for at once: every connection and handshake, the
    /// refusals being written, and the listener, logs and runtime.
    pub fn fds_needed(&self) -> u64 {
        (self.limits.max_connections as u64)
            .saturating_add(self.limits.max_handshakes as u64)
            .saturating_add(FD_HEADROOM)
    }

    /// The routing limits for [`brokerd_core::Broker`].
    pub fn broker_limits(&self) -> Limits {
        Limits {
            max_frame: self.limits.max_frame,
            max_payload: self.limits.max_payload,
            topic: TopicLimits {
                max_len: self.limits.max_topic_len,
                max_tokens: self.limits.max_topic_tokens,
            },
            max_subs: self.limits.max_subs_per_connection,
            outbox: OutboxLimits {
                max_msgs: self.outbound.max_pending_msgs,
                max_bytes: self.outbound.max_pending_bytes,
                press: !self.outbound.backpressure_wait.is_zero(),
            },
            default_policy: self.outbound.overflow,
            match_cache: self.routing.match_cache,
            match_cache_bytes: self.routing.match_cache_bytes,
            max_memory: self.memory_budget(),
        }
    }

    /// The memory budget in force: `limits.max_memory`, or when that is 0 a quarter of the
    /// machine's memory (or of the cgroup's limit, when lower), or 1 GiB if neither can be read.
    pub fn memory_budget(&self) -> usize {
        if self.limits.max_memory > 0 {
            return self.limits.max_memory;
        }
        machine_memory().map_or(1 << 30, |m| m / 4)
    }
}

/// The memory this process may use: physical memory, or the cgroup's limit when lower.
fn machine_memory() -> Option<usize> {
    let read = |path: &str| std::fs::read_to_string(path).ok();
    let total = read("/proc/meminfo").and_then(|t| {
        let line = t.lines().find(|l| l.starts_with("MemTotal:"))?;
        let kib: usize = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib * 1024)
    });
    // cgroup v2, then v1; "max" or a huge v1 value means no limit.
    let cgroup = read("/sys/fs/cgroup/memory.max")
        .or_else(|| read("/sys/fs/cgroup/memory/memory.limit_in_bytes"))
        .and_then(|t| t.trim().parse::<usize>().ok());
    match (total, cgroup) {
        (Some(t), Some(c)) => Some(t.min(c)),
        (t, c) => t.or(c),
    }
}

impl AuthConfig {
    /// Whether clients must authenticate.
    pub fn required(&self) -> bool {
        self.token.is_some() || !self.users.is_empty()
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key, message: String| Err(ConfigError::Invalid { key, message });
        if self.token.as_deref() == Some("") {
            return invalid("auth.token", "must not be empty".into());
        }
        let mut names = std::collections::HashSet::new();
        for u in &self.users {
            if u.name.is_empty() || u.name.len() > 256 || u.name.chars().any(char::is_control) {
                return invalid(
                    "auth.users",
                    format!(
                        "user name {:?} must be 1 to 256 bytes without control characters",
                        u.name
                    ),
                );
            }
            if !names.insert(u.name.as_str()) {
                return invalid("auth.users", format!("user {:?} is defined twice", u.name));
            }
            if let Err(e) = crate::auth::check_hash(&u.password_hash) {
                return invalid(
                    "auth.users.password_hash",
                    format!(
                        "user {:?}: {e}; make one with `brokerd hash-password`",
                        u.name
                    ),
                );
            }
            for (key, rules) in [
                ("auth.users.publish", &u.publish),
                ("auth.users.subscribe", &u.subscribe),
            ] {
                for f in rules.allow.iter().flatten().chain(&rules.deny) {
                    if let Err(e) = brokerd_proto::Filter::new(f) {
                        return invalid(key, format!("user {:?}: filter {f:?}: {e}", u.name));
                    }
                }
            }
            if let Some(AllowResponses::Limits { max, expires }) = &u.allow_responses
                && (*max == 0 || expires.is_zero())
            {
                return invalid(
                    "auth.users.allow_responses",
                    format!(
                        "user {:?}: max and expires must be greater than zero",
                        u.name
                    ),
                );
            }
        }
        Ok(())
    }
}

/// The log levels a filter may name.
const LOG_LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];

/// Checks a `log_level`: a level, or comma-separated `target=level` directives (a bare level
/// among them sets the default). Anything else, such as `verbose`, is refused, because the log
/// filter would take it as the name of a module and log nothing else.
///
/// # Errors
/// The directive that is not understood, and the levels there are.
pub fn check_log_level(filter: &str) -> Result<(), ConfigError> {
    let level_ok = |l: &str| LOG_LEVELS.contains(&l.to_ascii_lowercase().as_str());
    let bad = filter.split(',').map(str::trim).find(|d| {
        let level = d.rsplit_once('=').map_or(
            *d,
            |(target, level)| {
                if target.is_empty() { "" } else { level }
            },
        );
        !level_ok(level)
    });
    match bad {
        None if !filter.trim().is_empty() => Ok(()),
        other => Err(ConfigError::Invalid {
            key: "log_level",
            message: format!(
                "{:?} is not a log level; use one of {} or directives such as \
                 \"info,brokerd_server=debug\"",
                other.unwrap_or(filter),
                LOG_LEVELS.join(", ")
            ),
        }),
    }
}

/// Reads `host:port` or `ip:port` as one socket address: an address as written, or else the
/// first one the host name resolves to.
///
/// # Errors
/// No port, or the name does not resolve.
pub fn resolve_address(text: &str) -> Result<SocketAddr, String> {
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return Ok(addr);
    }
    if text
        .rsplit_once(':')
        .is_none_or(|(host, port)| host.is_empty() || port.parse::<u16>().is_err())
    {
        return Err(format!(
            "{text:?} is not an address: use host:port or ip:port, e.g. \"127.0.0.1:7654\" or \"localhost:7654\""
        ));
    }
    use std::net::ToSocketAddrs;
    match text.to_socket_addrs() {
        Ok(mut addrs) => addrs
            .next()
            .ok_or_else(|| format!("host name in {text:?} resolves to no address")),
        Err(e) => Err(format!("cannot resolve {text:?}: {e}")),
    }
}

mod address {
    use super::*;

    pub fn serialize<S: Serializer>(a: &SocketAddr, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&a.to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
        let text = String::deserialize(d)?;
        resolve_address(&text).map_err(serde::de::Error::custom)
    }
}

/// `http`: an address, or `"off"` (or an empty string) for none.
mod monitoring_address {
    use super::*;

    pub fn serialize<S: Serializer>(a: &Option<SocketAddr>, s: S) -> Result<S::Ok, S::Error> {
        match a {
            Some(a) => s.serialize_str(&a.to_string()),
            None => s.serialize_str("off"),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SocketAddr>, D::Error> {
        let text = String::deserialize(d)?;
        parse_monitoring_address(&text).map_err(serde::de::Error::custom)
    }
}

/// Reads an `http` value: an address or host name with a port, or `off` (or empty) for none.
///
/// # Errors
/// As [`resolve_address`].
pub fn parse_monitoring_address(text: &str) -> Result<Option<SocketAddr>, String> {
    match text.trim() {
        "" | "off" | "none" | "false" => Ok(None),
        t => resolve_address(t).map(Some),
    }
}

mod optional_address {
    use super::*;

    pub fn serialize<S: Serializer>(a: &Option<SocketAddr>, s: S) -> Result<S::Ok, S::Error> {
        match a {
            Some(a) => s.serialize_str(&a.to_string()),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SocketAddr>, D::Error> {
        let text = String::deserialize(d)?;
        resolve_address(&text)
            .map(Some)
            .map_err(serde::de::Error::custom)
    }
}

mod duration {
    use super::*;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }

    /// The longest duration any key takes: longer ones are refused, not stored, since the broker
    /// adds durations to instants (a deadline from now), which would overflow near `u64::MAX`
    /// seconds. A year is past any sensible timeout, deadline or permit.
    pub const MAX: Duration = Duration::from_secs(365 * 24 * 3600);

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        let parsed = humantime::parse_duration(&text).map_err(|e| {
            serde::de::Error::custom(format!(
                "invalid duration {text:?} ({e}); use e.g. \"500ms\" or \"10s\""
            ))
        })?;
        if parsed > MAX {
            return Err(serde::de::Error::custom(format!(
                "duration {text:?} is too long: at most 365 days"
            )));
        }
        Ok(parsed)
    }
}

mod policy {
    use super::*;

    pub fn serialize<S: Serializer>(p: &OverflowPolicy, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(p.name())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<OverflowPolicy, D::Error> {
        let text = String::deserialize(d)?;
        OverflowPolicy::from_name(&text).ok_or_else(|| {
            serde::de::Error::custom(format!(
                "unknown overflow policy {text:?}; expected \"drop-new\", \"drop-old\" or \"disconnect\""
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_example_is_exactly_the_defaults() {
        let text = include_str!("../../../config/brokerd.toml");
        assert_eq!(
            Config::from_toml(text, "config/brokerd.toml").unwrap(),
            Config::default()
        );
    }

    #[test]
    fn printed_config_parses_back() {
        let c = Config::default();
        assert_eq!(Config::from_toml(&c.to_toml(), "printed").unwrap(), c);
    }

    #[test]
    fn what_would_fail_at_start_up_is_refused_by_the_checks() {
        let e = Config::from_toml(
            "listen = \"127.0.0.1:7000\"\n[tls]\ncert = \"c.pem\"\nkey = \"k.pem\"\n\
             listen = \"127.0.0.1:7000\"\n",
            "t",
        )
        .unwrap_err();
        assert!(e.to_string().contains("`tls.listen`"), "{e}");
        let e = Config::from_toml("http = \"127.0.0.1:7654\"\n", "t").unwrap_err();
        assert!(e.to_string().contains("`http`"), "{e}");
        let e = Config::from_toml(
            "listen = \"0.0.0.0:7654\"\nhttp = \"127.0.0.1:7654\"\n[auth]\ntoken = \"t\"\n",
            "t",
        )
        .unwrap_err();
        assert!(e.to_string().contains("`http`"), "{e}");
        // Port 0 is a different port for each listener.
        Config::from_toml("listen = \"127.0.0.1:0\"\nhttp = \"127.0.0.1:0\"\n", "t").unwrap();
        let streams: String = (0..65)
            .map(|i| format!("[[streams]]\nname = \"S{i}\"\nfilters = [\"s{i}.>\"]\n"))
            .collect();
        let e = Config::from_toml(&streams, "t").unwrap_err();
        assert!(e.to_string().contains("at most 64"), "{e}");
    }

    #[test]
    fn an_open_monitoring_address_is_named_as_the_key_to_fix() {
        let e = Config::from_toml("http = \"0.0.0.0:7655\"\n", "t").unwrap_err();
        assert!(e.to_string().contains("`http`"), "{e}");
        let e = Config::from_toml("listen = \"0.0.0.0:7654\"\n", "t").unwrap_err();
        assert!(e.to_string().contains("`listen`"), "{e}");
    }

    #[test]
    fn durations_longer_than_a_year_are_refused() {
        // Added to an instant, u64::MAX seconds overflows: refused at load, never a panic later.
        for key in ["handshake", "frame", "ping_interval", "shutdown_grace"] {
            let text = format!("[timeouts]\n{key} = \"18446744073709551615s\"\n");
            let e = Config::from_toml(&text, "t").unwrap_err();
            assert!(
                e.to_string().contains(key) && e.to_string().contains("365 days"),
                "{e}"
            );
        }
        let c = Config::from_toml("[timeouts]\nshutdown_grace = \"365days\"\n", "t").unwrap();
        assert_eq!(c.timeouts.shutdown_grace, duration::MAX);
    }

    #[test]
    fn partial_file_keeps_other_defaults() {
        let c = Config::from_toml("[outbound]\noverflow = \"drop-old\"\n", "t").unwrap();
        assert_eq!(c.outbound.overflow, OverflowPolicy::DropOld);
        assert_eq!(c.limits, LimitsConfig::default());
    }

    #[test]
    fn errors_name_the_key() {
        let e = Config::from_toml("[limits]\nmax_payload = \"big\"\n", "t").unwrap_err();
        assert!(e.to_string().contains("max_payload"), "{e}");
        let e = Config::from_toml("[limits]\nmax_paylod = 1\n", "t").unwrap_err();
        assert!(e.to_string().contains("max_paylod"), "{e}");
        let e = Config::from_toml("[outbound]\noverflow = \"maybe\"\n", "t").unwrap_err();
        assert!(e.to_string().contains("overflow"), "{e}");
        let e = Config::from_toml("[timeouts]\nhandshake = \"soon\"\n", "t").unwrap_err();
        assert!(e.to_string().contains("handshake"), "{e}");
        let e = Config::from_toml("[limits]\nmax_payload = 2000000\n", "t").unwrap_err();
        let text = e.to_string();
        assert!(text.contains("`limits.max_payload`"), "{e}");
        assert!(
            text.contains("2000000") && text.contains("1114112") && text.contains("2001024"),
            "{e}"
        );
        let e = Config::from_toml("[limits]\nmax_frame = 2000\n", "t").unwrap_err();
        assert!(e.to_string().contains("`limits.max_frame`"), "{e}");
        let e = Config::from_toml("[outbound]\nmax_pending_bytes = 65536\n", "t").unwrap_err();
        let text = e.to_string();
        assert!(text.contains("`outbound.max_pending_bytes`"), "{e}");
        assert!(text.contains("65536") && text.contains("1048576"), "{e}");
        let e = Config::from_toml(
            "[limits]\nmax_payload = 100000000\nmax_frame = 100001024\n",
            "t",
        )
        .unwrap_err();
        let text = e.to_string();
        assert!(text.contains("`limits.max_payload`"), "{e}");
        assert!(
            text.contains("67108864") && text.contains("100000000"),
            "{e}"
        );
        // Equal is enough.
        Config::from_toml("[outbound]\nmax_pending_bytes = 1048576\n", "t").unwrap();
        let e = Config::from_toml("log_level = \"verbose\"\n", "t").unwrap_err();
        assert!(
            e.to_string().contains("verbose") && e.to_string().contains("trace"),
            "{e}"
        );
        let e = Config::from_toml("log_format = \"xml\"\n", "t").unwrap_err();
        assert!(e.to_string().contains("log_format"), "{e}");
        let e = Config::from_toml("listen = \"localhost\"\n", "t").unwrap_err();
        assert!(e.to_string().contains("host:port"), "{e}");
        let e = Config::from_toml("[limits]\nmax_handshakes = 0\n", "t").unwrap_err();
        assert!(e.to_string().contains("limits.max_handshakes"), "{e}");
        let e = Config::from_toml("[limits]\nmax_connections_per_address = 0\n", "t").unwrap_err();
        assert!(e.to_string().contains("max_connections_per_address"), "{e}");
        let e = Config::from_toml("[limits]\nmin_frame_rate = 0\n", "t").unwrap_err();
        assert!(e.to_string().contains("limits.min_frame_rate"), "{e}");
        let e = Config::from_toml("[timeouts]\nframe = \"0s\"\n", "t").unwrap_err();
        assert!(e.to_string().contains("timeouts.frame"), "{e}");
    }

    #[test]
    fn log_levels_and_directives() {
        for ok in [
            "info",
            "DEBUG",
            "off",
            "warn,brokerd_server=trace",
            "brokerd_core=debug",
        ] {
            check_log_level(ok).unwrap();
        }
        for bad in ["verbose", "", "info,loud", "brokerd=chatty", "=info"] {
            assert!(check_log_level(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn listen_takes_host_names() {
        let c = Config::from_toml("listen = \"localhost:7700\"\n", "t").unwrap();
        assert!(c.listen.ip().is_loopback());
        assert_eq!(c.listen.port(), 7700);
        let c = Config::from_toml("listen = \"[::1]:7701\"\n", "t").unwrap();
        assert_eq!(c.listen.to_string(), "[::1]:7701");
        assert!(resolve_address("no-such-host.invalid:1").is_err());
    }

    #[test]
    fn frame_allowance_grows_with_the_frame() {
        let mut c = Config::default();
        c.timeouts.frame = Duration::from_secs(10);
        c.limits.min_frame_rate = 1024;
        assert_eq!(c.frame_allowance(0), Duration::from_secs(10));
        assert_eq!(c.frame_allowance(2048), Duration::from_secs(12));
        assert_eq!(c.frame_allowance(512), Duration::from_millis(10_500));
        c.limits.min_frame_rate = 1;
        assert!(c.frame_allowance(u32::MAX as usize) > Duration::from_secs(u32::MAX as u64));
    }

    #[test]
    fn http_is_an_address_or_off_and_a_reachable_one_needs_authentication() {
        assert_eq!(
            Config::default().http,
            Some(SocketAddr::from(([127, 0, 0, 1], 7655)))
        );
        for off in ["off", ""] {
            let c = Config::from_toml(&format!("http = \"{off}\"\n"), "t").unwrap();
            assert_eq!(c.http, None);
        }
        let c = Config::from_toml("http = \"localhost:7800\"\n", "t").unwrap();
        assert_eq!(c.http.unwrap().port(), 7800);
        let e = Config::from_toml("http = \"0.0.0.0:7655\"\n", "t").unwrap_err();
        assert!(e.to_string().contains("0.0.0.0:7655"), "{e}");
        let c = Config::from_toml(
            "http = \"0.0.0.0:7655\"\n[auth]\nallow_anonymous = true\n",
            "t",
        )
        .unwrap();
        assert!(c.http.is_some());
        // It round-trips through --print-config.
        let text = toml::to_string(&Config {
            http: None,
            ..Config::default()
        })
        .unwrap();
        assert!(text.contains("http = \"off\""), "{text}");
    }

    #[test]
    fn backpressure_wait_is_on_by_default_and_at_most_the_write_deadline() {
        let c = Config::default();
        assert_eq!(c.outbound.backpressure_wait, Duration::from_millis(100));
        assert!(c.broker_limits().outbox.press);
        let c = Config::from_toml("[outbound]\nbackpressure_wait = \"0s\"\n", "t").unwrap();
        assert!(!c.broker_limits().outbox.press);
        let e = Config::from_toml(
            "[outbound]\nwrite_deadline = \"1s\"\nbackpressure_wait = \"2s\"\n",
            "t",
        )
        .unwrap_err();
        assert!(e.to_string().contains("outbound.backpressure_wait"), "{e}");
    }
}
