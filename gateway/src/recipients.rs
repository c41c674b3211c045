//! Who may receive messages (`delivery.recipients`). Under `any`, every valid user id: a message
//! to a user who never logged in is stored for them. Under `known`, only users the cluster knows:
//! those who logged in once, and those an operator registered (`PUT /api/v1/users/{user}`). A
//! message to anyone else is refused with UNKNOWN_RECIPIENT before it takes a stream position,
//! so made-up user ids leave no row, no stream counter and no other state behind.
//!
//! Known users are rows of `known_users`, shared by every node. Each node remembers the users it
//! has seen known (bounded; forgotten wholesale when full) and, for a second, those it found
//! unknown, so that a stream of messages to made-up ids costs one query per id per second.
//! Under `known`, logins are recorded in batches by a background task, and a node starting
//! records every user that has a device cursor (one that logged in and acknowledged a message,
//! under any policy), so that switching to `known` does not refuse users who were already here.
//! Under `any` nothing is recorded: the policy costs nothing where it is not used.

use std::sync::Arc;
use std::time::Duration;

use dashmap::{DashMap, DashSet};
use imgate_shared::ErrorCode;
use metrics::{counter, describe_counter};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::config::RecipientPolicy;
use crate::store::{Store, StoreError};

/// Users remembered as known on this node; all are forgotten when it is full.
const KNOWN_CACHE: usize = 200_000;
/// Ids remembered as unknown, and for how long.
const UNKNOWN_CACHE: usize = 100_000;
const UNKNOWN_FOR: Duration = Duration::from_secs(1);
/// Logins waiting to be recorded; beyond, a login is not recorded (counted) until the user's next.
const REGISTER_QUEUE: usize = 10_000;
/// Most users recorded by one INSERT.
const REGISTER_BATCH: usize = 500;
/// Longest wait for the database when a recipient is looked up; then the message is refused as
/// UNAVAILABLE (the sender tries again).
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);

pub mod metric {
    /// Recipient checks under `known`, by outcome.
    pub const CHECKS: &str = "imgate_recipient_checks_total";
    /// Logins and registrations recorded in `known_users`, by outcome.
    pub const RECORDED: &str = "imgate_known_users_recorded_total";
}

/// This module's metrics with their kinds (`telemetry.rs` lists every metric).
pub const CATALOG: &[(&str, &str)] = &[(metric::CHECKS, "counter"), (metric::RECORDED, "counter")];

pub fn describe_metrics() {
    describe_counter!(
        metric::CHECKS,
        "Recipient checks under delivery.recipients = known, by outcome: known (remembered), known_db (looked up), unknown (refused UNKNOWN_RECIPIENT), error (refused UNAVAILABLE)."
    );
    describe_counter!(
        metric::RECORDED,
        "Users recorded as known, by outcome: written, failed (database error), dropped (queue full)."
    );
}

pub struct Recipients {
    policy: RecipientPolicy,
    store: Store,
    known: Arc<DashSet<Arc<str>>>,
    unknown: DashMap<String, Instant>,
    to_record: mpsc::Sender<Arc<str>>,
    /// Set once the users with a device cursor are recorded as known (the first lookup does it).
    backfilled: tokio::sync::OnceCell<()>,
}

impl Recipients {
    /// Starts the task that records logins.
    pub fn new(policy: RecipientPolicy, store: Store) -> Recipients {
        let (to_record, queue) = mpsc::channel(REGISTER_QUEUE);
        let known = Arc::new(DashSet::new());
        if policy == RecipientPolicy::Known {
            tokio::spawn(record(queue, store.clone(), known.clone()));
        }
        Recipients {
            policy,
            store,
            known,
            unknown: DashMap::new(),
            to_record,
            backfilled: tokio::sync::OnceCell::new(),
        }
    }

    /// `user` logged in on this node: known here at once, and to the cluster once the background
    /// task has recorded it (if that fails, the user's next login tries again).
    pub fn logged_in(&self, user: &Arc<str>) {
        if self.policy == RecipientPolicy::Any {
            return;
        }
        self.unknown.remove(&**user);
        if self.known.contains(user) {
            return;
        }
        remember(&self.known, user.clone());
        if self.to_record.try_send(user.clone()).is_err() {
            self.known.remove(user);
            counter!(metric::RECORDED, "outcome" => "dropped").increment(1);
        }
    }

    /// Records `user` as known and waits until it is written (the admin API's registration).
    pub async fn register(&self, user: &str) -> Result<(), StoreError> {
        self.store
            .register_users(&[user], crate::base::unix_millis())
            .await?;
        counter!(metric::RECORDED, "outcome" => "written").increment(1);
        self.unknown.remove(user);
        remember(&self.known, user.into());
        Ok(())
    }

    /// Whether a message may go to `to`: under `known`, `UNKNOWN_RECIPIENT` for a user the
    /// cluster does not know, `UNAVAILABLE` when the database does not say in time.
    pub async fn check(&self, to: &str) -> Result<(), ErrorCode> {
        if self.policy == RecipientPolicy::Any {
            return Ok(());
        }
        if self.known.contains(to) {
            counter!(metric::CHECKS, "outcome" => "known").increment(1);
            return Ok(());
        }
        if let Some(since) = self.unknown.get(to).map(|t| *t) {
            if since.elapsed() < UNKNOWN_FOR {
                counter!(metric::CHECKS, "outcome" => "unknown").increment(1);
                return Err(ErrorCode::UnknownRecipient);
            }
        }
        // Users who logged in before the policy was `known` have a device cursor: recorded
        // before the first lookup (once; a failure is logged and not retried).
        self.backfilled
            .get_or_init(|| async {
                let backfill = self.store.backfill_known_users(crate::base::unix_millis());
                match tokio::time::timeout(LOOKUP_TIMEOUT, backfill).await {
                    Ok(Ok(())) => {}
                    failed => crate::warn_limited!(
                        ?failed,
                        "users with a device cursor not recorded as known; they are at their next login"
                    ),
                }
            })
            .await;
        // Its own task: a lookup given up on is not cut off mid-query.
        let (store, user) = (self.store.clone(), to.to_owned());
        let lookup = tokio::spawn(async move { store.is_known_user(&user).await });
        match tokio::time::timeout(LOOKUP_TIMEOUT, lookup).await {
            Ok(Ok(Ok(true))) => {
                counter!(metric::CHECKS, "outcome" => "known_db").increment(1);
                self.unknown.remove(to);
                remember(&self.known, to.into());
                Ok(())
            }
            Ok(Ok(Ok(false))) => {
                counter!(metric::CHECKS, "outcome" => "unknown").increment(1);
                if self.unknown.len() >= UNKNOWN_CACHE {
                    self.unknown.clear();
                }
                self.unknown.insert(to.to_owned(), Instant::now());
                Err(ErrorCode::UnknownRecipient)
            }
            failed => {
                counter!(metric::CHECKS, "outcome" => "error").increment(1);
                crate::warn_limited!(?failed, "cannot look up a recipient; message refused");
                Err(ErrorCode::Unavailable)
            }
        }
    }
}

fn remember(known: &DashSet<Arc<str>>, user: Arc<str>) {
    if known.len() >= KNOWN_CACHE {
        known.clear();
    }
    known.insert(user);
}

/// Records queued logins in batches until every sender is gone.
async fn record(mut queue: mpsc::Receiver<Arc<str>>, store: Store, known: Arc<DashSet<Arc<str>>>) {
    let mut batch = Vec::with_capacity(REGISTER_BATCH);
    while queue.recv_many(&mut batch, REGISTER_BATCH).await > 0 {
        batch.sort();
        batch.dedup();
        let written = {
            let users: Vec<&str> = batch.iter().map(|u| &**u).collect();
            store
                .register_users(&users, crate::base::unix_millis())
                .await
        };
        let n = batch.len() as u64;
        match written {
            Ok(()) => {
                counter!(metric::RECORDED, "outcome" => "written").increment(n);
                batch.clear();
            }
            Err(e) => {
                counter!(metric::RECORDED, "outcome" => "failed").increment(n);
                crate::warn_limited!(error = %e, "cannot record logged-in users as known");
                // Forgotten, so that their next login records them.
                for user in batch.drain(..) {
                    known.remove(&user);
                }
            }
        }
    }
}
