//! [`ConnectOptions`] and [`Reconnect`]: how a client connects, and reconnects.

use crate::error::Error;
use crate::tls::TlsOptions;
use brokerd_proto::topic::validate_topic;
use brokerd_proto::{Credentials, OverflowPolicy, TopicLimits};
use std::time::Duration;

/// Options for [`crate::Client::connect`]: a builder, checked as a whole when connecting.
///
/// ```
/// use brokerd_client::{ConnectOptions, OverflowPolicy, Reconnect};
/// let options = ConnectOptions::new("inventory-service")
///     .token("s3cret")
///     .overflow(OverflowPolicy::DropOld)
///     .reconnect(Reconnect::default().max_attempts(20));
/// # let _ = options;
/// ```
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// Name shown in the server's logs and statistics.
    pub(crate) name: String,
    /// Overflow policy to ask for; `None` takes the server's default.
    pub(crate) overflow: Option<OverflowPolicy>,
    /// Do not receive this connection's own publications.
    pub(crate) no_echo: bool,
    /// Messages held per subscription (queued and not yet read) before the client stops
    /// reading the socket.
    pub(crate) subscription_capacity: usize,
    /// The same bound in bytes of topic, reply-to, headers and payload.
    pub(crate) subscription_bytes: usize,
    /// Bytes buffered for writing before publishing waits for the socket.
    pub(crate) write_buffer: usize,
    /// How long connecting and the handshake may take.
    pub(crate) connect_timeout: Duration,
    /// What to prove the client's identity with, for a server that requires it.
    pub(crate) credentials: Option<Credentials>,
    /// Replies to this client's requests arrive on `PREFIX.<random>.<n>`.
    pub(crate) inbox_prefix: String,
    /// Connect over TLS with these options; `None` for plain TCP.
    pub(crate) tls: Option<TlsOptions>,
    /// Reconnect when the connection is lost; `None` (the default): the client closes.
    pub(crate) reconnect: Option<Reconnect>,
    /// Further servers to try, in turn after the one given to connect, when reconnecting.
    pub(crate) servers: Vec<String>,
}

/// How a client reconnects (see [`ConnectOptions::reconnect`]).
///
/// After a connection is lost, the client dials its servers in turn: the first attempt at once,
/// then after `initial_delay`, doubling up to `max_delay`, each delay shortened by a random
/// fraction of up to a half so that a fleet does not come back in lockstep. On success it makes
/// every live subscription again (queue groups included, and the request inbox), then sends the
/// publishes buffered meanwhile.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Reconnect {
    /// Attempts before giving up and closing; `None` for no limit.
    pub max_attempts: Option<u32>,
    /// The delay after the first failed attempt.
    pub initial_delay: Duration,
    /// The longest delay between attempts.
    pub max_delay: Duration,
    /// Bytes of publishes (without acknowledgement) buffered while disconnected; a publish
    /// beyond this fails with [`Error::Disconnected`].
    pub buffer_bytes: usize,
}

impl Default for Reconnect {
    fn default() -> Reconnect {
        Reconnect {
            max_attempts: None,
            initial_delay: Duration::from_millis(50),
            max_delay: Duration::from_secs(2),
            buffer_bytes: 8 * 1024 * 1024,
        }
    }
}

impl Reconnect {
    /// Gives up after `n` attempts in a row.
    pub fn max_attempts(mut self, n: u32) -> Reconnect {
        self.max_attempts = Some(n);
        self
    }

    /// Sets the first and the longest delay between attempts.
    pub fn delays(mut self, initial: Duration, max: Duration) -> Reconnect {
        self.initial_delay = initial;
        self.max_delay = max.max(initial);
        self
    }

    /// Sets how many bytes of publishes are buffered while disconnected.
    pub fn buffer_bytes(mut self, n: usize) -> Reconnect {
        self.buffer_bytes = n;
        self
    }

    /// The delay before attempt `attempt` (0: the first, at once), with `jitter` in [0, 1).
    pub(crate) fn delay(&self, attempt: u32, jitter: f64) -> Duration {
        if attempt == 0 {
            return Duration::ZERO;
        }
        let base = self
            .initial_delay
            .saturating_mul(1u32 << (attempt - 1).min(20))
            .min(self.max_delay);
        base.mul_f64(1.0 - jitter / 2.0)
    }
}

impl ConnectOptions {
    /// Defaults with this client name.
    pub fn new(name: impl Into<String>) -> ConnectOptions {
        ConnectOptions {
            name: name.into(),
            ..ConnectOptions::default()
        }
    }

    /// Sets the overflow policy to ask for.
    pub fn overflow(mut self, policy: OverflowPolicy) -> ConnectOptions {
        self.overflow = Some(policy);
        self
    }

    /// Authenticates with the server's shared token.
    pub fn token(mut self, token: impl Into<String>) -> ConnectOptions {
        self.credentials = Some(Credentials::Token(token.into()));
        self
    }

    /// Authenticates as a configured user.
    pub fn user_password(
        mut self,
        user: impl Into<String>,
        password: impl Into<String>,
    ) -> ConnectOptions {
        self.credentials = Some(Credentials::Password {
            user: user.into(),
            password: password.into(),
        });
        self
    }

    /// Connects over TLS.
    pub fn tls(mut self, tls: TlsOptions) -> ConnectOptions {
        self.tls = Some(tls);
        self
    }

    /// Sets the prefix of this client's reply inbox (default `_INBOX`).
    pub fn inbox_prefix(mut self, prefix: impl Into<String>) -> ConnectOptions {
        self.inbox_prefix = prefix.into();
        self
    }

    /// Sets whether to skip this connection's own publications.
    pub fn no_echo(mut self, no_echo: bool) -> ConnectOptions {
        self.no_echo = no_echo;
        self
    }

    /// Reconnects, as `policy` says, when the connection is lost.
    pub fn reconnect(mut self, policy: Reconnect) -> ConnectOptions {
        self.reconnect = Some(policy);
        self
    }

    /// Adds servers to try in turn when reconnecting.
    pub fn servers<S: Into<String>>(
        mut self,
        servers: impl IntoIterator<Item = S>,
    ) -> ConnectOptions {
        self.servers.extend(servers.into_iter().map(Into::into));
        self
    }

    /// Bounds each subscription's queue (messages received and not yet read) to `messages`
    /// and `bytes`, whichever is reached first; when full, the client stops reading the socket
    /// and the server's overflow policy decides what is dropped. One message larger than
    /// `bytes` is still taken into an empty queue. Defaults: 8,192 messages, 16 MiB.
    pub fn subscription_capacity(mut self, messages: usize, bytes: usize) -> ConnectOptions {
        self.subscription_capacity = messages;
        self.subscription_bytes = bytes;
        self
    }

    /// Sets how many bytes of outgoing frames are buffered before a publish waits for the
    /// socket (default 4 MiB).
    pub fn write_buffer(mut self, bytes: usize) -> ConnectOptions {
        self.write_buffer = bytes;
        self
    }

    /// Sets how long connecting and the handshake may take (default 10 s), for the first
    /// connection and each reconnect attempt.
    pub fn connect_timeout(mut self, timeout: Duration) -> ConnectOptions {
        self.connect_timeout = timeout;
        self
    }

    /// The client name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Checks the options as a whole; [`crate::Client::connect`] calls it before dialing.
    pub(crate) fn check(&self) -> Result<(), Error> {
        let invalid = |option, reason: &str| {
            Err(Error::InvalidOption {
                option,
                reason: reason.to_string(),
            })
        };
        let str16 = |s: &str| s.len() <= usize::from(u16::MAX);
        if !str16(&self.name) {
            return invalid("new", "the name is longer than 65535 bytes");
        }
        match &self.credentials {
            Some(Credentials::Token(t)) if !str16(t) => {
                return invalid("token", "longer than 65535 bytes");
            }
            Some(Credentials::Password { user, password }) if !str16(user) || !str16(password) => {
                return invalid("user_password", "longer than 65535 bytes");
            }
            _ => {}
        }
        if let Err(e) = validate_topic(&self.inbox_prefix, &TopicLimits::WIRE) {
            return invalid("inbox_prefix", &format!("not a valid topic: {e}"));
        }
        if self.subscription_capacity == 0 || self.subscription_bytes == 0 {
            return invalid(
                "subscription_capacity",
                "must be at least 1 message and 1 byte",
            );
        }
        if self.write_buffer == 0 {
            return invalid("write_buffer", "must be at least 1 byte");
        }
        if self.connect_timeout.is_zero() {
            return invalid("connect_timeout", "must be longer than zero");
        }
        if let Some(r) = &self.reconnect
            && r.initial_delay.is_zero()
        {
            return invalid("reconnect", "the initial delay must be longer than zero");
        }
        Ok(())
    }
}

impl Default for ConnectOptions {
    fn default() -> ConnectOptions {
        ConnectOptions {
            name: "brokerd-client".into(),
            overflow: None,
            no_echo: false,
            subscription_capacity: 8192,
            subscription_bytes: 16 * 1024 * 1024,
            write_buffer: 4 * 1024 * 1024,
            connect_timeout: Duration::from_secs(10),
            credentials: None,
            inbox_prefix: "_INBOX".into(),
            tls: None,
            reconnect: None,
            servers: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn option_error(options: &ConnectOptions) -> Option<&'static str> {
        match options.check() {
            Ok(()) => None,
            Err(Error::InvalidOption { option, .. }) => Some(option),
            Err(e) => panic!("unexpected error {e}"),
        }
    }

    #[test]
    fn every_option_is_checked_whatever_the_order() {
        assert_eq!(option_error(&ConnectOptions::default()), None);
        let o = ConnectOptions::new("x").inbox_prefix("bad..prefix");
        assert_eq!(option_error(&o), Some("inbox_prefix"));
        let o = ConnectOptions::new("x").inbox_prefix("_INBOX.*");
        assert_eq!(option_error(&o), Some("inbox_prefix"));
        let o = ConnectOptions::new("x").subscription_capacity(0, 10);
        assert_eq!(option_error(&o), Some("subscription_capacity"));
        let o = ConnectOptions::new("x").write_buffer(0);
        assert_eq!(option_error(&o), Some("write_buffer"));
        let o = ConnectOptions::new("x").connect_timeout(Duration::ZERO);
        assert_eq!(option_error(&o), Some("connect_timeout"));
        let o = ConnectOptions::new("x").token("t".repeat(70_000));
        assert_eq!(option_error(&o), Some("token"));
        let o = ConnectOptions::new("n".repeat(70_000));
        assert_eq!(option_error(&o), Some("new"));
    }

    #[test]
    fn reconnect_delays_double_up_to_the_maximum_less_jitter() {
        let r = Reconnect::default().delays(Duration::from_millis(100), Duration::from_millis(300));
        assert_eq!(r.delay(0, 0.0), Duration::ZERO);
        assert_eq!(r.delay(1, 0.0), Duration::from_millis(100));
        assert_eq!(r.delay(2, 0.0), Duration::from_millis(200));
        assert_eq!(r.delay(3, 0.0), Duration::from_millis(300));
        assert_eq!(r.delay(40, 0.0), Duration::from_millis(300));
        assert_eq!(
            r.delay(2, 0.999_999),
            Duration::from_millis(200).mul_f64(1.0 - 0.999_999 / 2.0)
        );
    }
}
