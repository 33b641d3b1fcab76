//! `find PATTERN…`: which snapshots hold a path, by glob, across snapshots.
//!
//! As restic's `find`: a pattern matches an entry when it matches its whole path or its name
//! (`*.jpg`, `IMG_0001*`, `library/admin/**/café*`); `*` and `?` stop at `/`, `**` crosses it.
//! Every complete snapshot by default, oldest first, or those `--snapshot` names, or the newest N.
//! Each file list is streamed, one snapshot after the other; a snapshot that cannot be trusted is
//! skipped with a warning (and named in the report), as `restore latest` skips it.

use chrono::{DateTime, Utc};
use globset::{GlobBuilder, GlobSet, GlobSetBuilder};
use serde::Serialize;

use crate::error::{Error, Result};
use crate::format::Entry;
use crate::repo::snapshots;
use crate::repo::trust::{self, Opened, Trust};
use crate::repo::Reader;
use crate::restore::files::scan_list;

/// What to look for, and where.
#[derive(Debug, Clone, Default)]
pub struct FindOptions {
    pub patterns: Vec<String>,
    pub ignore_case: bool,
    /// Snapshot ids (or prefixes, or `latest`); empty: every complete snapshot.
    pub snapshots: Vec<String>,
    /// Only the newest N of them.
    pub newest: Option<usize>,
}

/// What `find` went through.
#[derive(Debug, Clone, Default, Serialize)]
pub struct FindReport {
    /// Snapshots searched, and matches in each.
    pub searched: Vec<Searched>,
    /// Snapshots left out because they cannot be trusted (or their manifest is damaged), each
    /// with why.
    pub skipped: Vec<(String, String)>,
    pub matches: u64,
}

/// One snapshot searched.
#[derive(Debug, Clone, Serialize)]
pub struct Searched {
    pub snapshot: String,
    pub time: DateTime<Utc>,
    pub hits: u64,
}

/// The patterns, compiled.
#[derive(Debug, Clone)]
pub struct Patterns {
    set: GlobSet,
    /// Paths are lowercased before matching (globset folds ASCII case only: `É` would not
    /// match `é`), and so were the patterns.
    ignore_case: bool,
}

/// The patterns, compiled; a bad one is a usage error naming it.
pub fn patterns(opts: &FindOptions) -> Result<Patterns> {
    if opts.patterns.is_empty() {
        return Err(Error::Usage(
            "find needs at least one pattern, as `'*.jpg'` or `'library/admin/**/IMG_0001*'`"
                .into(),
        ));
    }
    let mut set = GlobSetBuilder::new();
    for p in &opts.patterns {
        let text = p.trim_start_matches('/');
        let text = match opts.ignore_case {
            true => text.to_lowercase(),
            false => text.to_string(),
        };
        let glob = GlobBuilder::new(&text)
            .literal_separator(true)
            .build()
            .map_err(|e| Error::Usage(format!("find: bad pattern {p:?}: {e}")))?;
        set.add(glob);
    }
    let set = set
        .build()
        .map_err(|e| Error::Usage(format!("find: bad patterns: {e}")))?;
    Ok(Patterns {
        set,
        ignore_case: opts.ignore_case,
    })
}

/// Whether `e` matches: its path, or its name.
fn matches(p: &Patterns, e: &Entry) -> bool {
    let lower;
    let path = if p.ignore_case {
        lower = e.path.to_lowercase();
        &lower
    } else {
        &e.path
    };
    let name = path.rsplit('/').next().unwrap_or(path);
    p.set.is_match(path) || p.set.is_match(name)
}

/// The snapshots to search, oldest first, opened (authentic); those that cannot be trusted go into
/// `skipped` when none was named (a named one that cannot be trusted is an error).
async fn choose(
    reader: &Reader,
    trust: &Trust,
    opts: &FindOptions,
    skipped: &mut Vec<(String, String)>,
) -> Result<Vec<Opened>> {
    let mut out: Vec<Opened> = Vec::new();
    if !opts.snapshots.is_empty() {
        for wanted in &opts.snapshots {
            let opened = trust::resolve(reader, trust, wanted).await?;
            if !out.iter().any(|o| o.id == opened.id) {
                out.push(opened);
            }
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
    } else {
        let folders = snapshots::list_folders(reader.repo()).await?;
        let trust = trust::legacy_aware(trust, &folders);
        for id in folders.iter().filter(|(_, f)| f.complete).map(|(id, _)| id) {
            match trust::open(reader, &trust, id).await {
                Ok(o) => out.push(o),
                Err(
                    e @ (Error::Unauthentic { .. } | Error::Corrupt { .. } | Error::Missing { .. }),
                ) => {
                    tracing::warn!(snapshot = %id, "not searched, it cannot be trusted: {e}");
                    skipped.push((id.clone(), e.to_string()));
                }
                Err(e) => return Err(e),
            }
        }
    }
    if let Some(n) = opts.newest {
        let cut = out.len().saturating_sub(n);
        out.drain(..cut);
    }
    Ok(out)
}

/// Search the chosen snapshots' file lists, handing each match to `each` with its snapshot's id
/// and time (on a blocking thread, snapshot by snapshot, in walk order).
pub async fn find<F>(
    reader: &Reader,
    trust: &Trust,
    opts: &FindOptions,
    each: F,
) -> Result<FindReport>
where
    F: FnMut(&str, DateTime<Utc>, &Entry) -> Result<()> + Send + 'static,
{
    let set = patterns(opts)?;
    let mut report = FindReport::default();
    let chosen = choose(reader, trust, opts, &mut report.skipped).await?;
    let mut each = each;
    for opened in chosen {
        let (id, time) = (opened.id.clone(), opened.manifest.time);
        let set = set.clone();
        let state = (each, 0u64);
        let (back, hits) = scan_list(reader, &opened.manifest, None, state, move |s, e| {
            if matches(&set, &e) {
                s.1 += 1;
                (s.0)(&id, time, &e)?;
            }
            Ok(())
        })
        .await?;
        each = back;
        report.matches += hits;
        report.searched.push(Searched {
            snapshot: opened.id,
            time,
            hits,
        });
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::EntryKind;

    fn entry(path: &str) -> Entry {
        Entry {
            path: path.into(),
            kind: EntryKind::File,
            size: 0,
            mtime_ns: 0,
            mode: 0o644,
            content: None,
            target: None,
            uid: None,
            gid: None,
        }
    }

    #[test]
    fn a_pattern_matches_the_path_or_the_name() {
        let set = |p: &[&str], ic| {
            patterns(&FindOptions {
                patterns: p.iter().map(|s| s.to_string()).collect(),
                ignore_case: ic,
                ..Default::default()
            })
            .unwrap()
        };
        let cafe = entry("library/admin/Été 2024/café ☕.jpg");
        assert!(matches(&set(&["café*"], false), &cafe));
        assert!(matches(&set(&["*.jpg"], false), &cafe));
        assert!(matches(&set(&["library/admin/**/*☕*"], false), &cafe));
        assert!(matches(&set(&["/library/*/Été 2024/*"], false), &cafe));
        assert!(!matches(&set(&["library/*.jpg"], false), &cafe));
        assert!(!matches(&set(&["CAFÉ*"], false), &cafe));
        assert!(matches(&set(&["CAFÉ*"], true), &cafe));
        assert!(patterns(&FindOptions::default()).is_err());
        assert!(patterns(&FindOptions {
            patterns: vec!["a[".into()],
            ..Default::default()
        })
        .is_err());
    }
}
