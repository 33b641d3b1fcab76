//! What this program knows about Immich itself: the folders under UPLOAD_LOCATION, the marker file
//! Immich checks in each, the tables that show a database has been used by Immich, and the tables and
//! columns that name each asset's files.
//!
//! A leaf: the config's defaults, the backup's walk and consistency check, the restore's fresh-install
//! check and the demo's sample library all take these facts from here, so there is one copy of them.
//! [`copy`] reads PostgreSQL's COPY text format (how the dump holds those tables), [`paths`] maps
//! Immich's container paths to paths in a snapshot.

pub mod copy;
pub mod env_file;
pub mod exclude;
pub mod paths;

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

/// Folders under UPLOAD_LOCATION that hold assets' files (originals and sidecars): a file there
/// that no asset names is an orphan.
pub const ASSET_FOLDERS: [&str; 2] = ["library", "upload"];

/// The asset table as the dump names it (since 2025, and before).
pub const ASSET_TABLES: [&str; 2] = ["public.asset", "public.assets"];

/// The external libraries' table (since 2025, and before): its `"importPaths"` (`text[]`) are
/// container paths mounted from elsewhere.
pub const LIBRARY_TABLES: [&str; 2] = ["public.library", "public.libraries"];

/// Newer Immich keeps each asset's other files here (`"type"` `'sidecar'` rows name XMP sidecars).
pub const ASSET_FILE_TABLE: &str = "public.asset_file";

/// The users' table (since 2025, and before): `id`, `email`.
pub const USER_TABLES: [&str; 2] = ["public.user", "public.users"];

/// The albums' table (since 2025, and before): `id`, `"albumName"`.
pub const ALBUM_TABLES: [&str; 2] = ["public.album", "public.albums"];

/// Which assets each album holds (since 2025: `"albumId"`, `"assetId"`; before:
/// `albums_assets_assets` with `"albumsId"`, `"assetsId"`).
pub const ALBUM_ASSET_TABLES: [&str; 2] = ["public.album_asset", "public.albums_assets_assets"];

/// Columns of those tables.
pub mod column {
    /// Asset: container path of the original.
    pub const ORIGINAL_PATH: &str = "originalPath";
    /// Asset (older Immich): container path of the XMP sidecar, or NULL.
    pub const SIDECAR_PATH: &str = "sidecarPath";
    /// Asset: `active`, `trashed` or `deleted` (a deleted asset's files are being removed).
    pub const STATUS: &str = "status";
    /// Asset (external libraries, older Immich): the file is gone and Immich knows it.
    pub const IS_OFFLINE: &str = "isOffline";
    /// Asset file: its kind (`sidecar`, `thumbnail`, `preview`, …).
    pub const TYPE: &str = "type";
    /// Asset file: its container path.
    pub const PATH: &str = "path";
    /// Library: the import paths.
    pub const IMPORT_PATHS: &str = "importPaths";
    /// Every table: the row's id (a uuid).
    pub const ID: &str = "id";
    /// Asset, album: the owning user's id.
    pub const OWNER_ID: &str = "ownerId";
    /// Asset: the file name as uploaded.
    pub const ORIGINAL_FILE_NAME: &str = "originalFileName";
    /// Asset: the capture time as the photo's local wall-clock time, stored as if it were UTC (what
    /// Immich's timeline shows).
    pub const LOCAL_DATE_TIME: &str = "localDateTime";
    /// Asset: the capture time (UTC).
    pub const FILE_CREATED_AT: &str = "fileCreatedAt";
    /// User: the e-mail address (the login).
    pub const EMAIL: &str = "email";
    /// Album: its name (not unique).
    pub const ALBUM_NAME: &str = "albumName";
    /// Album-asset: the album and the asset (since 2025, and before).
    pub const ALBUM_ID: [&str; 2] = ["albumId", "albumsId"];
    pub const ASSET_ID: [&str; 2] = ["assetId", "assetsId"];
}
