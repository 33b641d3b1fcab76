//! What the store holds already, so a photo stored once is never uploaded again: the listed content
//! addresses, what this run added (or stages), claims on content another worker is storing, and a
//! repair's damaged objects.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Condvar, Mutex};

use crate::format::ContentId;
use crate::repo::Repository;

/// What `backup --repair` replaces: stored content objects known to be damaged (named by a restore
/// or a check), and those whose stored size no age file of the file's size can have. A file whose
/// content is one of them is read again and, if it still hashes to that address, its object is
/// written again and replaces the damaged one in one step (a new object under a temporary name,
/// renamed over the old; on cloud stores an overwriting put, which is atomic), so no reader ever sees
/// half an object.
#[derive(Debug, Default)]
pub(crate) struct Repair {
    damaged: Mutex<HashSet<ContentId>>,
    /// Stored objects and their sizes (sorted), and the age header length of this store's objects.
    sizes: Vec<(ContentId, u64)>,
    header: u64,
    repaired: Mutex<Vec<ContentId>>,
    named: HashSet<ContentId>,
}

impl Repair {
    /// Repair `named` objects and any whose size in `sizes` cannot be right; `header` is the age
    /// header length of an object written to the configured recipients.
    pub fn new(named: HashSet<ContentId>, mut sizes: Vec<(ContentId, u64)>, header: u64) -> Repair {
        sizes.sort_unstable();
        Repair {
            damaged: Mutex::new(named.clone()),
            sizes,
            header,
            repaired: Mutex::default(),
            named,
        }
    }

    /// Whether `id` is to be replaced.
    pub(crate) fn is_damaged(&self, id: &ContentId) -> bool {
        self.damaged.lock().expect("not poisoned").contains(id)
    }

    /// Mark `id` damaged if it is stored with a size no age file of `len` bytes has.
    fn check_size(&self, id: &ContentId, len: u64) {
        if let Ok(i) = self.sizes.binary_search_by(|(c, _)| c.cmp(id)) {
            let expected = self.header + crate::repo::sealed_payload_len(len);
            if self.sizes[i].1 != expected {
                tracing::warn!(object = %id.key(), stored = self.sizes[i].1, expected, "stored object has the wrong size; storing it again");
                self.damaged.lock().expect("not poisoned").insert(*id);
            }
        }
    }

    /// Every stored content address (from the listing [`Repair::new`] was given).
    pub(crate) fn stored_ids(&self) -> Vec<ContentId> {
        self.sizes.iter().map(|(id, _)| *id).collect()
    }

    pub(crate) fn mark_repaired(&self, id: &ContentId) {
        self.repaired.lock().expect("not poisoned").push(*id);
    }

    /// The objects replaced, and the named ones no file of this backup has (so they could not be).
    pub(crate) fn outcome(&self) -> (Vec<ContentId>, Vec<ContentId>) {
        let mut repaired = self.repaired.lock().expect("not poisoned").clone();
        repaired.sort();
        repaired.dedup();
        let mut missed: Vec<ContentId> = self
            .named
            .iter()
            .filter(|id| !repaired.contains(id))
            .copied()
            .collect();
        missed.sort();
        (repaired, missed)
    }
}

/// The content addresses the store holds, plus what this run has added.
///
/// What this run added is remembered in memory, unless the store stages this run's content in a
/// local folder: then only the objects being written are kept here, and a finished one is looked up
/// in the staging folder, so memory does not grow with the number of new files (a first backup of a
/// million photos).
///
/// A file whose content another worker is storing waits for that upload: should it fail (its file
/// changed, or could not be read), this one stores the content itself, so no entry ever names
/// content that was not stored.
pub struct Known {
    listed: Vec<ContentId>,
    /// This run's content: `false` while it is being stored, `true` once stored.
    added: Mutex<HashMap<ContentId, bool>>,
    changed: Condvar,
    /// Workers waiting on `changed` (counted under the `added` lock): with none, no wake-up.
    waiting: std::sync::atomic::AtomicUsize,
    staged: Option<Repository>,
    /// `backup --repair`: stored objects that do not count as stored.
    pub(crate) repair: Option<Arc<Repair>>,
}

impl Known {
    /// From a listing of `data/`.
    pub fn new(mut listed: Vec<ContentId>, repo: &Repository) -> Known {
        listed.sort_unstable();
        listed.dedup();
        Known {
            listed,
            added: Mutex::new(HashMap::new()),
            changed: Condvar::new(),
            waiting: Default::default(),
            staged: repo.is_staging().then(|| repo.clone()),
            repair: None,
        }
    }

    /// Content that `repair` marks damaged does not count as stored.
    pub(crate) fn with_repair(mut self, repair: Option<Arc<Repair>>) -> Known {
        self.repair = repair;
        self
    }

    /// Whether `id` is in the listing and not to be repaired.
    fn listed(&self, id: &ContentId) -> bool {
        self.listed.binary_search(id).is_ok()
            && !self.repair.as_ref().is_some_and(|r| r.is_damaged(id))
    }

    /// `backup --repair`: `id`, of a file of `len` bytes, is damaged if its stored size is wrong.
    pub(crate) fn check_size(&self, id: &ContentId, len: u64) {
        if let Some(r) = &self.repair {
            r.check_size(id, len);
        }
    }

    /// Whether storing `id` must replace a damaged stored object.
    pub fn replaces(&self, id: &ContentId) -> bool {
        self.repair.as_ref().is_some_and(|r| r.is_damaged(id))
            && self.listed.binary_search(id).is_ok()
    }

    fn is_staged(&self, id: &ContentId) -> bool {
        self.staged.as_ref().is_some_and(|s| s.is_staged(id))
    }

    fn added(&self) -> std::sync::MutexGuard<'_, HashMap<ContentId, bool>> {
        self.added.lock().expect("not poisoned")
    }

    /// Whether the store holds `id` (content still being stored does not count).
    pub fn contains(&self, id: &ContentId) -> bool {
        self.listed(id) || self.added().get(id) == Some(&true) || self.is_staged(id)
    }

    /// Claim `id` for upload; `None` when it is stored. While another worker is storing it, this
    /// waits for the outcome. Dropping the claim without [`Claim::stored`] releases it.
    pub(crate) fn claim(&self, id: &ContentId) -> Option<Claim<'_>> {
        if self.listed(id) {
            return None;
        }
        let mut added = self.added();
        loop {
            match added.get(id) {
                Some(true) => return None,
                Some(false) => {
                    self.waiting
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    added = self.changed.wait(added).expect("not poisoned");
                    self.waiting
                        .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
                }
                None if self.is_staged(id) && !self.replaces(id) => return None,
                None => {
                    added.insert(*id, false);
                    return Some(Claim {
                        known: self,
                        id: *id,
                        stored: false,
                    });
                }
            }
        }
    }

    /// `id` is stored now.
    fn stored(&self, id: &ContentId) {
        let mut added = self.added();
        if self.staged.is_some() {
            added.remove(id); // the staging folder has it
        } else {
            added.insert(*id, true);
        }
        self.wake(added);
    }

    /// Wake the workers waiting for an upload's outcome, if any (`added` is still locked).
    fn wake(&self, added: std::sync::MutexGuard<'_, HashMap<ContentId, bool>>) {
        if self.waiting.load(std::sync::atomic::Ordering::Relaxed) > 0 {
            self.changed.notify_all();
        }
        drop(added);
    }

    /// Storing `id` failed: the next file with this content stores it.
    fn release(&self, id: &ContentId) {
        let mut added = self.added();
        added.remove(id);
        self.wake(added);
    }

    pub fn len(&self) -> usize {
        self.listed.len()
    }

    /// Everything known to be stored now: what was listed and what this run stored, sorted.
    pub(crate) fn all_ids(&self) -> Vec<ContentId> {
        let mut ids = self.listed.clone();
        ids.extend(
            self.added()
                .iter()
                .filter(|(_, stored)| **stored)
                .map(|(id, _)| *id),
        );
        ids.sort_unstable();
        ids.dedup();
        ids
    }

    pub fn is_empty(&self) -> bool {
        self.listed.is_empty()
    }
}

/// The right, and the duty, to store one content object: released unless marked stored.
pub(crate) struct Claim<'a> {
    known: &'a Known,
    pub(crate) id: ContentId,
    stored: bool,
}

impl Claim<'_> {
    pub(crate) fn stored(mut self) {
        self.stored = true;
        self.known.stored(&self.id);
    }
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        if !self.stored {
            self.known.release(&self.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_whose_content_is_being_stored_waits_and_takes_over_a_failed_upload() {
        let store = crate::store::Store::from_object_store(
            Arc::new(object_store::memory::InMemory::new()),
            "",
            "memory:///",
        );
        let known = Known::new(vec![ContentId([1; 32])], &Repository::new(store));
        assert!(known.claim(&ContentId([1; 32])).is_none(), "listed");
        let id = ContentId([2; 32]);
        for fails in [true, false] {
            let first = known.claim(&id).expect("nobody stores it yet");
            assert!(!known.contains(&id), "being stored is not stored");
            std::thread::scope(|s| {
                let second = s.spawn(|| known.claim(&id).map(|c| c.id));
                std::thread::sleep(std::time::Duration::from_millis(50));
                assert!(!second.is_finished(), "it waits for the first upload");
                if fails {
                    drop(first); // the upload failed: released
                    assert_eq!(second.join().unwrap(), Some(id), "so it stores it itself");
                } else {
                    first.stored();
                    assert_eq!(second.join().unwrap(), None, "stored: nothing to do");
                }
            });
        }
        assert!(known.contains(&id));
    }
}
