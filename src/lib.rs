//! immich-backup: encrypted, incremental, offsite backups of a self-hosted Immich server.
//!
//! The folders are the layers, lowest first (docs/ARCHITECTURE.md has the map; a test,
//! tests/architecture.rs, keeps every import pointing down):
//!
//! 1. Leaves, no I/O of their own: [`error`], [`mod@format`] (object names and the snapshot types),
//!    [`immich`] (Immich's folders and tables, the dump's COPY text, container paths), [`policy`]
//!    (what to keep, when to run), [`redact`], [`host`], [`progress`].
//! 2. [`crypto`]: age sealing and opening, content addresses, snapshot signatures.
//! 3. [`config`]: every setting, checked.
//! 4. [`store`] (object_store and the local-folder fast path) and [`db`] (the database, in Docker
//!    or local): the two outside worlds; [`notify`] (ntfy, webhook, e-mail) and [`hooks`] (the
//!    user's commands around a backup).
//! 5. [`repo`]: the repository, a store plus keys. It owns every object of the format: backups,
//!    restores and maintenance read and write sealed, typed objects and never touch age or keys.
//! 6. The commands' work: [`backup`] (dump, walk, upload, consistency), [`restore`] (database,
//!    files), [`maintenance`] (forget, prune), [`verify`] (check).
//! 7. [`agent`] (scheduled runs, health endpoint) and [`demo`] (the embedded sample), over them all.
//!
//! The CLI (`cli`, in the binary) is a thin layer over this library.

pub mod agent;
pub mod backup;
pub mod browse;
pub mod config;
pub mod crypto;
pub mod db;
pub mod demo;
pub mod error;
pub mod format;
pub mod hooks;
pub mod host;
pub mod immich;
pub mod maintenance;
pub mod notify;
pub mod policy;
pub mod progress;
pub mod redact;
pub mod repo;
pub mod restore;
pub mod store;
pub mod verify;

pub use error::{Error, Result};
