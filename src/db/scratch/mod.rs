//! Throwaway PostgreSQL servers, for the restore drill: a dump is replayed into one of these, never
//! into the running Immich database.
//!
//! [`start`] makes one the way the config's mode runs Postgres: in Docker mode a container from
//! the snapshot's Postgres image (else the image of `[database] container`), without network,
//! with its data in an anonymous volume ([`docker`]); in local mode a cluster made with `initdb`
//! in a temp folder, listening only on a Unix socket in that folder ([`local`]). It returns a
//! [`Scratch`]: a [`Database`] pointing at the server, and its removal.
//!
//! Removal is [`Scratch::remove`]; when a drill is dropped half-way instead (an error unwinding,
//! Ctrl-C), `Drop` starts it in the background and [`settle`] waits for it. A drill that is killed
//! outright cannot remove anything, so every server records who made it ([`Owner`]: run id, host,
//! pid; as container labels, or in a marker file in the cluster's folder), and
//! [`remove_leftovers`], at the next drill's start, removes those whose drill is gone.

pub mod docker;
pub mod local;

use std::sync::Mutex;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;

use super::Database;
use crate::config::{DatabaseConfig, DatabaseMode};
use crate::error::Result;
use crate::host;

/// The name of every drill container and cluster folder starts with this.
pub const NAME_PREFIX: &str = "immich-backup-drill-";

/// What the throwaway server is for: the snapshot's image and the role the dump is replayed as.
#[derive(Debug, Clone)]
pub struct Wanted {
    /// The Postgres image the snapshot recorded (`name (id)`), Docker mode.
    pub image: Option<String>,
    /// The role psql connects as (the snapshot's `DB_USERNAME`): the server's superuser.
    pub username: String,
    /// The Immich database's name.
    pub database: String,
    /// The extensions of the snapshot's database (some must be preloaded).
    pub extensions: Vec<String>,
}

/// Extensions whose library must be loaded at server start (`shared_preload_libraries`), or
/// `CREATE EXTENSION` fails: VectorChord and pgvecto.rs (pgvector needs nothing).
const PRELOADED: [(&str, &str); 2] = [("vchord", "vchord.so"), ("vectors", "vectors.so")];

/// `shared_preload_libraries` for a throwaway server: the `configured` ones plus those the
/// snapshot's `extensions` need; `None` when there are none.
fn preload(extensions: &[String], configured: Option<&str>) -> Option<String> {
    let mut libs: Vec<String> = configured
        .unwrap_or_default()
        .split(',')
        .map(|l| l.trim().trim_matches(|c| c == '\'' || c == '"').to_string())
        .filter(|l| !l.is_empty())
        .collect();
    for (extension, lib) in PRELOADED {
        let loaded = libs
            .iter()
            .any(|l| l == lib || Some(l.as_str()) == lib.strip_suffix(".so"));
        if extensions.iter().any(|e| e == extension) && !loaded {
            libs.push(lib.to_string());
        }
    }
    (!libs.is_empty()).then(|| libs.join(","))
}

/// `s` single-quoted for a POSIX shell (pg_ctl runs the server through one).
fn shell_word(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// A running throwaway server: the transport to it, and what removes it.
pub struct Scratch {
    db: Box<dyn Database>,
    what: String,
    guard: Guard,
}

impl Scratch {
    /// The transport to the throwaway server.
    pub fn db(&self) -> &dyn Database {
        self.db.as_ref()
    }

    /// What runs it, for the report ("container … from image …", "cluster in …").
    pub fn describe(&self) -> &str {
        &self.what
    }

    /// Stop the server and remove it with its data.
    pub async fn remove(self) -> Result<()> {
        self.guard.remove().await
    }
}

/// How a throwaway server is removed.
enum Removal {
    Docker(docker::Removal),
    Local(local::Removal),
}

/// Removes a throwaway server from the moment it exists: when told ([`Guard::remove`]), or when
/// dropped (in the background; [`settle`] waits for it).
struct Guard {
    removal: Option<Removal>,
    owner: Owner,
}

impl Guard {
    fn new(removal: Removal, owner: &Owner) -> Guard {
        Guard {
            removal: Some(removal),
            owner: owner.clone(),
        }
    }

    async fn remove(mut self) -> Result<()> {
        let removal = self.removal.take();
        run(removal, &self.owner).await
    }
}

/// Remove the server; its drill is no longer live in this process, whatever happened.
async fn run(removal: Option<Removal>, owner: &Owner) -> Result<()> {
    let removed = match removal {
        Some(Removal::Docker(r)) => r.run().await,
        Some(Removal::Local(r)) => r.run().await,
        None => Ok(()),
    };
    owner.forget();
    removed
}

impl Drop for Guard {
    fn drop(&mut self) {
        let Some(removal) = self.removal.take() else {
            return;
        };
        tracing::info!("removing the throwaway server of a drill stopped half-way");
        let owner = self.owner.clone();
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            let task = handle.spawn(async move {
                if let Err(e) = run(Some(removal), &owner).await {
                    tracing::warn!("could not remove the drill's throwaway server: {e}");
                }
            });
            PENDING.lock().expect("not poisoned").push(task);
        }
    }
}

/// Removals started by `Drop`, awaited by [`settle`].
static PENDING: Mutex<Vec<JoinHandle<()>>> = Mutex::new(Vec::new());
/// Run ids of the servers this process runs now (a leftover of an earlier process that had the
/// same pid is not one of them).
static LIVE: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// Wait (up to `timeout`) for the servers of drills dropped half-way to be removed.
pub async fn settle(timeout: Duration) {
    let tasks: Vec<JoinHandle<()>> = std::mem::take(&mut *PENDING.lock().expect("not poisoned"));
    let _ = tokio::time::timeout(timeout, futures::future::join_all(tasks)).await;
}

/// Start a throwaway server as the config's mode runs Postgres.
pub async fn start(cfg: &DatabaseConfig, wanted: &Wanted) -> Result<Scratch> {
    let owner = Owner::new();
    let started = match cfg.mode {
        DatabaseMode::Docker => docker::start(cfg, wanted, &owner).await,
        DatabaseMode::Local => local::start(cfg, wanted, &owner).await,
    };
    started.inspect_err(|_| owner.forget())
}

/// Remove the throwaway servers of drills that are gone (killed); returns what was removed.
pub async fn remove_leftovers(cfg: &DatabaseConfig) -> Result<Vec<String>> {
    let removed = match cfg.mode {
        DatabaseMode::Docker => docker::remove_leftovers(cfg).await?,
        DatabaseMode::Local => local::remove_leftovers().await?,
    };
    for what in &removed {
        tracing::warn!("removed the throwaway server of an interrupted drill: {what}");
    }
    Ok(removed)
}

/// Who made a throwaway server: the drill's run id, host and pid, and when.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Owner {
    pub run: String,
    pub host: String,
    pub pid: u32,
    pub started: DateTime<Utc>,
}

/// Whether a server's drill still runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    /// Its drill runs (on this host).
    Live,
    /// Its drill is gone: the server is a leftover.
    Gone,
    /// Made on another host: this one cannot tell.
    Elsewhere,
}

impl Owner {
    /// A new run of this process, registered as live until [`Owner::forget`].
    fn new() -> Owner {
        let owner = Owner {
            run: format!("{:08x}", rand::random::<u32>()),
            host: host::hostname(),
            pid: std::process::id(),
            started: Utc::now(),
        };
        LIVE.lock().expect("not poisoned").push(owner.run.clone());
        owner
    }

    /// The name of its container or folder.
    fn name(&self) -> String {
        format!("{NAME_PREFIX}{}", self.run)
    }

    /// Its server is removed (or was never made).
    fn forget(&self) {
        LIVE.lock()
            .expect("not poisoned")
            .retain(|r| *r != self.run);
    }

    fn fate(&self) -> Fate {
        if self.host != host::hostname() {
            return Fate::Elsewhere;
        }
        let live = if self.pid == std::process::id() {
            LIVE.lock().expect("not poisoned").contains(&self.run)
        } else {
            host::pid_alive(self.pid)
        };
        if live {
            Fate::Live
        } else {
            Fate::Gone
        }
    }

    fn describe(&self) -> String {
        format!(
            "drill pid {} on {}, started {}",
            self.pid,
            self.host,
            self.started.format("%Y-%m-%d %H:%M:%S UTC")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_server_is_a_leftover_once_its_drill_is_gone() {
        let mine = Owner::new();
        assert_eq!(mine.fate(), Fate::Live);
        mine.forget();
        assert_eq!(mine.fate(), Fate::Gone, "an earlier process with this pid");
        let mut other = mine.clone();
        other.pid = u32::MAX - 1;
        assert_eq!(other.fate(), Fate::Gone, "no such process");
        other.pid = 1;
        assert_eq!(other.fate(), Fate::Live, "pid 1 runs");
        other.host = format!("{}-elsewhere", host::hostname());
        assert_eq!(other.fate(), Fate::Elsewhere);
        assert!(mine.name().starts_with(NAME_PREFIX));
    }

    #[test]
    fn vector_extensions_get_their_library_preloaded() {
        let ext = |names: &[&str]| names.iter().map(|n| n.to_string()).collect::<Vec<_>>();
        assert_eq!(preload(&ext(&["cube", "vector"]), None), None);
        assert_eq!(
            preload(&ext(&["vchord", "vector"]), None).as_deref(),
            Some("vchord.so")
        );
        assert_eq!(
            preload(&ext(&["vectors"]), Some("'vectors'")).as_deref(),
            Some("vectors")
        );
        assert_eq!(
            preload(&ext(&["vchord"]), Some("pg_stat_statements")).as_deref(),
            Some("pg_stat_statements,vchord.so")
        );
        assert_eq!(shell_word("it's"), "'it'\\''s'");
    }
}
