//! What this program knows about Immich itself: the folders under UPLOAD_LOCATION, the marker file
//! Immich checks in each, and the tables that show a database has been used by Immich.
//!
//! A leaf: the config's defaults, the backup's walk, the restore's fresh-install check and the demo's
//! sample library all take these facts from here, so there is one copy of them.

/// Folders under UPLOAD_LOCATION that hold originals: a backup must take them.
pub const ORIGINAL_FOLDERS: [&str; 3] = ["library", "upload", "profile"];

/// Folders under UPLOAD_LOCATION that Immich can regenerate (or, for `backups/`, its own dumps): a
/// backup skips their content, a restore recreates them with their marker.
pub const GENERATED_FOLDERS: [&str; 3] = ["thumbs", "encoded-video", "backups"];

/// Every folder Immich expects under UPLOAD_LOCATION, each with a [`MARKER_FILE`].
pub const FOLDERS: [&str; 6] = [
    ORIGINAL_FOLDERS[0],
    ORIGINAL_FOLDERS[1],
    ORIGINAL_FOLDERS[2],
    GENERATED_FOLDERS[0],
    GENERATED_FOLDERS[1],
    GENERATED_FOLDERS[2],
];

/// Marker file Immich keeps in each of its folders and checks at start-up.
pub const MARKER_FILE: &str = ".immich";

/// Tables whose presence shows that Immich has used a database (older and newer names).
pub const TABLES: [&str; 14] = [
    "kysely_migrations",
    "kysely_migrations_lock",
    "migrations",
    "asset",
    "assets",
    "user",
    "users",
    "album",
    "albums",
    "asset_exif",
    "exif",
    "system_metadata",
    "version_history",
    "person",
];
