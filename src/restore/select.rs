//! Immich-aware selection: which assets of a snapshot a user means by "that user's photos", "this
//! album", "taken in July" or "what is gone since", read from the snapshot's own dump.
//!
//! The dump holds the database as it was. Its COPY blocks of the user, album, album-asset and asset
//! tables (either schema generation, [`crate::immich`]) are read as the dump streams, never held:
//! only small maps are kept (users and albums: a few per family; album members only of the albums
//! asked for; assets only those selected), so memory is bounded by the selection, not by a
//! 1.5-million-asset dump. `pg_dump` writes tables by name (`album`, `album_asset`, `asset`,
//! `user`), so what depends on a later table (the owner's e-mail for `--user`, the album names of
//! the selected assets) takes another streaming pass over the dump; each pass reads what it can
//! with what earlier passes found, and the dump's SHA-256 is checked on every pass.
//!
//! Criteria combine: an asset is selected when it matches every kind given (within a kind, any of
//! the values). The capture time is Immich's `localDateTime` (the photo's wall-clock time, what
//! the timeline shows, stored as if it were UTC), `fileCreatedAt` where that is missing. Trashed
//! assets are selected like the others: after "empty trash" they are what the user wants back.
//! Each asset's `originalPath` is mapped to its snapshot path as the backup's consistency check
//! maps it ([`PathMap`]).

use std::collections::{HashMap, HashSet};
use std::io::{self, BufRead, BufReader};
use std::ops::Range;
use std::path::PathBuf;

use chrono::{DateTime, NaiveDate, Utc};
use flate2::read::GzDecoder;
use serde::Serialize;

use super::database::HashingReader;
use crate::error::{Error, Result};
use crate::format::{Manifest, Object};
use crate::immich::copy::{self, connect_target, CopyHeader};
use crate::immich::paths::PathMap;
use crate::immich::{self, column};
use crate::repo::{read_error, Reader};

/// What to select (empty vectors and `None`s select nothing by that kind).
#[derive(Debug, Clone, Default)]
pub struct Criteria {
    /// Owners' e-mail addresses (`--user`).
    pub users: Vec<String>,
    /// Album names (`--album`): every album of that name.
    pub albums: Vec<String>,
    /// Album ids (`--album-id`).
    pub album_ids: Vec<String>,
    /// Capture time from (inclusive).
    pub taken_from: Option<DateTime<Utc>>,
    /// Capture time up to (exclusive: a day given as `--taken-to` counts whole).
    pub taken_to: Option<DateTime<Utc>>,
    /// Only assets whose original is no longer on this machine (`--missing-now`).
    pub missing_now: Option<Live>,
}

impl Criteria {
    fn by_album(&self) -> bool {
        !self.albums.is_empty() || !self.album_ids.is_empty()
    }
}

/// Where the live library is on this machine: UPLOAD_LOCATION, and the host folders of the
/// snapshot's external libraries (by their snapshot folder).
#[derive(Debug, Clone)]
pub struct Live {
    pub upload_location: PathBuf,
    pub externals: Vec<(String, PathBuf)>,
}

impl Live {
    /// Where the file at snapshot path `path` lives on this machine.
    pub fn path(&self, path: &str) -> PathBuf {
        for (folder, host) in &self.externals {
            if let Some(rest) = path
                .strip_prefix(folder.as_str())
                .and_then(|r| r.strip_prefix('/'))
            {
                return host.join(rest);
            }
        }
        self.upload_location.join(path)
    }

    /// Every folder of the live library.
    pub fn roots(&self) -> impl Iterator<Item = &PathBuf> {
        std::iter::once(&self.upload_location).chain(self.externals.iter().map(|(_, h)| h))
    }
}

/// One selected asset, as the restore reports it and `restored-assets.csv` lists it.
#[derive(Debug, Clone, Serialize)]
pub struct Asset {
    pub id: String,
    /// Where Immich had the original (its container path).
    pub original_path: String,
    /// The original's path in the snapshot; `None`: outside UPLOAD_LOCATION and every backed-up
    /// external library (not in the snapshot).
    pub snapshot_path: Option<String>,
    /// The file name as uploaded.
    pub file_name: String,
    /// The capture time (`localDateTime`, RFC 3339), if readable.
    pub taken: Option<String>,
    /// The owner's e-mail (the id when the dump has no such user).
    pub owner: String,
    /// The names of the albums that hold it.
    pub albums: Vec<String>,
    /// `active`, `trashed` or `deleted` (empty for older Immich without the column).
    pub status: String,
    #[serde(skip)]
    owner_id: String,
    #[serde(skip)]
    album_ids: Vec<String>,
}

/// A `--taken-from` / `--taken-to` argument: `YYYY-MM-DD` (a whole day) or RFC 3339. Returns the
/// bound as an instant; `to` makes it exclusive (the end of the given day, or just after the time).
pub fn parse_taken(text: &str, to: bool) -> Result<DateTime<Utc>> {
    if let Ok(day) = NaiveDate::parse_from_str(text.trim(), "%Y-%m-%d") {
        let day = if to {
            day.succ_opt().unwrap_or(day)
        } else {
            day
        };
        return Ok(day.and_hms_opt(0, 0, 0).expect("midnight").and_utc());
    }
    match DateTime::parse_from_rfc3339(text.trim()) {
        Ok(t) => {
            let t = t.with_timezone(&Utc);
            Ok(if to {
                t + chrono::Duration::nanoseconds(1)
            } else {
                t
            })
        }
        Err(e) => Err(Error::Usage(format!(
            "--taken-{}: {text:?} is neither a date (YYYY-MM-DD) nor an RFC 3339 time (2024-07-14T10:00:00Z): {e}",
            if to { "to" } else { "from" }
        ))),
    }
}

/// A timestamp as `pg_dump` writes it (`2024-07-14 10:00:00+00`, `…​.123456+02:00`).
fn parse_pg_time(text: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_str(text, "%Y-%m-%d %H:%M:%S%.f%#z")
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

/// The assets of the snapshot that `criteria` select, in dump order, with their owners' e-mails
/// and album names. `media_location` is the restoring machine's `[immich] media_location`.
pub async fn select(
    reader: &Reader,
    manifest: &Manifest,
    criteria: &Criteria,
    media_location: &str,
) -> Result<Vec<Asset>> {
    let externals = manifest
        .external_libraries
        .iter()
        .map(|l| l.container_path.as_str());
    let mut state = Selecting::new(criteria.clone(), PathMap::new(media_location, externals));
    for _ in 0..4 {
        if state.done() {
            break;
        }
        state.start_pass();
        state = pass(reader, manifest, state).await?;
        state.end_pass(&manifest.id)?;
    }
    state.finish(&manifest.id)
}

/// Which block is being read, with the positions of the columns it needs.
#[derive(Clone, Copy)]
enum Block {
    Users {
        id: usize,
        email: usize,
    },
    Albums {
        id: usize,
        name: usize,
    },
    /// Album members: `members` collects the assets of the wanted albums, else the album ids of
    /// the selected assets are recorded.
    AlbumAssets {
        album: usize,
        asset: usize,
        members: bool,
    },
    Assets(AssetColumns),
}

#[derive(Clone, Copy)]
struct AssetColumns {
    id: usize,
    owner: usize,
    path: usize,
    name: Option<usize>,
    local: Option<usize>,
    created: Option<usize>,
    status: Option<usize>,
}

impl AssetColumns {
    /// The columns in the order [`Selecting::asset`] takes a row's fields.
    fn in_row_order(self) -> [Option<usize>; 7] {
        [
            Some(self.id),
            Some(self.owner),
            Some(self.path),
            self.name,
            self.local,
            self.created,
            self.status,
        ]
    }
}

impl Block {
    fn last(&self) -> usize {
        match *self {
            Block::Users { id, email } => id.max(email),
            Block::Albums { id, name } => id.max(name),
            Block::AlbumAssets { album, asset, .. } => album.max(asset),
            Block::Assets(c) => c.in_row_order().into_iter().flatten().max().unwrap_or(0),
        }
    }
}

/// What one step needs before it can read its table, and whether it has.
#[derive(Default, Clone, Copy)]
struct Step {
    done: bool,
    /// Its prerequisites were there when the pass began: if its table does not come, it is absent.
    ready: bool,
}

/// The selection as it is being read, pass after pass.
struct Selecting {
    criteria: Criteria,
    map: PathMap,
    /// id → e-mail.
    users: HashMap<String, String>,
    users_step: Step,
    /// id → name.
    albums: HashMap<String, String>,
    albums_step: Step,
    /// The asset ids of the albums asked for.
    members: HashSet<String>,
    members_step: Step,
    assets: Vec<Asset>,
    by_id: HashMap<String, usize>,
    assets_step: Step,
    names_step: Step,
    /// Whether an asset table was seen at all.
    asset_table: bool,
    block: Option<Block>,
    fields: Vec<Range<usize>>,
    mapped: String,
}

impl Selecting {
    fn new(criteria: Criteria, map: PathMap) -> Selecting {
        Selecting {
            criteria,
            map,
            users: HashMap::new(),
            users_step: Step::default(),
            albums: HashMap::new(),
            albums_step: Step::default(),
            members: HashSet::new(),
            members_step: Step::default(),
            assets: Vec::new(),
            by_id: HashMap::new(),
            assets_step: Step::default(),
            names_step: Step::default(),
            asset_table: false,
            block: None,
            fields: Vec::new(),
            mapped: String::new(),
        }
    }

    fn done(&self) -> bool {
        self.users_step.done
            && self.albums_step.done
            && self.members_done()
            && self.assets_step.done
            && self.names_step.done
    }

    fn members_done(&self) -> bool {
        !self.criteria.by_album() || self.members_step.done
    }

    /// Album members can be read once the wanted albums' ids are known.
    fn members_can(&self) -> bool {
        self.criteria.albums.is_empty() || self.albums_step.done
    }

    /// Assets can be read once the owners asked for and the albums' members are known.
    fn assets_can(&self) -> bool {
        (self.criteria.users.is_empty() || self.users_step.done) && self.members_done()
    }

    fn start_pass(&mut self) {
        self.users_step.ready = !self.users_step.done;
        self.albums_step.ready = !self.albums_step.done;
        self.members_step.ready = !self.members_done() && self.members_can();
        self.assets_step.ready = !self.assets_step.done && self.assets_can();
        self.names_step.ready = !self.names_step.done && self.assets_step.done;
    }

    /// After a pass: a step that could have read its table and did not finds it absent.
    fn end_pass(&mut self, snapshot: &str) -> Result<()> {
        if self.assets_step.ready && !self.assets_step.done {
            return Err(Error::Usage(format!(
                "snapshot {snapshot}'s dump holds no Immich asset table (public.asset or public.assets with \"originalPath\"), so nothing can be selected by user, album, date or --missing-now; select files with --include instead"
            )));
        }
        for step in [
            &mut self.users_step,
            &mut self.albums_step,
            &mut self.members_step,
            &mut self.names_step,
        ] {
            if step.ready {
                step.done = true;
            }
        }
        Ok(())
    }

    fn finish(mut self, snapshot: &str) -> Result<Vec<Asset>> {
        if !self.done() {
            return Err(Error::Other(format!(
                "snapshot {snapshot}'s dump did not give the selection after 4 passes"
            )));
        }
        for email in &self.criteria.users {
            if !self.users.values().any(|e| e == email) {
                let known: Vec<&str> = self.users.values().map(String::as_str).collect();
                return Err(Error::Usage(format!(
                    "--user {email}: snapshot {snapshot} has no user with that e-mail (it has: {})",
                    known.join(", ")
                )));
            }
        }
        for name in &self.criteria.albums {
            if !self.albums.values().any(|n| n == name) {
                return Err(Error::Usage(format!(
                    "--album {name:?}: snapshot {snapshot} has no album of that name (album names are matched exactly, case included)"
                )));
            }
        }
        for id in &self.criteria.album_ids {
            if !self.albums.contains_key(id) {
                return Err(Error::Usage(format!(
                    "--album-id {id}: snapshot {snapshot} has no album with that id"
                )));
            }
        }
        for a in &mut self.assets {
            if let Some(email) = self.users.get(&a.owner_id) {
                a.owner = email.clone();
            }
            let mut names: Vec<String> = a
                .album_ids
                .iter()
                .filter_map(|id| self.albums.get(id).cloned())
                .collect();
            names.sort();
            a.albums = names;
        }
        Ok(self.assets)
    }

    /// A COPY block of the Immich database starts: whether its rows are read in this pass.
    fn begin(&mut self, h: &CopyHeader) {
        let table = h.table.as_str();
        let first = |names: [&str; 2]| names.iter().find_map(|n| h.column(n));
        self.block = if immich::USER_TABLES.contains(&table) && self.users_step.ready {
            h.column(column::ID)
                .zip(h.column(column::EMAIL))
                .map(|(id, email)| Block::Users { id, email })
        } else if immich::ALBUM_TABLES.contains(&table) && self.albums_step.ready {
            h.column(column::ID)
                .zip(h.column(column::ALBUM_NAME))
                .map(|(id, name)| Block::Albums { id, name })
        } else if immich::ALBUM_ASSET_TABLES.contains(&table) {
            let members = !self.members_done() && self.members_can();
            let names = self.names_step.ready;
            if members || names {
                first(column::ALBUM_ID)
                    .zip(first(column::ASSET_ID))
                    .map(|(album, asset)| Block::AlbumAssets {
                        album,
                        asset,
                        members,
                    })
            } else {
                None
            }
        } else if immich::ASSET_TABLES.contains(&table) {
            let columns = self.asset_columns(h);
            self.asset_table |= columns.is_some();
            columns.filter(|_| !self.assets_step.done && self.assets_can())
        } else {
            None
        };
        if let Some(Block::AlbumAssets { members: true, .. }) = self.block {
            self.members = HashSet::new();
        }
    }

    fn asset_columns(&self, h: &CopyHeader) -> Option<Block> {
        Some(Block::Assets(AssetColumns {
            id: h.column(column::ID)?,
            owner: h.column(column::OWNER_ID)?,
            path: h.column(column::ORIGINAL_PATH)?,
            name: h.column(column::ORIGINAL_FILE_NAME),
            local: h.column(column::LOCAL_DATE_TIME),
            created: h.column(column::FILE_CREATED_AT),
            status: h.column(column::STATUS),
        }))
    }

    /// The block ended: the step it served is done.
    fn end(&mut self) {
        match self.block.take() {
            Some(Block::Users { .. }) => self.users_step.done = true,
            Some(Block::Albums { .. }) => self.albums_step.done = true,
            Some(Block::AlbumAssets { members, .. }) => {
                if members {
                    self.members_step.done = true;
                } else {
                    self.names_step.done = true;
                }
            }
            Some(Block::Assets(_)) => self.assets_step.done = true,
            None => {}
        }
    }

    /// One row of the current block.
    fn row(&mut self, line: &[u8]) {
        let Some(block) = self.block else {
            return;
        };
        let mut fields = std::mem::take(&mut self.fields);
        copy::fields(line, false, block.last(), &mut fields);
        let text = |i: usize| {
            fields
                .get(i)
                .and_then(|r| copy::text_field(&line[r.clone()]))
        };
        match block {
            Block::Users { id, email } => {
                if let (Some(id), Some(email)) = (text(id), text(email)) {
                    self.users.insert(id.into_owned(), email.into_owned());
                }
            }
            Block::Albums { id, name } => {
                if let (Some(id), Some(name)) = (text(id), text(name)) {
                    self.albums.insert(id.into_owned(), name.into_owned());
                }
            }
            Block::AlbumAssets {
                album,
                asset,
                members,
            } => {
                if let (Some(album), Some(asset)) = (text(album), text(asset)) {
                    if members && self.wanted_album(&album) {
                        self.members.insert(asset.to_string());
                    }
                    if self.names_step.ready && !self.names_step.done {
                        if let Some(&i) = self.by_id.get(asset.as_ref()) {
                            self.assets[i].album_ids.push(album.into_owned());
                        }
                    }
                }
            }
            Block::Assets(c) => {
                let row: Vec<Option<String>> = c
                    .in_row_order()
                    .into_iter()
                    .map(|i| i.and_then(&text).map(|t| t.into_owned()))
                    .collect();
                self.asset(row);
            }
        }
        self.fields = fields;
    }

    fn wanted_album(&self, id: &str) -> bool {
        self.criteria.album_ids.iter().any(|a| a == id)
            || self
                .albums
                .get(id)
                .is_some_and(|name| self.criteria.albums.iter().any(|n| n == name))
    }

    /// One asset row (id, owner, path, name, localDateTime, fileCreatedAt, status): kept when it
    /// matches every criterion.
    fn asset(&mut self, row: Vec<Option<String>>) {
        let mut row = row.into_iter();
        let mut next = || row.next().flatten();
        let (Some(id), Some(owner), Some(path)) = (next(), next(), next()) else {
            return;
        };
        let (name, local, created, status) = (next(), next(), next(), next());
        let c = &self.criteria;
        if !c.users.is_empty()
            && !self
                .users
                .get(&owner)
                .is_some_and(|e| c.users.iter().any(|u| u == e))
        {
            return;
        }
        if c.by_album() && !self.members.contains(&id) {
            return;
        }
        let taken = local
            .as_deref()
            .and_then(parse_pg_time)
            .or_else(|| created.as_deref().and_then(parse_pg_time));
        if c.taken_from.is_some() || c.taken_to.is_some() {
            let Some(t) = taken else {
                return;
            };
            if c.taken_from.is_some_and(|f| t < f) || c.taken_to.is_some_and(|to| t >= to) {
                return;
            }
        }
        let snapshot_path = self
            .map
            .map_into(&path, &mut self.mapped)
            .then(|| self.mapped.clone());
        if let Some(live) = &c.missing_now {
            // Only what the snapshot holds and this machine no longer has.
            let Some(p) = &snapshot_path else {
                return;
            };
            if std::fs::symlink_metadata(live.path(p)).is_ok() {
                return;
            }
        }
        let file_name = name.unwrap_or_else(|| path.rsplit('/').next().unwrap_or("").to_string());
        self.by_id.insert(id.clone(), self.assets.len());
        self.assets.push(Asset {
            id,
            original_path: path,
            snapshot_path,
            file_name,
            taken: taken.map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)),
            owner: owner.clone(),
            albums: Vec::new(),
            status: status.unwrap_or_default(),
            owner_id: owner,
            album_ids: Vec::new(),
        });
    }
}

/// One streaming pass over the dump (decrypted, gunzipped, its SHA-256 checked), feeding the
/// Immich database's COPY blocks to `state`.
async fn pass(reader: &Reader, manifest: &Manifest, state: Selecting) -> Result<Selecting> {
    let dump = reader
        .fetch(&Object::Dump(manifest.id.clone()), &manifest.dump)
        .await?;
    let want = manifest.dump.clone();
    let database = manifest.database.database.clone();
    tokio::task::spawn_blocking(move || {
        let mut state = state;
        let mut hashed = HashingReader::new(dump.open()?);
        read_blocks(
            GzDecoder::new(&mut hashed),
            &database,
            &want.key,
            &mut state,
        )?;
        hashed.drain_and_check(&want, "")?;
        Ok(state)
    })
    .await
    .map_err(|e| Error::Other(format!("dump reader: {e}")))?
}

/// Hand the COPY blocks of `database` in the SQL `sql` to `state`, line by line.
fn read_blocks(sql: impl io::Read, database: &str, key: &str, state: &mut Selecting) -> Result<()> {
    let mut sql = BufReader::with_capacity(256 * 1024, sql);
    let mut line = Vec::new();
    let mut current: Option<String> = None;
    let mut copying = false;
    loop {
        line.clear();
        let n = sql
            .read_until(b'\n', &mut line)
            .map_err(|e| read_error(key, e))?;
        if n == 0 {
            break;
        }
        if line.last() == Some(&b'\n') {
            line.pop();
        }
        if copying {
            if line == b"\\." {
                copying = false;
                state.end();
            } else {
                state.row(&line);
            }
            continue;
        }
        let Ok(text) = std::str::from_utf8(&line) else {
            continue;
        };
        if let Some(rest) = text.strip_prefix("\\connect ") {
            current = Some(connect_target(rest));
        } else if let Some(header) = copy::parse_header(text) {
            copying = true;
            state.block = None;
            if current.as_deref() == Some(database) {
                state.begin(&header);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const DUMP: &str = "\\connect postgres\nCOPY public.asset (id) FROM stdin;\nx\n\\.\n\
\\connect -reuse-previous=on \"dbname='immich'\"\n\
COPY public.album (id, \"ownerId\", \"albumName\") FROM stdin;\n\
al1\tu1\tFamily\nal2\tu2\tFamily\nal3\tu1\tÉté ☀️\n\\.\n\
COPY public.album_asset (\"albumId\", \"assetId\") FROM stdin;\n\
al1\ta1\nal2\ta2\nal3\ta1\nal3\ta3\n\\.\n\
COPY public.asset (id, \"ownerId\", \"originalPath\", \"originalFileName\", \"fileCreatedAt\", \"localDateTime\", status) FROM stdin;\n\
a1\tu1\t/data/library/admin/2024/IMG_1.jpg\tIMG_1.jpg\t2024-07-14 08:00:00+00\t2024-07-14 10:00:00+00\tactive\n\
a2\tu2\t/data/upload/u2/ab/cd/x.mp4\tx.mp4\t2024-06-30 23:30:00+00\t2024-07-01 01:30:00+02\ttrashed\n\
a3\tu2\t/data/library/zoe/caf\\303\\251 \\\\ 1.jpg\tcafé.jpg\t2023-01-01 00:00:00+00\t2023-01-01 00:00:00+00\tactive\n\
a4\tu1\t/mnt/ext/a.jpg\ta.jpg\t2024-07-31 23:59:59.5+00\t2024-07-31 23:59:59.5+00\tactive\n\\.\n\
COPY public.\"user\" (id, email, name) FROM stdin;\nu1\tadmin@example.com\tA\nu2\tzoe@example.com\tZ\n\\.\n";

    /// Run the passes over `DUMP` without a store.
    fn run(criteria: Criteria) -> Result<Vec<Asset>> {
        run_over(DUMP, criteria)
    }

    fn run_over(dump: &str, criteria: Criteria) -> Result<Vec<Asset>> {
        let mut state = Selecting::new(criteria, PathMap::default());
        for _ in 0..4 {
            if state.done() {
                break;
            }
            state.start_pass();
            read_blocks(dump.as_bytes(), "immich", "dump", &mut state)?;
            state.end_pass("s1")?;
        }
        state.finish("s1")
    }

    fn ids(assets: &[Asset]) -> Vec<&str> {
        assets.iter().map(|a| a.id.as_str()).collect()
    }

    #[test]
    fn criteria_combine_and_albums_and_owners_are_named() {
        let all = run(Criteria::default()).unwrap();
        assert_eq!(ids(&all), ["a1", "a2", "a3", "a4"]);
        assert_eq!(all[0].albums, ["Family", "Été ☀️"]);
        assert_eq!(all[0].owner, "admin@example.com");
        assert_eq!(
            all[2].snapshot_path.as_deref(),
            Some("library/zoe/café \\ 1.jpg")
        );
        assert_eq!(all[3].snapshot_path, None);
        assert_eq!(all[1].status, "trashed");
        let family = Criteria {
            albums: vec!["Family".into()],
            ..Default::default()
        };
        assert_eq!(ids(&run(family).unwrap()), ["a1", "a2"]);
        let zoe = Criteria {
            users: vec!["zoe@example.com".into()],
            ..Default::default()
        };
        assert_eq!(ids(&run(zoe).unwrap()), ["a2", "a3"]);
        let july = Criteria {
            taken_from: Some(parse_taken("2024-07-01", false).unwrap()),
            taken_to: Some(parse_taken("2024-07-31", true).unwrap()),
            ..Default::default()
        };
        // a2's localDateTime is 2024-06-30 23:30 UTC: outside, read with its offset.
        assert_eq!(ids(&run(july.clone()).unwrap()), ["a1", "a4"]);
        let both = Criteria {
            album_ids: vec!["al3".into()],
            ..july
        };
        assert_eq!(ids(&run(both).unwrap()), ["a1"]);
    }

    /// Immich before its 2025 renames: `users`, `albums`, `albums_assets_assets` (`albumsId`,
    /// `assetsId`), `assets` without `status`, and the older media path.
    #[test]
    fn the_older_schema_generation_is_read_too() {
        let dump = "\\connect immich\n\
COPY public.albums (id, \"albumName\") FROM stdin;\nal1\tFamily\n\\.\n\
COPY public.albums_assets_assets (\"albumsId\", \"assetsId\") FROM stdin;\nal1\ta2\n\\.\n\
COPY public.assets (id, \"ownerId\", \"originalPath\", \"fileCreatedAt\", \"localDateTime\") FROM stdin;\n\
a1\tu1\t/usr/src/app/upload/library/admin/a.jpg\t2022-01-01 00:00:00+00\t2022-01-01 00:00:00+00\n\
a2\tu2\tupload/upload/u2/b.jpg\t2022-02-01 00:00:00+00\t\\N\n\\.\n\
COPY public.users (id, email) FROM stdin;\nu1\ta@example.com\nu2\tb@example.com\n\\.\n";
        let c = Criteria {
            users: vec!["b@example.com".into()],
            albums: vec!["Family".into()],
            taken_from: Some(parse_taken("2022-02-01", false).unwrap()),
            ..Default::default()
        };
        let got = run_over(dump, c).unwrap();
        assert_eq!(ids(&got), ["a2"]);
        // No localDateTime: fileCreatedAt; no originalFileName: the path's last name.
        assert_eq!(got[0].taken.as_deref(), Some("2022-02-01T00:00:00Z"));
        assert_eq!(got[0].file_name, "b.jpg");
        assert_eq!(got[0].snapshot_path.as_deref(), Some("upload/u2/b.jpg"));
        assert_eq!(got[0].albums, ["Family"]);
        assert_eq!(got[0].owner, "b@example.com");
        let all = run_over(dump, Criteria::default()).unwrap();
        assert_eq!(all[0].snapshot_path.as_deref(), Some("library/admin/a.jpg"));
    }

    #[test]
    fn unknown_names_are_usage_errors() {
        let c = Criteria {
            users: vec!["nobody@example.com".into()],
            ..Default::default()
        };
        let e = run(c).unwrap_err();
        assert!(matches!(e, Error::Usage(_)), "{e}");
        assert!(e.to_string().contains("admin@example.com"), "{e}");
        let c = Criteria {
            albums: vec!["family".into()],
            ..Default::default()
        };
        assert!(matches!(run(c).unwrap_err(), Error::Usage(_)));
        assert!(parse_taken("14/07/2024", false).is_err());
        assert_eq!(
            parse_taken("2024-07-14T10:00:00+02:00", false).unwrap(),
            parse_taken("2024-07-14T08:00:00Z", false).unwrap()
        );
    }

    #[test]
    fn missing_now_keeps_only_what_is_gone() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("library/admin/2024/IMG_1.jpg");
        std::fs::create_dir_all(f.parent().unwrap()).unwrap();
        std::fs::write(&f, b"x").unwrap();
        let c = Criteria {
            missing_now: Some(Live {
                upload_location: dir.path().to_path_buf(),
                externals: Vec::new(),
            }),
            ..Default::default()
        };
        // a1 is there, a4 is outside the snapshot: a2 and a3 are missing.
        assert_eq!(ids(&run(c).unwrap()), ["a2", "a3"]);
    }

    /// A generated dump of 1.5 million assets (each in an album), streamed and never held: the
    /// selection of one album (1 asset in 1000) must not grow memory with the dump. A measurement
    /// (`cargo test --release -- --ignored dump_of_a_million`), not run by default.
    #[test]
    #[ignore]
    fn dump_of_a_million_and_a_half_assets_in_bounded_memory() {
        const N: usize = 1_500_000;
        struct Gen {
            n: usize,
            stage: u8,
            buf: Vec<u8>,
            at: usize,
        }
        impl io::Read for Gen {
            fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
                while self.at == self.buf.len() {
                    self.buf.clear();
                    self.at = 0;
                    use std::io::Write;
                    let b = &mut self.buf;
                    match (self.stage, self.n) {
                        (0, _) => {
                            b.extend_from_slice(b"\\connect immich\nCOPY public.album (id, \"albumName\") FROM stdin;\n");
                            for k in 0..1000 {
                                writeln!(b, "al{k}\tAlbum {k}").unwrap();
                            }
                            b.extend_from_slice(b"\\.\nCOPY public.album_asset (\"albumId\", \"assetId\") FROM stdin;\n");
                            self.stage = 1;
                        }
                        (1, n) if n < N => {
                            writeln!(b, "al{}\ta{n}", n % 1000).unwrap();
                            self.n += 1;
                        }
                        (1, _) => {
                            b.extend_from_slice(b"\\.\nCOPY public.asset (id, \"ownerId\", \"originalPath\", \"localDateTime\") FROM stdin;\n");
                            self.stage = 2;
                            self.n = 0;
                        }
                        (2, n) if n < N => {
                            writeln!(b, "a{n}\tu1\t/data/library/admin/{}/IMG_{n:07}.jpg\t2024-07-14 10:00:00+00", 2000 + n % 25).unwrap();
                            self.n += 1;
                        }
                        (2, _) => {
                            b.extend_from_slice(b"\\.\nCOPY public.\"user\" (id, email) FROM stdin;\nu1\tadmin@example.com\n\\.\n");
                            self.stage = 3;
                        }
                        _ => return Ok(0),
                    }
                }
                let n = out.len().min(self.buf.len() - self.at);
                out[..n].copy_from_slice(&self.buf[self.at..self.at + n]);
                self.at += n;
                Ok(n)
            }
        }
        let rss = || {
            let mut u: libc::rusage = unsafe { std::mem::zeroed() };
            unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
            u.ru_maxrss
        };
        let before = rss();
        let started = std::time::Instant::now();
        let criteria = Criteria {
            albums: vec!["Album 7".into()],
            ..Default::default()
        };
        let mut state = Selecting::new(criteria, PathMap::default());
        let mut passes = 0;
        while !state.done() {
            passes += 1;
            let generated = Gen {
                n: 0,
                stage: 0,
                buf: Vec::new(),
                at: 0,
            };
            state.start_pass();
            read_blocks(generated, "immich", "dump", &mut state).unwrap();
            state.end_pass("s").unwrap();
        }
        let assets = state.finish("s").unwrap();
        assert_eq!(assets.len(), N / 1000);
        assert!(assets.iter().all(|a| a.albums == ["Album 7"]));
        let grown_kib = rss() - before;
        eprintln!(
            "{N} assets, {passes} passes, {:.1}s: {} selected, peak RSS {before} KiB before, grew by {grown_kib} KiB",
            started.elapsed().as_secs_f64(),
            assets.len()
        );
        assert!(grown_kib < 64 * 1024, "{grown_kib} KiB");
    }
}
