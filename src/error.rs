//! The library's error type and the process exit codes it maps to.
//!
//! Every error a user can cause or meet (bad config, wrong key, missing object, unreachable database, a
//! target that is not a fresh install) is one variant with a one-line cause and, where there is one, the
//! remedy. The CLI prints `Display` and exits with [`Error::exit_code`]; the codes are documented in
//! the README and must not change meaning.

use std::path::PathBuf;

/// Process exit codes (documented in README.md, "Exit codes").
pub mod exit {
    /// Success.
    pub const OK: i32 = 0;
    /// Any failure not covered by a more specific code.
    pub const FAILURE: i32 = 1;
    /// Bad command line or configuration.
    pub const USAGE: i32 = 2;
    /// Backup finished, but some files could not be read; the snapshot says which. Restoring a
    /// selection finished, but files that differ from the snapshot's were left as they were (listed).
    pub const PARTIAL: i32 = 3;
    /// Restore finished, but some files could not be restored: their content objects are damaged
    /// or missing (listed); everything else was restored.
    pub const DAMAGED: i32 = 4;
    /// The store is unreachable, missing, or refuses our credentials.
    pub const STORAGE: i32 = 10;
    /// The store is locked by another run (see `unlock`).
    pub const LOCKED: i32 = 11;
    /// The identity cannot decrypt the snapshot (wrong key or passphrase).
    pub const WRONG_KEY: i32 = 12;
    /// An object is missing, truncated, tampered with or does not match its address.
    pub const INTEGRITY: i32 = 13;
    /// The database could not be reached, dumped or restored.
    pub const DATABASE: i32 = 14;
    /// Restore refused: the target is not a fresh install.
    pub const NOT_FRESH: i32 = 15;
    /// Docker Engine problem (socket, container, exec).
    pub const DOCKER: i32 = 16;
    /// A `[hooks] before_backup` command failed or timed out; the backup did not run.
    pub const HOOK: i32 = 17;
    /// Interrupted by a signal; nothing partial was made visible.
    pub const INTERRUPTED: i32 = 130;
}

/// Result alias for the library.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong, each with the cause and what to do.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("configuration: {0}")]
    Config(String),

    #[error("{0}")]
    Usage(String),

    #[error("storage {url}: {message}")]
    Storage { url: String, message: String },

    #[error("storage object {object}: {message}{}", text_remedy(message))]
    StorageObject { object: String, message: String },

    #[error("store is locked: {0}")]
    Locked(String),

    #[error("cannot decrypt {object} with the given identity (wrong identity file or passphrase?): {message}")]
    WrongKey { object: String, message: String },

    #[error("object {object} is missing from the store: {hint}")]
    Missing { object: String, hint: String },

    #[error(
        "object {object} is corrupted or tampered with: {message}; {}",
        corrupt_remedy(object)
    )]
    Corrupt { object: String, message: String },

    #[error("snapshot {snapshot} cannot be trusted: {message}. Restore another snapshot (`immich-backup snapshots`); if this store was written before immich-backup signed snapshots (0.1) and you trust it, pass --allow-unsigned; if it was signed with a key not made from this identity, pass --verify-key")]
    Unauthentic { snapshot: String, message: String },

    #[error("database: {0}")]
    Database(String),

    #[error("restore refused, the target is not a fresh install: {reason}. {remedy}")]
    NotFresh { reason: String, remedy: String },

    #[error("docker: {0}")]
    Docker(String),

    #[error("{}: {source}{}", path.display(), io_remedy(source))]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("encryption: {0}")]
    Crypto(String),

    #[error("interrupted; nothing partial was made visible, the next run resumes")]
    Interrupted,

    #[error("{0}")]
    Other(String),

    /// A `[hooks]` command failed: which, its exit status, its last line on stderr.
    #[error("{0}")]
    Hook(String),
}

/// What to do about an I/O error, when there is something to say.
fn io_remedy(e: &std::io::Error) -> &'static str {
    match e.raw_os_error() {
        Some(libc::ENOSPC) => {
            " (the disk is full: free space or choose another target, then run again)"
        }
        Some(libc::EACCES) | Some(libc::EPERM) => {
            " (permission denied: run as a user that may write there)"
        }
        Some(libc::EROFS) => " (read-only file system)",
        _ => "",
    }
}

/// What to do about a damaged object: content can be stored again from its original; a snapshot's
/// own objects cannot.
fn corrupt_remedy(object: &str) -> &'static str {
    if object.starts_with("data/") {
        "run `immich-backup backup --repair` on the backup machine while the original file still exists, or restore another snapshot"
    } else {
        "restore another snapshot (`immich-backup snapshots`)"
    }
}

fn text_remedy(message: &str) -> &'static str {
    if message.contains("No space left on device") {
        " (the store's disk is full: free space there, then run again; nothing stored was lost)"
    } else {
        ""
    }
}

impl Error {
    /// The documented process exit code for this error.
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Config(_) | Error::Usage(_) => exit::USAGE,
            Error::Storage { .. } | Error::StorageObject { .. } => exit::STORAGE,
            Error::Locked(_) => exit::LOCKED,
            Error::WrongKey { .. } => exit::WRONG_KEY,
            Error::Missing { .. } | Error::Corrupt { .. } | Error::Unauthentic { .. } => {
                exit::INTEGRITY
            }
            Error::Database(_) => exit::DATABASE,
            Error::NotFresh { .. } => exit::NOT_FRESH,
            Error::Docker(_) => exit::DOCKER,
            Error::Interrupted => exit::INTERRUPTED,
            Error::Io { source, .. } if source.raw_os_error() == Some(libc::ENOSPC) => {
                exit::FAILURE
            }
            Error::Io { .. } | Error::Crypto(_) | Error::Other(_) => exit::FAILURE,
            Error::Hook(_) => exit::HOOK,
        }
    }

    /// An I/O error on a local path, with a remedy for the common cases.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}

/// Attach a local path to an `io::Result`.
pub(crate) trait IoContext<T> {
    fn at(self, path: impl Into<PathBuf>) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn at(self, path: impl Into<PathBuf>) -> Result<T> {
        self.map_err(|e| Error::io(path, e))
    }
}
