//! The restore's progress, kept in the target so that an interrupted restore can be run again.
//!
//! `<target>/.immich-backup-restore.json` names the snapshot being restored and how far its
//! database got: `replaying` while psql runs (a database left like that is half-restored and must
//! be recreated), `replayed` once the dump went in and its row counts matched the snapshot's. A
//! restore of the same snapshot that finds `replayed` (and the row counts still matching) skips the
//! database and finishes the files; files already in place and identical are kept anyway. The file
//! is removed when a restore completes; it stays while files are missing (damaged objects), so a
//! run after a repair finishes those too.

use std::ffi::OsStr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::restore::target::Target;

/// The state file's name, at the top of the target (outside the originals folders).
pub(crate) const STATE_FILE: &str = ".immich-backup-restore.json";

/// How far the database of the restore got.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DatabaseStep {
    /// psql was replaying the dump (a restore that stopped here left a half-restored database).
    Replaying,
    /// The dump is in and the row counts matched.
    Replayed,
}

/// The contents of the state file.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct State {
    pub snapshot: String,
    pub database: DatabaseStep,
    pub updated: DateTime<Utc>,
    pub tool: String,
}

/// The state an earlier restore left in `target`, if any (an unreadable one counts as none).
pub fn read(target: &Target) -> Option<State> {
    let mut f = target.root().open_file(OsStr::new(STATE_FILE)).ok()?;
    let mut text = String::new();
    std::io::Read::read_to_string(&mut f, &mut text).ok()?;
    serde_json::from_str(&text).ok()
}

/// Record that the restore of `snapshot` reached `step` (durably).
pub fn write(target: &Target, snapshot: &str, step: DatabaseStep) -> Result<()> {
    let state = State {
        snapshot: snapshot.to_string(),
        database: step,
        updated: Utc::now(),
        tool: format!("immich-backup {}", env!("CARGO_PKG_VERSION")),
    };
    let body = serde_json::to_vec_pretty(&state).expect("state serialises");
    target
        .root()
        .replace_file(OsStr::new(STATE_FILE), &body)
        .map_err(|e| target.error(STATE_FILE, e))
}

/// The restore is complete: forget its state.
pub fn remove(target: &Target) -> Result<()> {
    target
        .root()
        .remove_file(OsStr::new(STATE_FILE))
        .map_err(|e| target.error(STATE_FILE, e))
}
