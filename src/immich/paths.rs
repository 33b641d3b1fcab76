//! Immich's container paths mapped to paths in a snapshot.
//!
//! Immich's database holds absolute paths as the server container sees them: UPLOAD_LOCATION is
//! mounted at `/data` (older installs: `/usr/src/app/upload`, and older still the relative
//! `upload/…`), or wherever `IMMICH_MEDIA_LOCATION` says; external libraries are other mounts. A
//! snapshot names a file by its path relative to UPLOAD_LOCATION (`library/admin/2024/IMG_1.jpg`),
//! and the files of a backed-up external library under `external/<its container path>/…`. Pure
//! string work, no I/O.

/// Where Immich's server container has UPLOAD_LOCATION, newest first (without IMMICH_MEDIA_LOCATION).
pub const MEDIA_LOCATIONS: [&str; 2] = ["/data", "/usr/src/app/upload"];

/// The working folder of Immich's server, against which old relative paths (`upload/…`) resolve.
const SERVER_WORKDIR: &str = "/usr/src/app";

/// The top folder of a snapshot under which backed-up external libraries are stored.
pub const EXTERNAL_FOLDER: &str = "external";

/// How the paths of one Immich install map into its snapshots.
#[derive(Debug, Clone)]
pub struct PathMap {
    /// Container paths of UPLOAD_LOCATION, normalised.
    media: Vec<String>,
    /// Backed-up external libraries: (container path, snapshot folder), normalised.
    external: Vec<(String, String)>,
}

impl PathMap {
    /// The standard media locations plus `media_location` (IMMICH_MEDIA_LOCATION, if set), and the
    /// container paths of the external libraries that are backed up.
    pub fn new<'a>(media_location: &str, external: impl IntoIterator<Item = &'a str>) -> PathMap {
        let mut media: Vec<String> = MEDIA_LOCATIONS.iter().map(|m| m.to_string()).collect();
        if let Some(m) = normalize(media_location) {
            media.push(m);
        }
        let external = external
            .into_iter()
            .filter_map(|c| Some((normalize(c)?, external_folder(c)?)))
            .collect();
        PathMap { media, external }
    }

    /// The snapshot path of the file Immich records at `path`; `None` when it is outside
    /// UPLOAD_LOCATION and every backed-up external library.
    pub fn map(&self, path: &str) -> Option<String> {
        let mut out = String::new();
        self.map_into(path, &mut out).then_some(out)
    }

    /// [`PathMap::map`] into `out` (cleared first), without allocating for the common case;
    /// `false` when the path is outside.
    pub fn map_into(&self, path: &str, out: &mut String) -> bool {
        out.clear();
        let abs;
        let path = if path.starts_with('/') {
            path
        } else {
            abs = format!("{SERVER_WORKDIR}/{path}");
            &abs
        };
        let media = self.media.iter().map(|m| (m.as_str(), ""));
        let external = self.external.iter().map(|(c, f)| (c.as_str(), f.as_str()));
        let found = media
            .chain(external)
            .filter_map(|(prefix, folder)| Some((under(path, prefix)?, folder, prefix.len())))
            .max_by_key(|(_, _, len)| *len);
        let Some((rest, folder, _)) = found else {
            return false;
        };
        if !folder.is_empty() {
            out.push_str(folder);
            out.push('/');
        }
        if is_plain(rest) {
            out.push_str(rest);
            return true;
        }
        match relative(rest) {
            Some(rest) => {
                out.push_str(&rest);
                true
            }
            None => false,
        }
    }
}

/// A relative path of plain components only (no empty, `.` or `..` one).
fn is_plain(path: &str) -> bool {
    path.split('/')
        .all(|c| !c.is_empty() && c != "." && c != "..")
}

impl Default for PathMap {
    /// The standard media locations, no external library.
    fn default() -> Self {
        PathMap::new("", [])
    }
}

/// The snapshot folder of the external library mounted at `container_path` in Immich's server:
/// `/mnt/photos` → `external/mnt/photos`. `None` for a path that is not absolute or is `/`.
pub fn external_folder(container_path: &str) -> Option<String> {
    let n = normalize(container_path)?;
    (n != "/").then(|| format!("{EXTERNAL_FOLDER}{n}"))
}

/// `path` below `prefix` (both absolute, normalised prefix), without the separating `/`.
fn under<'a>(path: &'a str, prefix: &str) -> Option<&'a str> {
    if prefix == "/" {
        return path.strip_prefix('/');
    }
    path.strip_prefix(prefix)?.strip_prefix('/')
}

/// An absolute path without empty, `.` and `..` components and without a trailing `/`; `None`
/// when not absolute.
fn normalize(path: &str) -> Option<String> {
    let path = path.trim();
    if !path.starts_with('/') {
        return None;
    }
    let rel = relative(path.trim_start_matches('/')).unwrap_or_default();
    Some(format!("/{rel}"))
}

/// A relative path resolved lexically (`a/./b/../c` → `a/c`); `None` when it climbs above its
/// start or is empty.
fn relative(path: &str) -> Option<String> {
    let mut parts: Vec<&str> = Vec::new();
    for c in path.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                parts.pop()?;
            }
            c => parts.push(c),
        }
    }
    (!parts.is_empty()).then(|| parts.join("/"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn container_paths_map_to_snapshot_paths() {
        let m = PathMap::new("", []);
        let cases = [
            (
                "/data/library/admin/2024/IMG_1.jpg",
                Some("library/admin/2024/IMG_1.jpg"),
            ),
            (
                "/usr/src/app/upload/upload/u1/ab/cd/x.mp4",
                Some("upload/u1/ab/cd/x.mp4"),
            ),
            (
                "upload/library/admin/IMG_2.jpg",
                Some("library/admin/IMG_2.jpg"),
            ),
            ("/data//library/./a/../b.jpg", Some("library/b.jpg")),
            ("/data/../etc/passwd", None),
            ("/data", None),
            ("/database/x.jpg", None),
            ("/mnt/photos/2020/a.jpg", None),
        ];
        for (path, want) in cases {
            assert_eq!(m.map(path).as_deref(), want, "{path}");
        }
    }

    #[test]
    fn media_location_and_external_libraries() {
        let m = PathMap::new("/srv/media/", ["/mnt/photos", "/data/ext"]);
        assert_eq!(
            m.map("/srv/media/library/a.jpg").as_deref(),
            Some("library/a.jpg")
        );
        assert_eq!(
            m.map("/mnt/photos/2020/b c.jpg").as_deref(),
            Some("external/mnt/photos/2020/b c.jpg")
        );
        // The longest prefix wins: an external library mounted inside /data is that library.
        assert_eq!(
            m.map("/data/ext/x.jpg").as_deref(),
            Some("external/data/ext/x.jpg")
        );
        assert_eq!(
            m.map("/data/library/x.jpg").as_deref(),
            Some("library/x.jpg")
        );
        assert_eq!(m.map("/mnt/photosbis/x.jpg"), None);
        assert_eq!(m.map("/mnt/photos/../x.jpg"), None);
    }

    #[test]
    fn external_folders() {
        assert_eq!(
            external_folder("/mnt/photos/").as_deref(),
            Some("external/mnt/photos")
        );
        assert_eq!(
            external_folder("/a//b/./c").as_deref(),
            Some("external/a/b/c")
        );
        assert_eq!(external_folder("/"), None);
        assert_eq!(external_folder("mnt"), None);
    }
}
