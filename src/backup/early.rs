//! Reading ahead while the dump starts: files are stored before the dump holds its snapshot, and
//! the snapshot takes each one only if it provably did not change since.
//!
//! Immich's order is database first, then files: every asset the dump knows must have its file in
//! the snapshot, so the walk that decides the snapshot's file list starts only once `pg_dump` holds
//! its snapshot of the Immich database (backup.rs). Until then (a tenth of a second while
//! `pg_dumpall` starts, longer when other databases are dumped first) the cores would idle. Here
//! the same walk runs ahead and stores what it finds, keeping each file's result with the metadata
//! it had. The real walk takes a result only for a file whose size, mtime, ctime and inode are
//! still the same and whose last change was settled when it was walked early
//! ([`Found::settled`]): the rule by which the metadata cache lets a file go unread. Every other
//! file is read again. Content stored early that the snapshot does not name is unreferenced, and
//! `prune` removes it, as it does a killed run's.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tokio_util::task::AbortOnDropHandle;

use crate::backup::cache::CacheReader;
use crate::backup::upload::{FileStorer, Stored, Workers};
use crate::backup::walk::{self, Found, Top, Walked};
use crate::format::{ContentId, EntryKind};

/// At most this many files are read ahead (their results wait in memory for the real walk).
pub(crate) const MAX_FILES: usize = 20_000;

/// A file being stored ahead: its content address, or `None` if that failed (it is read again).
pub(crate) type Pending = AbortOnDropHandle<Option<(ContentId, Stored)>>;

/// The read-ahead running in the background; [`Ahead::stop`] it when the dump holds its snapshot.
/// Dropped, it stops and abandons what it started.
pub struct Ahead {
    stop: oneshot::Sender<()>,
    task: AbortOnDropHandle<Early>,
}

/// What was read ahead, by path.
pub struct Early {
    files: HashMap<String, (Found, Pending)>,
    /// One permit per file in flight, held until its worker is done with it.
    slots: Arc<Semaphore>,
    window: u32,
}

/// Start reading ahead: walk `tops` and store what needs storing, with at most `window` files in
/// flight on `workers`.
pub fn start(
    (tops, excludes): (Vec<Top>, crate::immich::exclude::Excludes),
    cache_path: PathBuf,
    storer: Arc<FileStorer>,
    workers: Arc<Workers>,
    window: usize,
) -> Ahead {
    let (stop, stopped) = oneshot::channel();
    let early = Early::new(window);
    let walk = Walk {
        tops,
        excludes,
        cache_path,
        storer,
        workers,
    };
    let task = tokio::spawn(read_ahead(walk, early, stopped));
    Ahead {
        stop,
        task: AbortOnDropHandle::new(task),
    }
}

impl Ahead {
    /// Stop walking; files already started go on. Returns what was read ahead.
    pub async fn stop(self) -> Early {
        let _ = self.stop.send(());
        match self.task.await {
            Ok(early) => early,
            // Only a panic ends it otherwise: nothing read ahead, everything is read again.
            Err(_) => Early::new(1),
        }
    }
}

impl Early {
    /// Nothing read ahead yet; at most `window` files in flight.
    fn new(window: usize) -> Early {
        let window = u32::try_from(window.clamp(1, 1 << 16)).expect("clamped");
        Early {
            files: HashMap::new(),
            slots: Arc::new(Semaphore::new(window as usize)),
            window,
        }
    }

    /// The early result for `found`, if the file is unchanged since it was read ahead.
    pub fn take(&mut self, found: &Found) -> Option<Pending> {
        let (then, pending) = self.files.remove(&found.entry.path)?;
        // `then` was settled when it was walked (only settled files are read ahead).
        (found.metadata() == then.metadata()).then_some(pending)
    }

    /// Abandon what was not taken and wait until no worker writes for the read-ahead any more
    /// (before the content is published).
    pub async fn finish(self) {
        drop(self.files);
        let _ = self.slots.acquire_many(self.window).await;
    }
}

/// What the read-ahead walks and stores with.
struct Walk {
    tops: Vec<Top>,
    excludes: crate::immich::exclude::Excludes,
    cache_path: PathBuf,
    storer: Arc<FileStorer>,
    workers: Arc<Workers>,
}

async fn read_ahead(walk: Walk, mut early: Early, mut stopped: oneshot::Receiver<()>) -> Early {
    let (tx, mut rx) = mpsc::channel::<Vec<Walked>>(8);
    let tops = walk.tops.clone();
    let excludes = walk.excludes.clone();
    tokio::task::spawn_blocking(move || walk::walk(&tops, &excludes, tx));
    let mut cache = CacheReader::open(&walk.cache_path);
    'walk: loop {
        let batch = tokio::select! {
            biased;
            _ = &mut stopped => break,
            batch = rx.recv() => match batch {
                Some(batch) => batch,
                None => break,
            },
        };
        for item in batch {
            let Walked::Found(found) = item else { continue };
            if found.entry.kind != EntryKind::File {
                continue;
            }
            // Unsettled files would be read again anyway; cached ones are not read at all.
            if cache.lookup(&found).is_some() || !found.settled() {
                continue;
            }
            if early.files.len() >= MAX_FILES {
                break 'walk;
            }
            let slot = tokio::select! {
                biased;
                _ = &mut stopped => break 'walk,
                slot = early.slots.clone().acquire_owned() => slot.expect("never closed"),
            };
            let job = read_one(
                found.clone(),
                walk.storer.clone(),
                walk.workers.clone(),
                slot,
            );
            let pending = AbortOnDropHandle::new(tokio::spawn(job));
            early
                .files
                .insert(found.entry.path.clone(), (found, pending));
        }
    }
    tracing::debug!(
        files = early.files.len(),
        "read ahead of the dump's snapshot"
    );
    early
}

async fn read_one(
    found: Found,
    storer: Arc<FileStorer>,
    workers: Arc<Workers>,
    slot: OwnedSemaphorePermit,
) -> Option<(ContentId, Stored)> {
    let (_, res) = storer.store_on_worker(found, &workers, slot).await.ok()?;
    res.ok()
}
