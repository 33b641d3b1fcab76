//! Immich's consistency, checked at every backup: every original and sidecar the database names is
//! in the snapshot's file list, files under `library/` and `upload/` that no asset names are
//! counted (orphans), and assets outside UPLOAD_LOCATION (external libraries not backed up) are
//! reported with the libraries' import paths.
//!
//! Two sides meet at the end of the backup. [`DbPaths`] is fed the asset, asset-file and library
//! rows of the dump's COPY blocks as the dump streams (`dump.rs`'s row counter hands them over) and
//! maps each container path to a snapshot path ([`PathMap`]); [`FilePaths`] is fed the file list's
//! entries as the walk produces them. [`compare`] then gives the [`Consistency`] the summary and
//! the manifest record.
//!
//! Memory stays bounded by a small constant per asset and per file: both sides keep their paths in
//! a [`PathList`] (front-coded: each path stores only what differs from the one before, a dozen
//! bytes or so for Immich's paths, which come in folder order), and the comparison holds one
//! sorted vector of 8-byte path hashes at a time. A 1.5-million-asset library with as many files
//! costs a few tens of MiB for the few seconds of the comparison. Only the first [`EXAMPLES`]
//! paths of each kind are kept as strings.
//!
//! (With 8-byte hashes, a missing file passes for present only if its hash equals one of the
//! snapshot's: for a million files, a chance of one in 10^13 per missing file.)

use std::hash::{DefaultHasher, Hash, Hasher};
use std::ops::{ControlFlow, Range};

use crate::format::{Consistency, Entry, EntryKind, Verdict};
use crate::immich::copy::{self, CopyHeader};
use crate::immich::exclude::Excludes;
use crate::immich::paths::PathMap;
use crate::immich::{self, column};

/// Example paths kept of each kind (missing, orphans, external).
pub(crate) const EXAMPLES: usize = 20;

/// Paths in the order they came, front-coded: a tag byte, the length of the prefix shared with the
/// previous path, and the rest.
#[derive(Default)]
pub(crate) struct PathList {
    bytes: Vec<u8>,
    last: String,
    len: u64,
}

impl PathList {
    fn push(&mut self, tag: u8, path: &str) {
        let mut shared = self
            .last
            .bytes()
            .zip(path.bytes())
            .take_while(|(a, b)| a == b)
            .count();
        while !path.is_char_boundary(shared) {
            shared -= 1;
        }
        let rest = &path.as_bytes()[shared..];
        self.bytes.push(tag);
        put_varint(&mut self.bytes, shared as u64);
        put_varint(&mut self.bytes, rest.len() as u64);
        self.bytes.extend_from_slice(rest);
        self.last.truncate(shared);
        self.last.push_str(&path[shared..]);
        self.len += 1;
    }

    /// Every path with its tag, in order, while `f` says to go on.
    fn for_each(&self, mut f: impl FnMut(u8, &str) -> ControlFlow<()>) {
        let mut path = String::new();
        let mut at = 0;
        while at < self.bytes.len() {
            let tag = self.bytes[at];
            at += 1;
            let shared = get_varint(&self.bytes, &mut at) as usize;
            let n = get_varint(&self.bytes, &mut at) as usize;
            path.truncate(shared);
            path.push_str(std::str::from_utf8(&self.bytes[at..at + n]).expect("pushed as str"));
            at += n;
            if f(tag, &path).is_break() {
                return;
            }
        }
    }

    /// Bytes held.
    fn size(&self) -> usize {
        self.bytes.capacity() + self.last.capacity()
    }
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn get_varint(bytes: &[u8], at: &mut usize) -> u64 {
    let mut v = 0u64;
    let mut shift = 0;
    loop {
        let b = bytes[*at];
        *at += 1;
        v |= u64::from(b & 0x7f) << shift;
        if b < 0x80 {
            return v;
        }
        shift += 7;
    }
}

/// A path's hash, with its lowest bit clear (for a tag).
fn hash(path: &str) -> u64 {
    let mut h = DefaultHasher::new();
    path.hash(&mut h);
    h.finish() & !1
}

/// Tags of the expected paths.
const ORIGINAL: u8 = 0;
const SIDECAR: u8 = 1;

/// How the rows of the COPY block being read are read.
enum Plan {
    Asset {
        path: usize,
        sidecar: Option<usize>,
        status: Option<usize>,
        offline: Option<usize>,
    },
    AssetFile {
        kind: usize,
        path: usize,
    },
    Library {
        import_paths: usize,
    },
}

impl Plan {
    /// The last field a row's reading needs.
    fn last(&self) -> usize {
        match *self {
            Plan::Asset {
                path,
                sidecar,
                status,
                offline,
            } => [Some(path), sidecar, status, offline]
                .into_iter()
                .flatten()
                .max()
                .unwrap_or(path),
            Plan::AssetFile { kind, path } => kind.max(path),
            Plan::Library { import_paths } => import_paths,
        }
    }

    /// The plan for `header`'s table, if it is one of those that name files.
    fn of(header: &CopyHeader) -> Option<Plan> {
        let table = header.table.as_str();
        if immich::ASSET_TABLES.contains(&table) {
            return Some(Plan::Asset {
                path: header.column(column::ORIGINAL_PATH)?,
                sidecar: header.column(column::SIDECAR_PATH),
                status: header.column(column::STATUS),
                offline: header.column(column::IS_OFFLINE),
            });
        }
        if table == immich::ASSET_FILE_TABLE {
            return Some(Plan::AssetFile {
                kind: header.column(column::TYPE)?,
                path: header.column(column::PATH)?,
            });
        }
        if immich::LIBRARY_TABLES.contains(&table) {
            return Some(Plan::Library {
                import_paths: header.column(column::IMPORT_PATHS)?,
            });
        }
        None
    }
}

/// The database's side: every file the dump's asset rows name, as snapshot paths.
pub(crate) struct DbPaths {
    map: PathMap,
    plan: Option<Plan>,
    expected: PathList,
    /// An asset table with an `originalPath` column was read.
    asset_table: bool,
    assets: u64,
    sidecars: u64,
    ignored: u64,
    unreadable: u64,
    external: u64,
    external_examples: Vec<String>,
    import_paths: Vec<String>,
    /// Reused for each row: where its fields are, and a mapped path.
    fields: Vec<Range<usize>>,
    mapped: String,
}

impl DbPaths {
    pub fn new(map: PathMap) -> DbPaths {
        DbPaths {
            map,
            plan: None,
            expected: PathList::default(),
            asset_table: false,
            assets: 0,
            sidecars: 0,
            ignored: 0,
            unreadable: 0,
            external: 0,
            external_examples: Vec::new(),
            import_paths: Vec::new(),
            fields: Vec::new(),
            mapped: String::new(),
        }
    }

    /// A COPY block of the Immich database starts: whether its rows are wanted.
    pub fn begin(&mut self, header: &CopyHeader) -> bool {
        self.plan = Plan::of(header);
        self.asset_table |= matches!(self.plan, Some(Plan::Asset { .. }));
        self.plan.is_some()
    }

    /// The block ended.
    pub fn end(&mut self) {
        self.plan = None;
    }

    /// One row of the block (without its newline); `truncated` when only its beginning was kept.
    pub fn row(&mut self, line: &[u8], truncated: bool) {
        let Some(plan) = &self.plan else {
            return;
        };
        let mut fields = std::mem::take(&mut self.fields);
        copy::fields(line, truncated, plan.last(), &mut fields);
        let get = |i: usize| fields.get(i).map(|r| &line[r.clone()]);
        self.read(get);
        self.fields = fields;
    }

    /// Read one row of the current block, whose field `i` is `get(i)`.
    fn read<'r>(&mut self, get: impl Fn(usize) -> Option<&'r [u8]> + Copy) {
        match self.plan {
            Some(Plan::Asset {
                path,
                sidecar,
                status,
                offline,
            }) => {
                let Some(original) = get(path) else {
                    self.unreadable += 1;
                    return;
                };
                let deleted = status.and_then(get) == Some(b"deleted".as_slice());
                let is_offline = offline.and_then(get) == Some(b"t".as_slice());
                if deleted || is_offline {
                    self.ignored += 1;
                    return;
                }
                self.assets += 1;
                self.expect(ORIGINAL, original);
                if let Some(raw) = sidecar.and_then(get).filter(|r| !r.is_empty()) {
                    self.sidecar(raw);
                }
            }
            Some(Plan::AssetFile { kind, path }) if get(kind) == Some(b"sidecar".as_slice()) => {
                match get(path) {
                    Some(raw) => self.sidecar(raw),
                    None => self.unreadable += 1,
                }
            }
            Some(Plan::Library { import_paths }) => {
                if let Some(text) = get(import_paths).and_then(copy::text_field) {
                    self.import_paths.extend(copy::parse_text_array(&text));
                }
            }
            Some(Plan::AssetFile { .. }) | None => {}
        }
    }

    fn sidecar(&mut self, raw: &[u8]) {
        if raw != b"\\N" {
            self.sidecars += 1;
            self.expect(SIDECAR, raw);
        }
    }

    /// A file the database names (raw COPY field): expected in the snapshot, or outside it.
    fn expect(&mut self, tag: u8, raw: &[u8]) {
        let Some(path) = copy::text_field(raw) else {
            return;
        };
        if self.map.map_into(&path, &mut self.mapped) {
            self.expected.push(tag, &self.mapped);
        } else {
            self.external += 1;
            if self.external_examples.len() < EXAMPLES {
                self.external_examples.push(path.into_owned());
            }
        }
    }
}

/// The snapshot's side: the path of every file and symlink of the file list, in walk order.
#[derive(Default)]
pub(crate) struct FilePaths {
    list: PathList,
}

/// Tags of the snapshot's paths.
const PRESENT: u8 = 0;
const ASSET_FOLDER_FILE: u8 = 1;

impl FilePaths {
    /// The next entry of the file list.
    pub fn push(&mut self, entry: &Entry) {
        let tag = match entry.kind {
            EntryKind::Dir => return,
            EntryKind::File if is_orphan_candidate(&entry.path) => ASSET_FOLDER_FILE,
            _ => PRESENT,
        };
        self.list.push(tag, &entry.path);
    }
}

/// A file under `library/` or `upload/` other than Immich's marker: an asset should name it.
fn is_orphan_candidate(path: &str) -> bool {
    match path.split_once('/') {
        Some((top, rest)) => immich::ASSET_FOLDERS.contains(&top) && rest != immich::MARKER_FILE,
        None => false,
    }
}

/// Compare both sides. `None` for `db` means the dump never reached the Immich database.
pub(crate) fn compare(db: Option<DbPaths>, files: &FilePaths, excludes: &Excludes) -> Consistency {
    let Some(db) = db.filter(|d| d.asset_table) else {
        return Consistency {
            note: Some("the dump of the Immich database holds no asset table with an \"originalPath\" column: is [database] database Immich's?".into()),
            ..Consistency::default()
        };
    };
    tracing::debug!(
        expected_bytes = db.expected.size(),
        file_bytes = files.list.size(),
        "comparing the database's paths with the snapshot's"
    );
    let mut c = Consistency {
        assets: db.assets,
        sidecars: db.sidecars,
        ignored_assets: db.ignored,
        unreadable_rows: db.unreadable,
        external_assets: db.external,
        external_examples: db.external_examples,
        external_import_paths: dedup(db.import_paths),
        ..Consistency::default()
    };
    let expected = missing(&db.expected, &files.list, excludes, &mut c);
    orphans(&files.list, &expected, &mut c);
    c.verdict = if c.missing() > 0 || c.excluded > 0 {
        Verdict::Missing
    } else if c.external_assets > 0 {
        Verdict::External
    } else {
        Verdict::Ok
    };
    c
}

/// Count the expected paths the snapshot lacks, and name the first (those `excludes` left out
/// apart); returns the expected paths' hashes (a sidecar's with its lowest bit set), sorted.
fn missing(
    expected: &PathList,
    files: &PathList,
    excludes: &Excludes,
    c: &mut Consistency,
) -> Vec<u64> {
    let present = sorted_hashes(files, |_| Some(0));
    let sidecar = |tag| u64::from(tag == SIDECAR);
    let hashes = sorted_hashes(expected, |tag| Some(sidecar(tag)));
    let gone = absent(&hashes, &present);
    drop(present);
    c.missing_sidecars = gone.iter().filter(|h| *h & 1 == 1).count() as u64;
    c.missing_originals = gone.len() as u64 - c.missing_sidecars;
    if !gone.is_empty() {
        // With excludes, every lacking path is looked at (to tell excluded from missing).
        let (mut originals, mut sidecars) = (0u64, 0u64);
        expected.for_each(|tag, path| {
            if gone.binary_search(&(hash(path) | sidecar(tag))).is_ok() {
                if excludes.covers(path) {
                    *if tag == SIDECAR {
                        &mut sidecars
                    } else {
                        &mut originals
                    } += 1;
                    if c.excluded_examples.len() < EXAMPLES {
                        c.excluded_examples.push(path.to_string());
                    }
                } else if c.missing_examples.len() < EXAMPLES {
                    c.missing_examples.push(path.to_string());
                }
            }
            match excludes.is_empty() {
                true => go_on(c.missing_examples.len()),
                false => ControlFlow::Continue(()),
            }
        });
        c.excluded = originals + sidecars;
        c.missing_originals -= originals;
        c.missing_sidecars -= sidecars;
    }
    hashes
}

/// Count the files under the asset folders that no expected path names (`expected`: their
/// hashes, sorted), and name the first.
fn orphans(files: &PathList, expected: &[u64], c: &mut Consistency) {
    let candidate = |tag| (tag == ASSET_FOLDER_FILE).then_some(0);
    let orphans = absent(&sorted_hashes(files, candidate), expected);
    c.orphans = orphans.len() as u64;
    if !orphans.is_empty() {
        files.for_each(|tag, path| {
            if candidate(tag).is_some() && orphans.binary_search(&hash(path)).is_ok() {
                c.orphan_examples.push(path.to_string());
            }
            go_on(c.orphan_examples.len())
        });
    }
}

/// Go on until [`EXAMPLES`] examples are found.
fn go_on(found: usize) -> ControlFlow<()> {
    if found < EXAMPLES {
        ControlFlow::Continue(())
    } else {
        ControlFlow::Break(())
    }
}

/// The hashes of the paths of `list` whose tag `bit` takes, each with the bit it gives for the
/// tag in its lowest bit, sorted (duplicates kept: two rows may name one file).
fn sorted_hashes(list: &PathList, bit: impl Fn(u8) -> Option<u64>) -> Vec<u64> {
    let mut out = Vec::with_capacity(list.len as usize);
    list.for_each(|tag, path| {
        if let Some(b) = bit(tag) {
            out.push(hash(path) | b);
        }
        ControlFlow::Continue(())
    });
    out.sort_unstable();
    out
}

/// The hashes of `sorted` whose path (lowest bit aside) is not among `other`'s: one pass over
/// both, sorted.
fn absent(sorted: &[u64], other: &[u64]) -> Vec<u64> {
    let mut out = Vec::new();
    let mut j = 0;
    for &h in sorted {
        let key = h & !1;
        while j < other.len() && other[j] & !1 < key {
            j += 1;
        }
        if other.get(j).is_none_or(|o| o & !1 != key) {
            out.push(h);
        }
    }
    out
}

fn dedup(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v.dedup();
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_lists_give_back_what_was_pushed_and_share_prefixes() {
        let paths = [
            "library/admin/2024/IMG_0001.jpg",
            "library/admin/2024/IMG_0002.jpg",
            "library/admin/Été 2024/café ☕.jpg",
            "library/admin/Été 2024/café ☔.jpg",
            "upload/x",
            "",
            "upload/x",
        ];
        let mut list = PathList::default();
        for (i, p) in paths.iter().enumerate() {
            list.push(i as u8, p);
        }
        let mut back = Vec::new();
        list.for_each(|t, p| {
            back.push((t, p.to_string()));
            ControlFlow::Continue(())
        });
        let want: Vec<(u8, String)> = paths
            .iter()
            .enumerate()
            .map(|(i, p)| (i as u8, p.to_string()))
            .collect();
        assert_eq!(back, want);
        // The second path costs its tag, two lengths and "2.jpg".
        let mut one = PathList::default();
        one.push(0, paths[0]);
        let first = one.bytes.len();
        one.push(0, paths[1]);
        assert_eq!(one.bytes.len() - first, 3 + "2.jpg".len());
    }

    fn header(line: &str) -> CopyHeader {
        copy::parse_header(line).unwrap()
    }

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
    fn missing_orphans_and_external_assets_are_found() {
        let mut db = DbPaths::new(PathMap::new("", ["/mnt/backed"]));
        assert!(db.begin(&header(
            "COPY public.assets (id, \"originalPath\", \"sidecarPath\", \"isOffline\", status) FROM stdin;"
        )));
        for row in [
            "1\t/data/library/a.jpg\t/data/library/a.jpg.xmp\tf\tactive",
            "2\t/usr/src/app/upload/upload/u/b\\tc.jpg\t\\N\tf\ttrashed",
            "3\t/data/library/gone.jpg\t\\N\tf\tactive",
            "4\t/data/library/deleted.jpg\t\\N\tf\tdeleted",
            "5\t/mnt/photos/x.jpg\t\\N\tt\tactive",
            "6\t/mnt/photos/y.jpg\t\\N\tf\tactive",
            "7\t/mnt/backed/z.jpg\t\\N\tf\tactive",
        ] {
            db.row(row.as_bytes(), false);
        }
        db.end();
        assert!(db.begin(&header(
            "COPY public.asset_file (id, \"assetId\", type, path) FROM stdin;"
        )));
        db.row(b"9\t1\tsidecar\t/data/upload/u/b.xmp", false);
        db.row(b"10\t1\tpreview\t/data/thumbs/u/p.jpg", false);
        db.end();
        assert!(db.begin(&header(
            "COPY public.libraries (id, \"importPaths\") FROM stdin;"
        )));
        db.row(b"1\t{/mnt/photos,\"/mnt/b c\"}", false);
        db.end();
        assert!(!db.begin(&header("COPY public.album (id) FROM stdin;")));

        let mut files = FilePaths::default();
        for (p, k) in [
            ("library", EntryKind::Dir),
            ("library/.immich", EntryKind::File),
            ("library/a.jpg", EntryKind::File),
            ("library/a.jpg.xmp", EntryKind::File),
            ("library/orphan.jpg", EntryKind::File),
            ("library/link.jpg", EntryKind::Symlink),
            ("profile/avatar.jpg", EntryKind::File),
            ("upload/u/b\tc.jpg", EntryKind::File),
            ("external/mnt/backed/z.jpg", EntryKind::File),
        ] {
            files.push(&entry(p, k));
        }
        let c = compare(Some(db), &files, &Excludes::default());
        assert_eq!(c.assets, 5, "{c:?}");
        assert_eq!(c.ignored_assets, 2);
        assert_eq!(c.sidecars, 2);
        assert_eq!(c.missing_originals, 1);
        assert_eq!(c.missing_sidecars, 1);
        assert_eq!(c.missing_examples, ["library/gone.jpg", "upload/u/b.xmp"]);
        assert_eq!(c.orphans, 1);
        assert_eq!(c.orphan_examples, ["library/orphan.jpg"]);
        assert_eq!(c.external_assets, 1);
        assert_eq!(c.external_examples, ["/mnt/photos/y.jpg"]);
        assert_eq!(c.external_import_paths, ["/mnt/b c", "/mnt/photos"]);
        assert_eq!(c.verdict, Verdict::Missing);
        let summary = c.counts_only();
        assert!(summary.missing_examples.is_empty() && summary.external_import_paths.is_empty());
        assert_eq!(summary.missing_originals, 1);
    }

    #[test]
    fn counts_are_exact_and_examples_stop_at_twenty() {
        let mut db = DbPaths::new(PathMap::default());
        db.begin(&header(
            "COPY public.asset (id, \"originalPath\") FROM stdin;",
        ));
        for n in 0..30 {
            db.row(format!("{n}\t/data/library/a/{n}.jpg").as_bytes(), false);
        }
        // Two rows naming one missing file count twice.
        db.row(b"30\t/data/library/a/29.jpg", false);
        let mut files = FilePaths::default();
        for n in 0..5 {
            files.push(&entry(&format!("library/a/{n}.jpg"), EntryKind::File));
        }
        for n in 0..25 {
            files.push(&entry(&format!("library/b/{n}.jpg"), EntryKind::File));
        }
        let c = compare(Some(db), &files, &Excludes::default());
        assert_eq!(c.missing_originals, 26);
        assert_eq!(c.missing_examples.len(), EXAMPLES);
        assert_eq!(c.missing_examples[0], "library/a/5.jpg");
        assert_eq!(c.orphans, 25);
        assert_eq!(c.orphan_examples.len(), EXAMPLES);
        assert_eq!(c.orphan_examples[0], "library/b/0.jpg");
    }

    /// Files the database names that `[immich] exclude` left out are counted apart from the
    /// missing ones (a pattern on a folder covers what is in it), and still give the verdict.
    #[test]
    fn excluded_files_are_told_apart_from_missing_ones() {
        let mut db = DbPaths::new(PathMap::default());
        db.begin(&header(
            "COPY public.asset (id, \"originalPath\") FROM stdin;",
        ));
        for n in 0..30 {
            db.row(format!("{n}\t/data/library/a/{n}.jpg").as_bytes(), false);
        }
        db.row(b"30\t/data/library/a/29.jpg", false);
        db.row(b"31\t/data/library/Trash/x.jpg", false);
        let mut files = FilePaths::default();
        for n in 0..5 {
            files.push(&entry(&format!("library/a/{n}.jpg"), EntryKind::File));
        }
        let excludes = Excludes::new(&["library/a/2*.jpg".into(), "library/Trash".into()]).unwrap();
        let c = compare(Some(db), &files, &excludes);
        // 20..=29, 29 twice, and the one in the excluded folder.
        assert_eq!(c.excluded, 12, "{c:?}");
        assert_eq!(c.missing_originals, 15);
        assert!(c
            .missing_examples
            .iter()
            .all(|p| !p.starts_with("library/a/2")));
        assert_eq!(c.excluded_examples[0], "library/a/20.jpg");
        assert!(c
            .excluded_examples
            .contains(&"library/Trash/x.jpg".to_string()));
        assert_eq!(c.verdict, Verdict::Missing);
        assert_eq!(c.short(), "15 missing, 12 excluded");
    }

    #[test]
    fn absent_compares_paths_whatever_their_tag() {
        let (a, b, x) = (hash("a"), hash("b"), hash("x"));
        let mut tagged = vec![a, a | 1, b | 1, x];
        tagged.sort_unstable();
        let mut present = vec![a, x];
        present.sort_unstable();
        assert_eq!(absent(&tagged, &present), [b | 1]);
        assert_eq!(absent(&present, &tagged), Vec::<u64>::new());
        assert_eq!(absent(&tagged, &[]).len(), 4);
    }

    #[test]
    fn no_asset_table_means_unchecked() {
        let c = compare(None, &FilePaths::default(), &Excludes::default());
        assert_eq!(c.verdict, Verdict::Unchecked);
        assert!(c.note.is_some());
        let mut db = DbPaths::new(PathMap::default());
        db.begin(&header("COPY public.asset (id) FROM stdin;"));
        assert_eq!(
            compare(Some(db), &FilePaths::default(), &Excludes::default()).verdict,
            Verdict::Unchecked
        );
    }

    #[test]
    fn a_cut_row_counts_as_unreadable_when_its_path_is_cut() {
        let mut db = DbPaths::new(PathMap::default());
        db.begin(&header(
            "COPY public.asset (id, \"originalPath\") FROM stdin;",
        ));
        db.row(b"1\t/data/library/cut-", true);
        db.row(b"2\t/data/library/whole.jpg\tmore", true);
        let c = compare(Some(db), &FilePaths::default(), &Excludes::default());
        assert_eq!(c.unreadable_rows, 1);
        assert_eq!(c.assets, 1);
        assert_eq!(c.missing_examples, ["library/whole.jpg"]);
    }
}
