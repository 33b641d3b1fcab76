//! `ls SNAPSHOT [PATH]`: the entries of a snapshot's file list, streamed as they are read.
//!
//! As restic's `ls`: without PATH every entry; with PATH a folder's direct children (with
//! `--recursive`, everything below it), or the one entry when PATH is a file or a symlink. A PATH
//! the snapshot does not hold is an error naming it, after the whole list was read.

use crate::error::{Error, Result};
use crate::format::{Entry, EntryKind, Manifest};
use crate::repo::Reader;
use crate::restore::files::scan_list;

/// Which entries to list.
#[derive(Debug, Clone, Default)]
pub struct LsOptions {
    /// A folder (or file) in the snapshot, `library/admin/2024`; leading and trailing `/` are
    /// ignored. `None`: everything.
    pub path: Option<String>,
    /// Everything below `path`, not only its direct children.
    pub recursive: bool,
}

/// What to do with one entry: whether it is listed, and whether it is `path` itself.
#[derive(Debug, Clone)]
pub(crate) struct Filter {
    path: Option<String>,
    recursive: bool,
}

impl Filter {
    pub(crate) fn new(opts: &LsOptions) -> Filter {
        let path = opts
            .path
            .as_deref()
            .map(|p| p.trim_matches('/').to_string())
            .filter(|p| !p.is_empty());
        Filter {
            path,
            recursive: opts.recursive,
        }
    }

    /// `(listed, is the path itself)` for `e`.
    pub(crate) fn test(&self, e: &Entry) -> (bool, bool) {
        let Some(p) = &self.path else {
            return (true, false);
        };
        if e.path == *p {
            return (e.kind != EntryKind::Dir, true);
        }
        let below = e
            .path
            .strip_prefix(p.as_str())
            .and_then(|rest| rest.strip_prefix('/'));
        match below {
            Some(rest) => (self.recursive || !rest.contains('/'), false),
            None => (false, false),
        }
    }
}

/// Hand each entry `opts` selects from `manifest`'s file list to `each` (on a blocking thread,
/// in walk order); returns how many were listed.
pub async fn ls(
    reader: &Reader,
    manifest: &Manifest,
    opts: &LsOptions,
    mut each: impl FnMut(&Entry) -> Result<()> + Send + 'static,
) -> Result<u64> {
    let filter = Filter::new(opts);
    let wanted = filter.path.clone();
    let (listed, found) = scan_list(reader, manifest, None, (0u64, false), move |s, e| {
        let (show, itself) = filter.test(&e);
        s.1 |= itself;
        if show {
            s.0 += 1;
            each(&e)?;
        }
        Ok(())
    })
    .await?;
    match wanted {
        Some(p) if !found => Err(Error::Usage(format!(
            "snapshot {} has no {p:?}; see what it holds with `immich-backup ls {}` (paths are relative to UPLOAD_LOCATION, as `library/admin/2024`)",
            manifest.id, manifest.id
        ))),
        _ => Ok(listed),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(path: &str, kind: EntryKind) -> Entry {
        Entry {
            path: path.into(),
            kind,
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
    fn a_folder_lists_its_children_or_everything_below_it() {
        let opts = |path: &str, recursive| LsOptions {
            path: Some(path.into()),
            recursive,
        };
        let flat = Filter::new(&opts("/library/admin/", false));
        let deep = Filter::new(&opts("library/admin", true));
        let dir = entry("library/admin", EntryKind::Dir);
        let child = entry("library/admin/2024", EntryKind::Dir);
        let grandchild = entry("library/admin/2024/a.jpg", EntryKind::File);
        let sibling = entry("library/admin2/b.jpg", EntryKind::File);
        assert_eq!(flat.test(&dir), (false, true));
        assert_eq!(flat.test(&child), (true, false));
        assert_eq!(flat.test(&grandchild), (false, false));
        assert_eq!(deep.test(&grandchild), (true, false));
        assert_eq!(flat.test(&sibling), (false, false));
        let file = Filter::new(&opts("library/admin/2024/a.jpg", false));
        assert_eq!(file.test(&grandchild), (true, true));
        assert_eq!(
            Filter::new(&LsOptions::default()).test(&sibling),
            (true, false)
        );
    }
}
