//! Which part of a snapshot's file list goes to which restore target.
//!
//! A snapshot holds UPLOAD_LOCATION's originals folders (`library/…`, `upload/…`, `profile/…`) and,
//! when external libraries were backed up, each library under its own folder
//! (`external/<container path>/…`, recorded in the manifest with the host path it came from). A
//! restore puts the first into its target (UPLOAD_LOCATION) and each library into its host path
//! (or the one `[immich] external_libraries` gives for its container path on the new machine): one
//! [`View`] per target, each seeing only its own entries, with paths relative to that target.

use std::collections::BTreeMap;
use std::path::PathBuf;

use crate::format::{ExternalLibrary, Manifest};

/// One restore target's part of the file list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct View {
    /// `None`: UPLOAD_LOCATION (the originals folders); `Some`: the external library stored under
    /// this snapshot folder.
    external: Option<String>,
    /// The originals folders (UPLOAD_LOCATION's view).
    folders: Vec<String>,
}

impl View {
    /// UPLOAD_LOCATION's part: the snapshot's originals folders.
    pub fn upload_location(manifest: &Manifest) -> View {
        View {
            external: None,
            folders: manifest.folders.clone(),
        }
    }

    /// The part of the external library stored under `library.folder`.
    pub fn external(library: &ExternalLibrary) -> View {
        View {
            external: Some(library.folder.clone()),
            folders: Vec::new(),
        }
    }

    /// Whether this is an external library's part.
    pub fn is_external(&self) -> bool {
        self.external.is_some()
    }

    /// The originals folders the target holds (`None`: everything in the target is the view's).
    pub fn folders(&self) -> Option<&[String]> {
        self.external.is_none().then_some(self.folders.as_slice())
    }

    /// The path of snapshot entry `path` in this view's target; `None` when it is not this
    /// view's, or is the external library's own folder (the target itself, left as it is).
    pub fn rel<'a>(&self, path: &'a str) -> Option<&'a str> {
        match &self.external {
            None => {
                let top = path.split('/').next()?;
                self.folders.iter().any(|f| f == top).then_some(path)
            }
            Some(folder) => path
                .strip_prefix(folder.as_str())?
                .strip_prefix('/')
                .filter(|r| !r.is_empty()),
        }
    }

    /// The snapshot path of `rel` in this view (how reports name a file).
    pub fn snapshot_path(&self, rel: &str) -> String {
        match &self.external {
            None => rel.to_string(),
            Some(folder) => format!("{folder}/{rel}"),
        }
    }
}

/// Each external library of `manifest` with the folder it is restored to: the host path
/// `targets` gives for its container path (the restore's `[immich] external_libraries`), else the
/// one it was backed up from.
pub fn external_targets(
    manifest: &Manifest,
    targets: &BTreeMap<String, PathBuf>,
) -> Vec<(View, PathBuf)> {
    manifest
        .external_libraries
        .iter()
        .map(|l| {
            let host = targets
                .get(&l.container_path)
                .cloned()
                .unwrap_or_else(|| PathBuf::from(&l.host_path));
            (View::external(l), host)
        })
        .collect()
}

/// Whether `path` (of a snapshot's file list) belongs to one of `manifest`'s external libraries.
pub fn in_external_library(manifest: &Manifest, path: &str) -> bool {
    manifest
        .external_libraries
        .iter()
        .any(|l| View::external(l).rel(path).is_some() || path == l.folder)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_view_sees_its_own_entries_relative_to_its_target() {
        let lib = ExternalLibrary {
            container_path: "/mnt/photos".into(),
            host_path: "/srv/photos".into(),
            folder: "external/mnt/photos".into(),
        };
        let main = View {
            external: None,
            folders: vec!["library".into(), "upload".into()],
        };
        let ext = View::external(&lib);
        assert_eq!(main.rel("library/a.jpg"), Some("library/a.jpg"));
        assert_eq!(main.rel("library"), Some("library"));
        assert_eq!(main.rel("external/mnt/photos/a.jpg"), None);
        assert_eq!(main.rel("profile/x"), None);
        assert_eq!(
            ext.rel("external/mnt/photos/2020/a.jpg"),
            Some("2020/a.jpg")
        );
        assert_eq!(ext.rel("external/mnt/photos"), None);
        assert_eq!(ext.rel("external/mnt/photosbis/a.jpg"), None);
        assert_eq!(ext.rel("library/a.jpg"), None);
        assert_eq!(
            ext.snapshot_path("2020/a.jpg"),
            "external/mnt/photos/2020/a.jpg"
        );
        assert_eq!(main.folders().map(<[String]>::len), Some(2));
        assert_eq!(ext.folders(), None);
    }
}
