//! `[immich] exclude`: glob patterns of snapshot paths a backup leaves out.
//!
//! Patterns match the paths the file list records: relative to UPLOAD_LOCATION
//! (`library/admin/2024/x.tmp`), and `external/<container path>/…` for external libraries. `*` and
//! `?` stay within one path component, `**` crosses any number of them, `{a,b}` and `[ab]` work as
//! in a shell (`globset`, with `literal_separator`). A folder that matches is left out with
//! everything in it.

use std::sync::Arc;

use globset::{GlobBuilder, GlobSet, GlobSetBuilder};

/// The compiled patterns; empty matches nothing.
#[derive(Debug, Clone, Default)]
pub struct Excludes {
    set: Option<Arc<GlobSet>>,
}

impl Excludes {
    /// Compile `patterns`; `Err` names the first bad one and why.
    pub fn new(patterns: &[String]) -> Result<Excludes, String> {
        if patterns.is_empty() {
            return Ok(Excludes::default());
        }
        let mut b = GlobSetBuilder::new();
        for p in patterns {
            let glob = GlobBuilder::new(p)
                .literal_separator(true)
                .backslash_escape(true)
                .build()
                .map_err(|e| format!("{p:?} is not a valid glob pattern: {}", e.kind()))?;
            b.add(glob);
        }
        let set = b.build().map_err(|e| e.to_string())?;
        Ok(Excludes {
            set: Some(Arc::new(set)),
        })
    }

    /// Whether no pattern is given.
    pub fn is_empty(&self) -> bool {
        self.set.is_none()
    }

    /// Whether snapshot path `path` is excluded by a pattern (itself, not through a folder).
    pub fn matches(&self, path: &str) -> bool {
        self.set.as_ref().is_some_and(|s| s.is_match(path))
    }

    /// Whether `path` or one of the folders above it is excluded (what a backup leaves out).
    pub fn covers(&self, path: &str) -> bool {
        if self.is_empty() {
            return false;
        }
        path.match_indices('/')
            .map(|(i, _)| &path[..i])
            .chain(std::iter::once(path))
            .any(|p| self.matches(p))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex(p: &[&str]) -> Excludes {
        Excludes::new(&p.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap()
    }

    #[test]
    fn patterns_match_snapshot_paths_component_wise() {
        let e = ex(&["**/*.tmp", "library/*/Trash/**", "upload/cache"]);
        assert!(e.matches("library/admin/2024/x.tmp"));
        assert!(e.matches("x.tmp"));
        assert!(e.matches("library/admin/Trash/2024/a.jpg"));
        assert!(!e.matches("library/admin/2024/Trash/a.jpg"));
        assert!(!e.matches("library/admin/2024/x.jpg"));
        assert!(e.matches("upload/cache"));
        assert!(!e.matches("upload/cache/a.jpg"));
        assert!(e.covers("upload/cache/a.jpg"));
        assert!(!e.covers("upload/cached/a.jpg"));
        assert!(ex(&[]).is_empty() && !ex(&[]).covers("a"));
        let err = Excludes::new(&["library/[abc".into()]).unwrap_err();
        assert!(err.contains("\"library/[abc\""), "{err}");
    }
}
