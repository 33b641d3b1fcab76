//! "What did I lose?": for each damaged or missing content object, the snapshots that need it and,
//! with the identity, the paths whose content it holds.
//!
//! Found after the fact, and only for the objects with a problem: one more pass over the file
//! lists (with the identity) or the refs (without), so that the check itself keeps no path in
//! memory.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use super::{Deep, Index, Problem};
use crate::error::Result;
use crate::format::{ContentId, EntryKind};
use crate::repo::{snapshots, Repository};
use crate::restore;

/// The most paths named for one object.
pub const MAX_PATHS: usize = 100;

/// Fill in the snapshots and paths of the content objects among `problems`.
pub(super) async fn name(
    repo: &Repository,
    deep: Option<&Deep>,
    index: &Index,
    problems: &mut [Problem],
) -> Result<()> {
    let mut wanted: HashMap<ContentId, Vec<usize>> = HashMap::new();
    for (i, p) in problems.iter().enumerate() {
        if let Some(c) = ContentId::from_key(&p.object) {
            wanted.entry(c).or_default().push(i);
        }
    }
    if wanted.is_empty() {
        return Ok(());
    }
    let set: Arc<HashSet<ContentId>> = Arc::new(wanted.keys().copied().collect());
    for (at, id) in index.ids.iter().enumerate() {
        let found = match (deep, &index.manifests[at]) {
            (Some(d), Some(manifest)) => {
                let set = set.clone();
                restore::files::scan_list(&d.reader, manifest, None, Vec::new(), move |v, e| {
                    match e.content {
                        Some(c) if e.kind == EntryKind::File && set.contains(&c) => {
                            v.push((c, Some(e.path)))
                        }
                        _ => {}
                    }
                    Ok(())
                })
                .await
                .ok()
            }
            _ => None,
        };
        let found = match found {
            Some(f) => f,
            None => in_refs(repo, id, &set).await,
        };
        for (c, path) in found {
            for &i in &wanted[&c] {
                add(&mut problems[i], id, path.as_deref());
            }
        }
    }
    Ok(())
}

/// The wanted addresses snapshot `id`'s refs name (what they tell up to any damage).
async fn in_refs(
    repo: &Repository,
    id: &str,
    set: &HashSet<ContentId>,
) -> Vec<(ContentId, Option<String>)> {
    let mut found = Vec::new();
    let _ = snapshots::read_refs(repo, id, |c| {
        if set.contains(&c) {
            found.push((c, None));
        }
    })
    .await;
    found
}

fn add(p: &mut Problem, snapshot: &str, path: Option<&str>) {
    if p.snapshots.last().map(String::as_str) != Some(snapshot) {
        p.snapshots.push(snapshot.to_string());
    }
    if let Some(path) = path {
        if p.paths.len() < MAX_PATHS && !p.paths.iter().any(|q| q == path) {
            p.paths.push(path.to_string());
        }
    }
}
