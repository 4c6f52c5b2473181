//! Topics and filters: parsed once at the edge, trusted after.
//!
//! A topic is one or more non-empty tokens separated by `.`; a token holds no whitespace and
//! neither `*` nor `>`. A filter is a topic in which a whole token may be `*` (exactly one token)
//! and the last token may be `>` (one or more remaining tokens). Topics whose first token starts
//! with `$` are reserved for the broker. Length and token limits are the server's configuration,
//! passed in as [`TopicLimits`]; this module does not know where they came from.

use std::fmt;
use thiserror::Error;

/// Upper bounds on topics and filters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TopicLimits {
    /// Maximum length in bytes.
    pub max_len: usize,
    /// Maximum number of tokens.
    pub max_tokens: usize,
}

impl TopicLimits {
    /// The widest limits the wire format can carry: a string is at most `u16::MAX` bytes.
    pub const WIRE: TopicLimits = TopicLimits {
        max_len: u16::MAX as usize,
        max_tokens: u16::MAX as usize,
    };
}

/// Why a string is not a valid topic or filter.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum TopicError {
    /// The string is empty.
    #[error("empty")]
    Empty,
    /// The string is longer than allowed.
    #[error("{len} bytes, over the limit of {max}")]
    TooLong {
        /// Actual length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The string has more tokens than allowed.
    #[error("more than {max} tokens")]
    TooManyTokens {
        /// The limit.
        max: usize,
    },
    /// Two dots in a row, or a leading or trailing dot.
    #[error("empty token at position {0}")]
    EmptyToken(usize),
    /// A token contains whitespace.
    #[error("whitespace in token {0}")]
    Whitespace(usize),
    /// A topic contains `*` or `>`, or a filter token mixes them with other characters.
    #[error("wildcard character in token {0}")]
    Wildcard(usize),
    /// A filter has `>` before its last token.
    #[error("'>' is only allowed as the last token")]
    TailNotLast,
    /// The bytes are not UTF-8.
    #[error("not valid utf-8")]
    InvalidUtf8,
}

fn check(s: &str, limits: &TopicLimits, wildcards: bool) -> Result<(), TopicError> {
    if !wildcards
        && s.is_ascii()
        && !s.is_empty()
        && s.len() <= limits.max_len
        && let Some(r) = check_ascii_topic(s.as_bytes(), limits)
    {
        return r;
    }
    if s.is_empty() {
        return Err(TopicError::Empty);
    }
    if s.len() > limits.max_len {
        return Err(TopicError::TooLong {
            len: s.len(),
            max: limits.max_len,
        });
    }
    let mut count = 0usize;
    let mut tokens = s.split('.').peekable();
    while let Some(token) = tokens.next() {
        let i = count;
        count += 1;
        if count > limits.max_tokens {
            return Err(TopicError::TooManyTokens {
                max: limits.max_tokens,
            });
        }
        if token.is_empty() {
            return Err(TopicError::EmptyToken(i));
        }
        if wildcards && token == "*" {
            continue;
        }
        if wildcards && token == ">" {
            if tokens.peek().is_some() {
                return Err(TopicError::TailNotLast);
            }
            continue;
        }
        for c in token.chars() {
            if c == '*' || c == '>' {
                return Err(TopicError::Wildcard(i));
            }
            if c.is_whitespace() {
                return Err(TopicError::Whitespace(i));
            }
        }
    }
    Ok(())
}

/// The common case of [`check`] in one pass over bytes: an ASCII topic. `None` means "ask the
/// general check", which also produces the precise error.
fn check_ascii_topic(b: &[u8], limits: &TopicLimits) -> Option<Result<(), TopicError>> {
    let mut tokens = 1usize;
    let mut token_len = 0usize;
    for &c in b {
        match c {
            b'.' => {
                if token_len == 0 {
                    return None;
                }
                tokens += 1;
                token_len = 0;
            }
            b'*' | b'>' | b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c => return None,
            _ => token_len += 1,
        }
    }
    if token_len == 0 || tokens > limits.max_tokens {
        return None;
    }
    Some(Ok(()))
}

/// Checks that `s` is a valid topic under `limits`, without allocating.
///
/// # Errors
/// The first rule `s` breaks.
pub fn validate_topic(s: &str, limits: &TopicLimits) -> Result<(), TopicError> {
    check(s, limits, false)
}

/// Checks that `s` is a valid filter under `limits`, without allocating.
///
/// # Errors
/// The first rule `s` breaks.
pub fn validate_filter(s: &str, limits: &TopicLimits) -> Result<(), TopicError> {
    check(s, limits, true)
}

/// The topic a client publishes to, with a reply-to, to ask the broker for its statistics: the
/// broker answers on the reply-to with one JSON object (`docs/operations.md`, "Monitoring").
/// The one reserved topic a client may publish to.
pub const STATS_REQUEST: &str = "$SYS.req.stats";

/// Whether a topic or filter names the broker's reserved (`$`-prefixed) space.
pub fn is_reserved(s: &str) -> bool {
    s.starts_with('$')
}

/// A validated topic: dot-separated tokens, no wildcards.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Topic(Box<str>);

impl Topic {
    /// Parses a topic under the wire format's own limits.
    ///
    /// # Errors
    /// The first rule `s` breaks.
    pub fn new(s: &str) -> Result<Topic, TopicError> {
        Topic::with_limits(s, &TopicLimits::WIRE)
    }

    /// Parses a topic under `limits`.
    ///
    /// # Errors
    /// The first rule `s` breaks.
    pub fn with_limits(s: &str, limits: &TopicLimits) -> Result<Topic, TopicError> {
        validate_topic(s, limits)?;
        Ok(Topic(s.into()))
    }

    /// The topic text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The tokens, in order.
    pub fn tokens(&self) -> std::str::Split<'_, char> {
        self.0.split('.')
    }
}

impl fmt::Display for Topic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Topic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Topic({:?})", &*self.0)
    }
}

impl AsRef<str> for Topic {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// A validated filter: a topic whose tokens may be `*`, and whose last token may be `>`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Filter(Box<str>);

impl Filter {
    /// Parses a filter under the wire format's own limits.
    ///
    /// # Errors
    /// The first rule `s` breaks.
    pub fn new(s: &str) -> Result<Filter, TopicError> {
        Filter::with_limits(s, &TopicLimits::WIRE)
    }

    /// Parses a filter under `limits`.
    ///
    /// # Errors
    /// The first rule `s` breaks.
    pub fn with_limits(s: &str, limits: &TopicLimits) -> Result<Filter, TopicError> {
        validate_filter(s, limits)?;
        Ok(Filter(s.into()))
    }

    /// The filter text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The tokens, in order.
    pub fn tokens(&self) -> std::str::Split<'_, char> {
        self.0.split('.')
    }

    /// Whether the filter has no wildcard token, so that it matches exactly one topic: itself.
    pub fn is_literal(&self) -> bool {
        !self.tokens().any(|t| t == "*" || t == ">")
    }

    /// Whether this filter matches `topic`, by direct comparison of tokens.
    ///
    /// This is the reference matcher; the broker's trie must agree with it.
    pub fn matches(&self, topic: &str) -> bool {
        let mut f = self.tokens();
        let mut t = topic.split('.');
        loop {
            match (f.next(), t.next()) {
                (Some(">"), Some(_)) => return true,
                (Some("*"), Some(_)) => {}
                (Some(a), Some(b)) if a == b => {}
                (None, None) => return true,
                _ => return false,
            }
        }
    }
}

impl fmt::Display for Filter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Filter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Filter({:?})", &*self.0)
    }
}

impl AsRef<str> for Filter {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics() {
        assert!(Topic::new("user.created").is_ok());
        assert!(Topic::new("a").is_ok());
        assert!(Topic::new("$SYS.x").is_ok());
        assert!(Topic::new("ünï.cødé").is_ok());
        assert_eq!(Topic::new(""), Err(TopicError::Empty));
        assert_eq!(Topic::new("a..b"), Err(TopicError::EmptyToken(1)));
        assert_eq!(Topic::new(".a"), Err(TopicError::EmptyToken(0)));
        assert_eq!(Topic::new("a."), Err(TopicError::EmptyToken(1)));
        assert_eq!(Topic::new("a.*"), Err(TopicError::Wildcard(1)));
        assert_eq!(Topic::new("a.>"), Err(TopicError::Wildcard(1)));
        assert_eq!(Topic::new("a b"), Err(TopicError::Whitespace(0)));
        assert_eq!(Topic::new("a.\tb"), Err(TopicError::Whitespace(1)));
    }

    #[test]
    fn filters() {
        for ok in ["user.*", "*.error", ">", "a.>", "*.*.>", "a.b"] {
            assert!(Filter::new(ok).is_ok(), "{ok}");
        }
        assert_eq!(Filter::new(">.a"), Err(TopicError::TailNotLast));
        assert_eq!(Filter::new("a*"), Err(TopicError::Wildcard(0)));
        assert_eq!(Filter::new("a.b>"), Err(TopicError::Wildcard(1)));
        assert_eq!(Filter::new("a..*"), Err(TopicError::EmptyToken(1)));
    }

    #[test]
    fn limits() {
        let l = TopicLimits {
            max_len: 5,
            max_tokens: 2,
        };
        assert!(Topic::with_limits("a.b", &l).is_ok());
        assert_eq!(
            Topic::with_limits("abcdef", &l),
            Err(TopicError::TooLong { len: 6, max: 5 })
        );
        assert_eq!(
            Topic::with_limits("a.b.c", &l),
            Err(TopicError::TooManyTokens { max: 2 })
        );
    }

    #[test]
    fn reference_matcher() {
        let m = |f: &str, t: &str| Filter::new(f).map(|f| f.matches(t)).unwrap_or(false);
        assert!(m("user.*", "user.created"));
        assert!(!m("user.*", "user.created.eu"));
        assert!(!m("user.*", "user"));
        assert!(m("*.error", "api.error"));
        assert!(!m("*.error", "api.db.error"));
        assert!(m(">", "system.startup"));
        assert!(m("a.>", "a.b.c"));
        assert!(!m("a.>", "a"));
        assert!(m("a.b", "a.b"));
        assert!(!m("a.b", "a.c"));
    }
}
