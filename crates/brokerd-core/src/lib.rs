//! brokerd's routing state, synchronous and runtime-free.
//!
//! Layout:
//! - [`sublist`]: the subscription trie and its bounded match cache.
//! - [`subscription`]: one live subscription and its counters.
//! - [`outbox`]: a connection's bounded outbound queue and overflow policy.
//! - [`broker`]: the registry of clients, subscribe/unsubscribe/publish, limits and statistics.
//! - [`close`]: the typed reason every connection ends with.
//! - [`clock`]: a coarse millisecond clock the delivery path can afford to read.
//! - [`memory`]: the broker-wide memory budget.
//! - [`permissions`]: what an authenticated identity may publish, subscribe and answer.

pub mod broker;
pub mod clock;
pub mod close;
pub mod memory;
pub mod outbox;
pub mod permissions;
pub mod sublist;
pub mod subscription;

pub use broker::{
    Broker, BrokerStats, Client, ClientStats, DETACH_BELOW, Limits, Publication, PublishError,
    RawBody, RouteCache, SubscribeError, UnsubscribeError,
};
pub use close::CloseReason;
pub use memory::{Charge, MemoryBudget, Pressure};
pub use outbox::{Item, Outbox, OutboxLimits, OutboxStats, Push, Stored, Take};
pub use permissions::{
    Denial, Identity, Permissions, Quota, ResponsePermits, ResponsePolicy, Rules,
};
pub use sublist::{Sublist, SublistStats};
pub use subscription::{SubRef, Subscription};
