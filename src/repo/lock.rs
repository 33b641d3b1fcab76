//! Locking: backups share the store, `forget` and `prune` have it to themselves.
//!
//! A lock is a small plaintext object `locks/<time>-<random>.json` (see docs/FORMAT.md) holding its
//! kind (`shared` or `exclusive`), the operation, host, pid and the time it was last refreshed. It is
//! created with a create-only put and never overwritten: a refresh writes a new object and deletes the
//! previous one.
//!
//! Taking a lock (restic's protocol): write our lock object, then list `locks/`. A shared lock
//! conflicts with any live exclusive lock; an exclusive lock conflicts with any live lock. On a
//! conflict we delete our object and retry until `[lock] wait_secs` has passed, then give up
//! ([`Error::Locked`], exit 11). Because each side writes before it lists, of two runs that overlap at
//! least one sees the other: two runs can never both hold conflicting locks. This needs only
//! read-after-write consistent listings (every object_store backend has them); the conditional put is
//! a second line of defence, not the mechanism.
//!
//! A lock is *stale*, and is removed by the next run that meets it, when it has not been refreshed
//! for `[lock] stale_secs`, or when it names this host and a process that no longer exists. Holders
//! refresh every `stale_secs / 6`. A holder treats its lock as *lost*, and stops what it is doing,
//! when its lock object was removed (stale, or `unlock`) or it could not refresh it for
//! `stale_secs / 2`; a backup also confirms its lock right before it writes the manifest, so a
//! backup that was suspended while a prune ran never commits a snapshot referencing pruned content.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::LockConfig;
use crate::error::{Error, Result};
use crate::host::{hostname, pid_alive};
use crate::repo::Repository;
use crate::store::Store;

pub use crate::format::LOCKS_DIR;

/// Shared (backup) or exclusive (forget, prune).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LockKind {
    Shared,
    Exclusive,
}

/// The contents of a lock object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockInfo {
    pub kind: LockKind,
    /// `backup`, `forget`, `prune`.
    pub operation: String,
    pub host: String,
    pub pid: u32,
    /// When the holder first took the lock.
    pub created: DateTime<Utc>,
    /// When this object was written (the last refresh).
    pub time: DateTime<Utc>,
    pub tool: String,
}

impl LockInfo {
    fn describe(&self) -> String {
        let now = Utc::now();
        format!(
            "{} lock of `{}` by pid {} on {}{}, taken {} ago, refreshed {} ago",
            match self.kind {
                LockKind::Shared => "shared",
                LockKind::Exclusive => "exclusive",
            },
            self.operation,
            self.pid,
            self.host,
            if self.host == hostname() {
                " (this machine)"
            } else {
                ""
            },
            ago(now, self.created),
            ago(now, self.time),
        )
    }
}

/// How long ago `then` was, roughly: `42s`, `5 min`, `3 h`, `2 days`.
pub fn ago(now: DateTime<Utc>, then: DateTime<Utc>) -> String {
    let secs = now.signed_duration_since(then).num_seconds().max(0);
    match secs {
        0..=119 => format!("{secs}s"),
        120..=7199 => format!("{} min", secs / 60),
        7200..=172_799 => format!("{} h", secs / 3600),
        _ => format!("{} days", secs / 86_400),
    }
}

/// A lock object found in the store.
#[derive(Debug, Clone, Serialize)]
pub struct FoundLock {
    pub key: String,
    /// `None` when the object cannot be parsed.
    pub info: Option<LockInfo>,
    /// Why it is stale, when it is.
    pub stale: Option<String>,
}

impl FoundLock {
    pub fn describe(&self) -> String {
        match &self.info {
            Some(i) => format!("{} ({})", i.describe(), self.key),
            None => format!(
                "unreadable lock object {} (remove it with `immich-backup unlock --remove-all` if no other run is active)",
                self.key
            ),
        }
    }
}

/// Lock objects held by this process (a lock naming our own pid but not listed here is a leftover
/// of an earlier process that had the same pid, e.g. PID 1 of a restarted container).
static HELD: Mutex<Option<HashSet<String>>> = Mutex::new(None);
/// Releases started by `Drop`, awaited by [`settle`].
static PENDING: Mutex<Vec<JoinHandle<()>>> = Mutex::new(Vec::new());

fn held_insert(key: &str) {
    HELD.lock()
        .expect("not poisoned")
        .get_or_insert_with(HashSet::new)
        .insert(key.to_string());
}

fn held_remove(key: &str) {
    if let Some(set) = HELD.lock().expect("not poisoned").as_mut() {
        set.remove(key);
    }
}

fn held_contains(key: &str) -> bool {
    HELD.lock()
        .expect("not poisoned")
        .as_ref()
        .is_some_and(|s| s.contains(key))
}

/// Why `info` (stored as `key`) is stale at `now`, or `None` when it is live.
fn staleness(key: &str, info: &LockInfo, now: DateTime<Utc>, stale: Duration) -> Option<String> {
    let age = now.signed_duration_since(info.time);
    if age.num_milliseconds() > stale.as_millis() as i64 {
        return Some(format!(
            "not refreshed for {}s (stale after {}s)",
            age.num_seconds(),
            stale.as_secs()
        ));
    }
    if info.host == hostname() {
        if info.pid == std::process::id() {
            if !held_contains(key) {
                return Some("left by an earlier process with this pid".into());
            }
        } else if !pid_alive(info.pid) {
            return Some(format!("process {} no longer exists", info.pid));
        }
    }
    None
}

/// Every lock object in the store, with whether it is stale.
pub async fn list(repo: &Repository, stale: Duration) -> Result<Vec<FoundLock>> {
    list_in(repo.store(), stale).await
}

async fn list_in(store: &Store, stale: Duration) -> Result<Vec<FoundLock>> {
    let now = Utc::now();
    let mut out = Vec::new();
    for (key, _) in store.list_keys(LOCKS_DIR).await? {
        let info = match store.get_bytes(&key).await {
            Ok(b) => serde_json::from_slice::<LockInfo>(&b).ok(),
            Err(Error::Missing { .. }) => continue, // released meanwhile
            Err(e) => return Err(e),
        };
        let stale = info.as_ref().and_then(|i| staleness(&key, i, now, stale));
        out.push(FoundLock { key, info, stale });
    }
    Ok(out)
}

fn new_key(now: DateTime<Utc>) -> String {
    format!(
        "{LOCKS_DIR}/{}-{}.json",
        now.format("%Y%m%dT%H%M%SZ"),
        hex::encode(rand::random::<[u8; 8]>())
    )
}

/// Write a new lock object for `info`; returns its key.
async fn write(store: &Store, info: &LockInfo) -> Result<String> {
    let body = Bytes::from(serde_json::to_vec_pretty(info).expect("lock serialises"));
    loop {
        let key = new_key(info.time);
        if store.put_new(&key, body.clone()).await? {
            held_insert(&key);
            return Ok(key);
        }
    }
}

/// The live locks other than `own` that conflict with a lock of `kind`; stale ones are removed.
async fn conflicts(
    store: &Store,
    own: &str,
    kind: LockKind,
    stale: Duration,
) -> Result<Vec<FoundLock>> {
    let mut out = Vec::new();
    for l in list_in(store, stale).await? {
        if l.key == own {
            continue;
        }
        if let Some(reason) = &l.stale {
            tracing::warn!(lock = %l.describe(), reason = %reason, "removing a stale lock");
            store.delete(&l.key).await?;
            continue;
        }
        let conflicting = match &l.info {
            None => true,
            Some(i) => kind == LockKind::Exclusive || i.kind == LockKind::Exclusive,
        };
        if conflicting {
            out.push(l);
        }
    }
    Ok(out)
}

/// What the holder's refresher and the operation share.
struct Inner {
    store: Store,
    cfg: LockConfig,
    info: Mutex<LockInfo>,
    /// The current lock object and when (wall clock) it was written.
    current: tokio::sync::Mutex<(String, DateTime<Utc>)>,
    lost: CancellationToken,
    lost_reason: Mutex<Option<String>>,
}

impl Inner {
    fn mark_lost(&self, reason: String) {
        tracing::error!(reason = %reason, "lost the store lock; stopping");
        *self.lost_reason.lock().expect("not poisoned") = Some(reason);
        self.lost.cancel();
    }

    fn lost_error(&self) -> Error {
        let reason = self
            .lost_reason
            .lock()
            .expect("not poisoned")
            .clone()
            .unwrap_or_else(|| "lock lost".into());
        Error::Locked(format!(
            "this run lost its lock ({reason}); another run may have changed the store, so nothing was committed; run it again"
        ))
    }

    /// Write a fresh lock object, check the previous one is still ours, delete it.
    async fn refresh(&self) -> Result<()> {
        if self.lost.is_cancelled() {
            return Err(self.lost_error());
        }
        let mut current = self.current.lock().await;
        let now = Utc::now();
        let age = now.signed_duration_since(current.1);
        if age.num_milliseconds() > (self.cfg.stale() / 2).as_millis() as i64 {
            self.mark_lost(format!(
                "it was not refreshed for {}s, others may have judged it stale",
                age.num_seconds()
            ));
            return Err(self.lost_error());
        }
        let info = {
            let mut i = self.info.lock().expect("not poisoned");
            i.time = now;
            i.clone()
        };
        let key = write(&self.store, &info).await?;
        match self.store.size(&current.0).await {
            Ok(Some(_)) => {}
            Ok(None) => {
                let _ = self.store.delete(&key).await;
                held_remove(&key);
                self.mark_lost(format!(
                    "{} was removed by another run or by `unlock`",
                    current.0
                ));
                return Err(self.lost_error());
            }
            Err(e) => {
                let _ = self.store.delete(&key).await;
                held_remove(&key);
                return Err(e);
            }
        }
        let old = std::mem::replace(&mut *current, (key, now));
        self.store.delete(&old.0).await?;
        held_remove(&old.0);
        Ok(())
    }
}

/// A lock held on the store. Call [`Lock::release`]; dropping it releases in the background.
pub struct Lock {
    inner: Arc<Inner>,
    stop: CancellationToken,
    refresher: Option<JoinHandle<()>>,
    released: bool,
}

impl Lock {
    /// Take a lock of `kind` for `operation`, waiting up to `[lock] wait_secs` for conflicting ones.
    pub async fn acquire(
        repo: &Repository,
        kind: LockKind,
        operation: &str,
        cfg: &LockConfig,
    ) -> Result<Lock> {
        let store = repo.store();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(cfg.wait_secs);
        let created = Utc::now();
        let mut said_waiting = false;
        loop {
            let now = Utc::now();
            let info = LockInfo {
                kind,
                operation: operation.to_string(),
                host: hostname(),
                pid: std::process::id(),
                created,
                time: now,
                tool: format!("immich-backup {}", env!("CARGO_PKG_VERSION")),
            };
            let key = write(store, &info).await?;
            let found = conflicts(store, &key, kind, cfg.stale()).await;
            match found {
                Ok(c) if c.is_empty() => {
                    tracing::debug!(lock = %key, ?kind, operation, "lock taken");
                    return Ok(Lock::start(store, cfg, info, key, now));
                }
                Ok(c) => {
                    store.delete(&key).await?;
                    held_remove(&key);
                    let held_by = c
                        .iter()
                        .map(FoundLock::describe)
                        .collect::<Vec<_>>()
                        .join("; ");
                    let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                    if left.is_zero() {
                        return Err(Error::Locked(format!(
                            "{held_by}. That run is alive (it refreshes its lock): wait for it to finish, or stop it. A lock not refreshed for {}s ([lock] stale_secs), or whose process is gone on this machine, is stale: runs ignore it and `immich-backup unlock` removes it. Use `immich-backup unlock --remove-all` only if you are sure the holder is gone (e.g. another machine that died) and cannot wait",
                            cfg.stale_secs
                        )));
                    }
                    if !said_waiting {
                        tracing::info!(held_by = %held_by, wait_secs = cfg.wait_secs, "the store is locked; waiting");
                        said_waiting = true;
                    }
                    let jitter = Duration::from_millis(rand::random::<u64>() % 500);
                    tokio::time::sleep(left.min(Duration::from_millis(700) + jitter)).await;
                }
                Err(e) => {
                    let _ = store.delete(&key).await;
                    held_remove(&key);
                    return Err(e);
                }
            }
        }
    }

    fn start(
        store: &Store,
        cfg: &LockConfig,
        info: LockInfo,
        key: String,
        now: DateTime<Utc>,
    ) -> Lock {
        let inner = Arc::new(Inner {
            store: store.clone(),
            cfg: cfg.clone(),
            info: Mutex::new(info),
            current: tokio::sync::Mutex::new((key, now)),
            lost: CancellationToken::new(),
            lost_reason: Mutex::new(None),
        });
        let stop = CancellationToken::new();
        let refresher = tokio::spawn(refresher(inner.clone(), stop.clone()));
        Lock {
            inner,
            stop,
            refresher: Some(refresher),
            released: false,
        }
    }

    /// Run `work` under a lock of `kind` for `operation`: it is stopped (dropped) with the lock's
    /// error when the lock is lost, and the lock is released when it ends.
    pub async fn hold<T>(
        repo: &Repository,
        kind: LockKind,
        operation: &str,
        cfg: &LockConfig,
        work: impl std::future::Future<Output = Result<T>>,
    ) -> Result<T> {
        let lock = Lock::acquire(repo, kind, operation, cfg).await?;
        let result = tokio::select! {
            r = work => r,
            e = lock.lost() => Err(e),
        };
        lock.release().await;
        result
    }

    /// Resolves (with the error to return) when the lock is lost; never otherwise.
    pub async fn lost(&self) -> Error {
        self.inner.lost.cancelled().await;
        self.inner.lost_error()
    }

    /// Refresh now and confirm the lock is still ours (call right before committing).
    pub(crate) async fn confirm(&self) -> Result<()> {
        self.inner.refresh().await
    }

    /// The key of the current lock object.
    pub async fn key(&self) -> String {
        self.inner.current.lock().await.0.clone()
    }

    /// Stop refreshing and delete the lock object.
    pub async fn release(mut self) {
        self.released = true;
        self.stop.cancel();
        if let Some(r) = self.refresher.take() {
            let _ = r.await;
        }
        let key = self.inner.current.lock().await.0.clone();
        if let Err(e) = self.inner.store.delete(&key).await {
            tracing::warn!(lock = %key, error = %e, "could not remove the lock; it goes stale by itself");
        }
        held_remove(&key);
    }
}

impl Drop for Lock {
    fn drop(&mut self) {
        if self.released {
            return;
        }
        self.stop.cancel();
        let inner = self.inner.clone();
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            let task = handle.spawn(async move {
                let key = inner.current.lock().await.0.clone();
                let _ = inner.store.delete(&key).await;
                held_remove(&key);
            });
            PENDING.lock().expect("not poisoned").push(task);
        }
    }
}

/// Wait (up to `timeout`) for locks dropped without [`Lock::release`] to be removed.
pub async fn settle(timeout: Duration) {
    let tasks: Vec<JoinHandle<()>> = std::mem::take(&mut *PENDING.lock().expect("not poisoned"));
    let _ = tokio::time::timeout(timeout, futures::future::join_all(tasks)).await;
}

async fn refresher(inner: Arc<Inner>, stop: CancellationToken) {
    let every = inner.cfg.refresh_interval();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        match inner.refresh().await {
            Ok(()) => {}
            Err(_) if inner.lost.is_cancelled() => return,
            Err(e) => tracing::warn!(error = %e, "could not refresh the store lock; retrying"),
        }
    }
}

/// `unlock`: remove stale locks, or all of them. Returns what was removed and what remains.
pub async fn unlock(
    repo: &Repository,
    cfg: &LockConfig,
    remove_all: bool,
) -> Result<(Vec<FoundLock>, Vec<FoundLock>)> {
    let store = repo.store();
    let mut removed = Vec::new();
    let mut kept = Vec::new();
    for l in list_in(store, cfg.stale()).await? {
        if remove_all || l.stale.is_some() || l.info.is_none() {
            store.delete(&l.key).await?;
            removed.push(l);
        } else {
            kept.push(l);
        }
    }
    Ok((removed, kept))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, Repository) {
        let dir = tempfile::tempdir().unwrap();
        let fs = object_store::local::LocalFileSystem::new_with_prefix(dir.path()).unwrap();
        let store = Store::from_object_store(Arc::new(fs), "", "file:///test");
        (dir, Repository::new(store))
    }

    fn cfg(wait: u64) -> LockConfig {
        LockConfig {
            stale_secs: 60,
            wait_secs: wait,
        }
    }

    async fn count(repo: &Repository) -> usize {
        repo.store().list_keys(LOCKS_DIR).await.unwrap().len()
    }

    #[tokio::test]
    async fn shared_locks_coexist_exclusive_excludes() {
        let (_d, store) = store();
        let a = Lock::acquire(&store, LockKind::Shared, "backup", &cfg(0))
            .await
            .unwrap();
        let b = Lock::acquire(&store, LockKind::Shared, "backup", &cfg(0))
            .await
            .unwrap();
        assert_eq!(count(&store).await, 2);
        let err = Lock::acquire(&store, LockKind::Exclusive, "prune", &cfg(0))
            .await
            .err()
            .expect("exclusive must not be granted while backups run");
        assert!(matches!(err, Error::Locked(_)), "{err}");
        assert_eq!(err.exit_code(), crate::error::exit::LOCKED);
        assert!(err.to_string().contains("shared lock of `backup`"), "{err}");
        assert_eq!(
            count(&store).await,
            2,
            "the refused lock object was removed"
        );
        a.release().await;
        b.release().await;
        assert_eq!(count(&store).await, 0);

        let x = Lock::acquire(&store, LockKind::Exclusive, "prune", &cfg(0))
            .await
            .unwrap();
        assert!(Lock::acquire(&store, LockKind::Shared, "backup", &cfg(0))
            .await
            .is_err());
        assert!(
            Lock::acquire(&store, LockKind::Exclusive, "forget", &cfg(0))
                .await
                .is_err()
        );
        x.release().await;
        assert_eq!(count(&store).await, 0);
    }

    #[tokio::test]
    async fn waiting_gets_the_lock_when_it_is_released() {
        let (_d, store) = store();
        let x = Lock::acquire(&store, LockKind::Exclusive, "prune", &cfg(0))
            .await
            .unwrap();
        let s2 = store.clone();
        let waiter =
            tokio::spawn(
                async move { Lock::acquire(&s2, LockKind::Shared, "backup", &cfg(30)).await },
            );
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert!(!waiter.is_finished());
        x.release().await;
        let got = tokio::time::timeout(Duration::from_secs(10), waiter)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        got.release().await;
    }

    #[tokio::test]
    async fn stale_locks_are_removed_and_their_holder_notices() {
        let (_d, store) = store();
        // A lock by a process of this host that no longer exists.
        let dead = LockInfo {
            kind: LockKind::Exclusive,
            operation: "prune".into(),
            host: hostname(),
            pid: 0x7fff_fff0,
            created: Utc::now(),
            time: Utc::now(),
            tool: "test".into(),
        };
        write(store.store(), &dead).await.unwrap();
        // One from another host that was not refreshed for an hour.
        let old = LockInfo {
            host: "elsewhere".into(),
            pid: 1,
            time: Utc::now() - chrono::Duration::hours(1),
            ..dead.clone()
        };
        write(store.store(), &old).await.unwrap();
        // A live one on another host blocks an exclusive lock but not a shared one.
        let live = LockInfo {
            kind: LockKind::Shared,
            host: "elsewhere".into(),
            pid: 1,
            ..dead.clone()
        };
        let live_key = write(store.store(), &live).await.unwrap();
        held_remove(&live_key);
        let found = list(&store, cfg(0).stale()).await.unwrap();
        assert_eq!(found.iter().filter(|l| l.stale.is_some()).count(), 2);

        let s = Lock::acquire(&store, LockKind::Shared, "backup", &cfg(0))
            .await
            .unwrap();
        assert_eq!(
            count(&store).await,
            2,
            "stale locks removed: ours and the live one remain"
        );
        s.release().await;

        // The holder whose lock was removed (as stale, or by unlock) learns it on its next refresh.
        let held = Lock::acquire(&store, LockKind::Shared, "backup", &cfg(0))
            .await
            .unwrap();
        let (removed, kept) = unlock(&store, &cfg(0), true).await.unwrap();
        assert_eq!(removed.len(), 2);
        assert!(kept.is_empty());
        let err = held.confirm().await.unwrap_err();
        assert!(matches!(err, Error::Locked(_)), "{err}");
        let lost = tokio::time::timeout(Duration::from_secs(1), held.lost())
            .await
            .expect("lost() resolves once the lock is lost");
        assert!(lost.to_string().contains("lost its lock"), "{lost}");
        held.release().await;
        assert_eq!(count(&store).await, 0);
    }

    #[tokio::test]
    async fn a_leftover_of_an_earlier_process_with_our_pid_is_stale() {
        let (_d, store) = store();
        let mine = LockInfo {
            kind: LockKind::Exclusive,
            operation: "prune".into(),
            host: hostname(),
            pid: std::process::id(),
            created: Utc::now(),
            time: Utc::now(),
            tool: "test".into(),
        };
        let key = write(store.store(), &mine).await.unwrap();
        held_remove(&key); // as if written by an earlier process
        let l = Lock::acquire(&store, LockKind::Exclusive, "prune", &cfg(0))
            .await
            .unwrap();
        assert_eq!(store.store().size(&key).await.unwrap(), None);
        l.release().await;
    }

    #[tokio::test]
    async fn refresh_replaces_the_object_and_unlock_keeps_live_locks() {
        let (_d, store) = store();
        let l = Lock::acquire(&store, LockKind::Shared, "backup", &cfg(0))
            .await
            .unwrap();
        let k1 = l.key().await;
        l.confirm().await.unwrap();
        let k2 = l.key().await;
        assert_ne!(k1, k2);
        assert_eq!(store.store().size(&k1).await.unwrap(), None);
        assert!(store.store().size(&k2).await.unwrap().is_some());
        let body: LockInfo =
            serde_json::from_slice(&store.store().get_bytes(&k2).await.unwrap()).unwrap();
        assert_eq!(body.kind, LockKind::Shared);
        assert_eq!(body.operation, "backup");
        assert_eq!(body.pid, std::process::id());
        let (removed, kept) = unlock(&store, &cfg(0), false).await.unwrap();
        assert!(removed.is_empty());
        assert_eq!(kept.len(), 1);
        drop(l);
        settle(Duration::from_secs(5)).await;
        assert_eq!(count(&store).await, 0, "a dropped lock is removed");
    }
}
