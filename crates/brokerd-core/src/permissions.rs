//! What one authenticated identity may do: publish and subscribe rules, queue groups, the
//! `$`-space, per-user quotas and the one-time permits that let a responder answer a request.
//!
//! Runtime-free and without I/O: the server's connection task asks [`Permissions`] before it
//! routes a `PUB` or adds a `SUB`, and memoizes the answers per connection; the broker's delivery
//! path grants [`ResponsePermits`] when it queues a request with a reply-to. Time is passed in.
//!
//! The rules' meaning (`docs/security.md`): `allow` absent allows everything, present allows only
//! what it covers; `deny` always wins. A `SUB` filter passes when an allow filter covers every topic
//! it can match and it can match no topic a deny filter matches, so a subscription never receives
//! a message its user could not subscribe to directly.

use brokerd_proto::Filter;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Allow and deny filters for one direction (publish or subscribe).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rules {
    /// When `Some`, only what these filters cover is allowed.
    pub allow: Option<Vec<Filter>>,
    /// Never allowed, whatever `allow` says.
    pub deny: Vec<Filter>,
}

/// Why a request was refused; its `Display` names the rule, for the `ERR` text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denial {
    /// No allow filter covers it.
    NotAllowed,
    /// A deny filter matches (or, for a filter, overlaps) it.
    Denied(Filter),
    /// `$` topics and filters are for users with the admin role.
    Reserved,
    /// The queue group is not among the user's groups.
    QueueGroup,
}

impl fmt::Display for Denial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Denial::NotAllowed => f.write_str("no allow rule covers it"),
            Denial::Denied(rule) => write!(f, "denied by rule '{rule}'"),
            Denial::Reserved => f.write_str("'$' topics are for admin users"),
            Denial::QueueGroup => f.write_str("not one of the user's queue groups"),
        }
    }
}

impl Rules {
    /// Rules that allow everything.
    pub fn everything() -> Rules {
        Rules::default()
    }

    /// Whether nothing is restricted.
    pub fn is_open(&self) -> bool {
        self.allow.is_none() && self.deny.is_empty()
    }

    /// Whether `topic` (a valid topic) passes.
    ///
    /// # Errors
    /// The rule that refuses it.
    pub fn check_topic(&self, topic: &str) -> Result<(), Denial> {
        if let Some(rule) = self.deny.iter().find(|d| d.matches(topic)) {
            return Err(Denial::Denied(rule.clone()));
        }
        match &self.allow {
            Some(allow) if !allow.iter().any(|a| a.matches(topic)) => Err(Denial::NotAllowed),
            _ => Ok(()),
        }
    }

    /// Whether `filter` (a valid filter) passes: covered by an allow filter and overlapping no
    /// deny filter.
    ///
    /// # Errors
    /// The rule that refuses it.
    pub fn check_filter(&self, filter: &str) -> Result<(), Denial> {
        if let Some(rule) = self.deny.iter().find(|d| overlaps(filter, d.as_str())) {
            return Err(Denial::Denied(rule.clone()));
        }
        match &self.allow {
            Some(allow) if !allow.iter().any(|a| covers(a.as_str(), filter)) => {
                Err(Denial::NotAllowed)
            }
            _ => Ok(()),
        }
    }
}

/// Whether every topic `inner` matches is also matched by `outer` (both valid filters; a topic
/// is a filter without wildcards).
pub fn covers(outer: &str, inner: &str) -> bool {
    let mut o = outer.split('.');
    let mut i = inner.split('.');
    loop {
        match (o.next(), i.next()) {
            (None, None) => return true,
            // `>` takes one or more tokens, and `inner` has at least this one.
            (Some(">"), Some(_)) => return true,
            (Some(_), Some(">")) => return false,
            (Some("*"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            _ => return false,
        }
    }
}

/// Whether some topic matches both `a` and `b` (valid filters).
pub fn overlaps(a: &str, b: &str) -> bool {
    let mut x = a.split('.');
    let mut y = b.split('.');
    loop {
        match (x.next(), y.next()) {
            (None, None) => return true,
            (Some(">"), Some(_)) | (Some(_), Some(">")) => return true,
            (Some("*"), Some(_)) | (Some(_), Some("*")) => {}
            (Some(p), Some(q)) if p == q => {}
            _ => return false,
        }
    }
}

/// How a user with `allow_responses` may answer requests it receives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResponsePolicy {
    /// Publishes allowed to one request's reply-to.
    pub max: u32,
    /// How long after the request was queued for it the permit lasts.
    pub expires: Duration,
}

impl Default for ResponsePolicy {
    fn default() -> ResponsePolicy {
        ResponsePolicy {
            max: 1,
            expires: Duration::from_secs(60),
        }
    }
}

/// Everything one identity may do. An identity with no `Permissions` may do everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Permissions {
    /// Topics it may publish to.
    pub publish: Rules,
    /// Filters it may subscribe to; also the reply-to topics it may name.
    pub subscribe: Rules,
    /// When `Some`, the only queue groups it may join.
    pub queue_groups: Option<Vec<String>>,
    /// May read `$` topics and see every connection in the statistics.
    pub admin: bool,
    /// May answer the requests it receives even where it may not publish otherwise.
    pub responses: Option<ResponsePolicy>,
}

impl Permissions {
    /// Permissions that allow everything, admin included.
    pub fn all() -> Permissions {
        Permissions {
            admin: true,
            ..Permissions::default()
        }
    }

    /// Whether it may publish to `topic` (valid, not reserved: reserved topics are the broker's
    /// own business, refused or answered before this is asked).
    ///
    /// # Errors
    /// The rule that refuses it.
    pub fn may_publish(&self, topic: &str) -> Result<(), Denial> {
        self.publish.check_topic(topic)
    }

    /// Whether it may name `reply` (a valid topic) as a reply-to: only a topic it could
    /// subscribe to, so that no one can direct answers into another's inbox.
    ///
    /// # Errors
    /// The rule that refuses it.
    pub fn may_reply_to(&self, reply: &str) -> Result<(), Denial> {
        if !self.admin && brokerd_proto::topic::is_reserved(reply) {
            return Err(Denial::Reserved);
        }
        self.subscribe.check_topic(reply)
    }

    /// Whether it may subscribe to `filter` (valid), in queue group `queue` if given.
    ///
    /// # Errors
    /// The rule that refuses it.
    pub fn may_subscribe(&self, filter: &str, queue: Option<&str>) -> Result<(), Denial> {
        if !self.admin && brokerd_proto::topic::is_reserved(filter) {
            return Err(Denial::Reserved);
        }
        self.subscribe.check_filter(filter)?;
        match (queue, &self.queue_groups) {
            (Some(q), Some(groups)) if !groups.iter().any(|g| g == q) => Err(Denial::QueueGroup),
            _ => Ok(()),
        }
    }

    /// Whether publishing needs a check at all.
    pub fn publish_is_open(&self) -> bool {
        self.publish.is_open()
    }
}

/// Counts shared by every connection of one user, against the user's quotas.
#[derive(Debug)]
pub struct Quota {
    /// Most connections at once; `usize::MAX` for no limit. Changed by a reload.
    max_connections: AtomicUsize,
    /// Most subscriptions across its connections; `usize::MAX` for no limit.
    max_subscriptions: AtomicUsize,
    connections: AtomicUsize,
    subscriptions: AtomicUsize,
}

impl Quota {
    /// A quota with these limits and nothing counted.
    pub fn new(max_connections: usize, max_subscriptions: usize) -> Quota {
        Quota {
            max_connections: AtomicUsize::new(max_connections),
            max_subscriptions: AtomicUsize::new(max_subscriptions),
            connections: AtomicUsize::new(0),
            subscriptions: AtomicUsize::new(0),
        }
    }

    /// Most connections at once; `usize::MAX` for no limit.
    pub fn max_connections(&self) -> usize {
        self.max_connections.load(Ordering::Relaxed)
    }

    /// Most subscriptions across the user's connections; `usize::MAX` for no limit.
    pub fn max_subscriptions(&self) -> usize {
        self.max_subscriptions.load(Ordering::Relaxed)
    }

    /// Changes the limits, keeping the counts (a configuration reload). Lower limits turn away
    /// new connections and subscriptions, never existing ones.
    pub fn set_limits(&self, max_connections: usize, max_subscriptions: usize) {
        self.max_connections
            .store(max_connections, Ordering::Relaxed);
        self.max_subscriptions
            .store(max_subscriptions, Ordering::Relaxed);
    }

    fn try_take(counter: &AtomicUsize, max: usize) -> bool {
        counter
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .is_ok()
    }

    /// Counts one more connection, unless that would pass the limit.
    pub fn try_connect(&self) -> bool {
        Quota::try_take(&self.connections, self.max_connections())
    }

    /// Counts a connection gone.
    pub fn disconnected(&self) {
        self.connections.fetch_sub(1, Ordering::AcqRel);
    }

    /// Counts one more subscription, unless that would pass the limit.
    pub fn try_subscribe(&self) -> bool {
        Quota::try_take(&self.subscriptions, self.max_subscriptions())
    }

    /// Counts `n` subscriptions gone.
    pub fn unsubscribed(&self, n: usize) {
        self.subscriptions.fetch_sub(n, Ordering::AcqRel);
    }

    /// Connections counted now.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::Acquire)
    }

    /// Subscriptions counted now.
    pub fn subscriptions(&self) -> usize {
        self.subscriptions.load(Ordering::Acquire)
    }
}

/// Who a connection is and what it may do; fixed at its handshake.
#[derive(Debug, Clone, Default)]
pub struct Identity {
    /// The configured user it authenticated as; `None` for a token or no authentication.
    pub user: Option<std::sync::Arc<str>>,
    /// What it may do; `None` for everything (admin included).
    pub permissions: Option<std::sync::Arc<Permissions>>,
    /// The user's shared counts, when it has quotas.
    pub quota: Option<std::sync::Arc<Quota>>,
}

impl Identity {
    /// Whether it may read `$` topics and every connection's statistics.
    pub fn is_admin(&self) -> bool {
        self.permissions.as_ref().is_none_or(|p| p.admin)
    }
}

/// Most reply-to topics one connection holds permits for; the oldest goes first when full.
pub const MAX_PERMITS: usize = 1024;

/// One connection's permits to answer requests it received, for a user with
/// [`Permissions::responses`]. Bounded at [`MAX_PERMITS`]; a leaf lock, held for one map
/// operation.
#[derive(Debug)]
pub struct ResponsePermits {
    policy: ResponsePolicy,
    map: Mutex<HashMap<Box<str>, (Instant, u32)>>,
}

impl ResponsePermits {
    /// No permits yet, granted under `policy`.
    pub fn new(policy: ResponsePolicy) -> ResponsePermits {
        ResponsePermits {
            policy,
            map: Mutex::new(HashMap::new()),
        }
    }

    /// Records that a request with reply-to `reply` was queued for this connection at `now`.
    pub fn grant(&self, reply: &str, now: Instant) {
        let expires = now + self.policy.expires;
        let mut map = self.map.lock();
        if let Some(p) = map.get_mut(reply) {
            *p = (expires, self.policy.max);
            return;
        }
        if map.len() >= MAX_PERMITS {
            map.retain(|_, (at, _)| *at > now);
            if map.len() >= MAX_PERMITS {
                // Still full of live permits: the one expiring first makes room.
                let oldest = map
                    .iter()
                    .min_by_key(|(_, (at, _))| *at)
                    .map(|(k, _)| k.clone());
                if let Some(k) = oldest {
                    map.remove(&k);
                }
            }
        }
        map.insert(reply.into(), (expires, self.policy.max));
    }

    /// Uses one permit to publish to `topic` at `now`; false when none is left.
    pub fn take(&self, topic: &str, now: Instant) -> bool {
        let mut map = self.map.lock();
        let Some((at, left)) = map.get_mut(topic) else {
            return false;
        };
        if *at <= now {
            map.remove(topic);
            return false;
        }
        *left -= 1;
        if *left == 0 {
            map.remove(topic);
        }
        true
    }

    /// Permits held now.
    pub fn len(&self) -> usize {
        self.map.lock().len()
    }

    /// Whether none are held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(s: &str) -> Filter {
        Filter::new(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    fn rules(allow: Option<&[&str]>, deny: &[&str]) -> Rules {
        Rules {
            allow: allow.map(|a| a.iter().map(|s| f(s)).collect()),
            deny: deny.iter().map(|s| f(s)).collect(),
        }
    }

    #[test]
    fn covers_follows_the_wildcards() {
        assert!(covers(">", "a"));
        assert!(covers(">", "a.*.>"));
        assert!(covers("a.>", "a.b.c"));
        assert!(covers("a.>", "a.*"));
        assert!(!covers("a.>", "a"));
        assert!(!covers("a.*", "a.>"));
        assert!(covers("a.*", "a.*"));
        assert!(covers("a.*", "a.b"));
        assert!(!covers("a.b", "a.*"));
        assert!(!covers("a.*", "a.b.c"));
        assert!(covers("*.error", "db.error"));
        assert!(!covers("*.error", "db.*"));
    }

    #[test]
    fn overlaps_finds_a_common_topic() {
        assert!(overlaps(">", "secret.x"));
        assert!(overlaps("a.*", "*.b"));
        assert!(overlaps("a.>", "a.b.c"));
        assert!(!overlaps("a.>", "a"));
        assert!(!overlaps("a.*", "b.*"));
        assert!(!overlaps("a.*", "a.b.c"));
        assert!(overlaps("a.*.c", "a.>"));
        assert!(!overlaps("a.b", "a.c"));
    }

    /// `covers` and `overlaps` agree with matching over every topic of a small alphabet.
    #[test]
    fn the_filter_algebra_agrees_with_matching() {
        let tokens = ["a", "b", "*", ">"];
        let mut filters = Vec::new();
        for n in 1..=3 {
            let mut idx = vec![0usize; n];
            loop {
                let s: Vec<&str> = idx.iter().map(|&i| tokens[i]).collect();
                let s = s.join(".");
                if Filter::new(&s).is_ok() {
                    filters.push(s);
                }
                let mut k = 0;
                while k < n {
                    idx[k] += 1;
                    if idx[k] < tokens.len() {
                        break;
                    }
                    idx[k] = 0;
                    k += 1;
                }
                if k == n {
                    break;
                }
            }
        }
        // Topics up to four tokens from {a, b, c}: `c` stands for any token the filters lack.
        let mut topics = Vec::new();
        for n in 1..=4u32 {
            for i in 0..3usize.pow(n) {
                let t: Vec<&str> = (0..n)
                    .map(|k| ["a", "b", "c"][(i / 3usize.pow(k)) % 3])
                    .collect();
                topics.push(t.join("."));
            }
        }
        for x in &filters {
            for y in &filters {
                let (fx, fy) = (f(x), f(y));
                let both = topics.iter().any(|t| fx.matches(t) && fy.matches(t));
                assert_eq!(overlaps(x, y), both, "overlaps({x}, {y})");
                let within = topics.iter().all(|t| !fy.matches(t) || fx.matches(t));
                assert_eq!(covers(x, y), within, "covers({x}, {y})");
            }
        }
    }

    #[test]
    fn deny_wins_over_allow() {
        let r = rules(Some(&["orders.>"]), &["orders.secret.>"]);
        assert_eq!(r.check_topic("orders.created"), Ok(()));
        assert_eq!(
            r.check_topic("orders.secret.x"),
            Err(Denial::Denied(f("orders.secret.>")))
        );
        assert_eq!(r.check_topic("users.created"), Err(Denial::NotAllowed));
        assert_eq!(r.check_filter("orders.*"), Ok(()));
        // It could receive a denied topic.
        assert_eq!(
            r.check_filter("orders.>"),
            Err(Denial::Denied(f("orders.secret.>")))
        );
        assert_eq!(
            r.check_filter(">"),
            Err(Denial::Denied(f("orders.secret.>")))
        );
        assert_eq!(r.check_filter("users.*"), Err(Denial::NotAllowed));
        let open = rules(None, &["secret.>"]);
        assert_eq!(open.check_topic("anything.at.all"), Ok(()));
        assert_eq!(open.check_filter("a.*"), Ok(()));
    }

    #[test]
    fn dollar_topics_queue_groups_and_reply_to() {
        let p = Permissions {
            subscribe: rules(Some(&["_INBOX.svc.>", "jobs.>"]), &[]),
            queue_groups: Some(vec!["workers".into()]),
            ..Permissions::default()
        };
        assert_eq!(p.may_subscribe("$SYS.>", None), Err(Denial::Reserved));
        assert_eq!(p.may_reply_to("$SYS.x"), Err(Denial::Reserved));
        assert_eq!(p.may_reply_to("_INBOX.svc.1"), Ok(()));
        assert_eq!(p.may_reply_to("_INBOX.other.1"), Err(Denial::NotAllowed));
        assert_eq!(p.may_subscribe("jobs.*", Some("workers")), Ok(()));
        assert_eq!(
            p.may_subscribe("jobs.*", Some("thieves")),
            Err(Denial::QueueGroup)
        );
        let admin = Permissions::all();
        assert_eq!(admin.may_subscribe("$SYS.>", None), Ok(()));
        assert!(Identity::default().is_admin());
    }

    #[test]
    fn a_permit_is_used_once_and_expires() {
        let permits = ResponsePermits::new(ResponsePolicy {
            max: 1,
            expires: Duration::from_secs(5),
        });
        let t0 = Instant::now();
        permits.grant("_INBOX.a.1", t0);
        assert!(!permits.take("_INBOX.a.2", t0));
        assert!(permits.take("_INBOX.a.1", t0));
        assert!(!permits.take("_INBOX.a.1", t0), "used once");
        permits.grant("_INBOX.a.3", t0);
        assert!(!permits.take("_INBOX.a.3", t0 + Duration::from_secs(6)));
        assert!(permits.is_empty());
    }

    #[test]
    fn permits_are_bounded() {
        let permits = ResponsePermits::new(ResponsePolicy::default());
        let t0 = Instant::now();
        for i in 0..MAX_PERMITS + 10 {
            permits.grant(&format!("r.{i}"), t0 + Duration::from_millis(i as u64));
        }
        assert_eq!(permits.len(), MAX_PERMITS);
        // The earliest went first.
        assert!(!permits.take("r.0", t0));
        assert!(permits.take(&format!("r.{}", MAX_PERMITS + 9), t0));
    }

    #[test]
    fn quotas_count_and_refuse() {
        let q = Quota::new(1, 2);
        assert!(q.try_connect());
        assert!(!q.try_connect());
        q.disconnected();
        assert!(q.try_connect());
        assert!(q.try_subscribe() && q.try_subscribe());
        assert!(!q.try_subscribe());
        q.unsubscribed(2);
        assert_eq!(q.subscriptions(), 0);
    }
}
