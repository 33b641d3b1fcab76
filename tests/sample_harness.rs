//! Tests of the test harness itself (`immich_backup::demo::sample`): the throwaway PostgreSQL cluster,
//! the Immich-like database and the sample UPLOAD_LOCATION.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Instant;

use immich_backup::demo::sample::{
    add_photo, asset_file_bytes, asset_original_path, canonicalize_dump, create_immich_like_db,
    create_sample_library, find_pg_bin_dir, PgCluster, ADMIN_ID, GENERATED_FOLDERS, MARKER_FILE,
    ORIGINAL_FOLDERS, SAMPLE_ASSET_FILES,
};

/// The sed of Immich's restore docs.
const EMPTY_SEARCH_PATH: &str = "SELECT pg_catalog.set_config('search_path', '', false);";
const FIXED_SEARCH_PATH: &str =
    "SELECT pg_catalog.set_config('search_path', 'public, pg_catalog', true);";

fn start_cluster() -> PgCluster {
    let t = Instant::now();
    let cluster = PgCluster::start(None).expect("start a PostgreSQL cluster");
    eprintln!(
        "cluster on port {} started in {:?}",
        cluster.port,
        t.elapsed()
    );
    cluster
}

fn query(cluster: &PgCluster, db: &str, sql: &str) -> String {
    cluster.psql(db, sql).unwrap().trim_end().to_owned()
}

#[test]
fn cluster_starts_answers_and_is_removed_on_drop() {
    let bin_dir = find_pg_bin_dir().expect("PostgreSQL binaries");
    assert!(bin_dir.join("initdb").is_file());
    let mut cluster = start_cluster();
    assert!(cluster.is_running());
    assert_eq!(cluster.bin_dir, bin_dir);
    assert_eq!(query(&cluster, "postgres", "select 1"), "1");
    assert_eq!(
        query(&cluster, "postgres", "show listen_addresses"),
        "127.0.0.1"
    );
    assert_eq!(
        query(&cluster, "postgres", "show port"),
        cluster.port.to_string()
    );
    assert_eq!(
        query(&cluster, "postgres", "select current_user"),
        "postgres"
    );
    assert_eq!(query(&cluster, "postgres", "show server_encoding"), "UTF8");
    // Several statements in one call, and a unicode round trip.
    let out = query(
        &cluster,
        "postgres",
        "create temp table t(x text); insert into t values ('café ☕'); select x from t;",
    );
    assert_eq!(out, "café ☕");

    let err = cluster
        .psql("postgres", "select * from no_such_table")
        .unwrap_err();
    assert!(format!("{err:#}").contains("no_such_table"), "{err:#}");

    let data_dir = cluster.data_dir().to_path_buf();
    assert!(data_dir.join("PG_VERSION").is_file());
    cluster.stop().unwrap();
    assert!(!cluster.is_running());
    cluster.stop().unwrap(); // idempotent
    assert!(
        cluster.psql("postgres", "select 1").is_err(),
        "server still answers after stop"
    );
    drop(cluster);
    assert!(!data_dir.exists(), "{} left behind", data_dir.display());
}

#[test]
fn parallel_clusters_get_their_own_ports_and_dirs() {
    let base = tempfile::tempdir().unwrap();
    fs::set_permissions(base.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| PgCluster::start(Some(base.path())).unwrap());
        let b = s.spawn(|| PgCluster::start(Some(base.path())).unwrap());
        (a.join().unwrap(), b.join().unwrap())
    });
    assert_ne!(a.port, b.port);
    assert_ne!(a.data_dir(), b.data_dir());
    assert!(a.data_dir().starts_with(base.path()));
    a.psql("postgres", "create database only_on_a").unwrap();
    let count = "select count(*) from pg_database where datname = 'only_on_a'";
    assert_eq!(query(&a, "postgres", count), "1");
    assert_eq!(query(&b, "postgres", count), "0");
}

#[test]
fn start_under_a_private_base_fails_with_a_hint_as_root() {
    let base = tempfile::tempdir().unwrap();
    fs::set_permissions(base.path(), fs::Permissions::from_mode(0o700)).unwrap();
    let result = PgCluster::start(Some(base.path()));
    if std::fs::metadata("/proc/self").unwrap().uid() != 0 {
        // Not root: the server runs as us, so a private base is fine.
        assert!(result.unwrap().psql("postgres", "select 1").is_ok());
        return;
    }
    let err = format!("{:#}", result.unwrap_err());
    eprintln!("{err}");
    assert!(err.contains("initdb"), "{err}");
    assert!(
        err.contains(&format!("may not traverse {}", base.path().display())),
        "{err}"
    );
    assert_eq!(
        fs::read_dir(base.path()).unwrap().count(),
        0,
        "cluster dir left behind"
    );
}

#[test]
fn immich_like_db_has_tables_extensions_and_rows() {
    let cluster = start_cluster();
    let t = Instant::now();
    create_immich_like_db(&cluster, "immich", 5000).unwrap();
    eprintln!("immich-like db with 5000 assets built in {:?}", t.elapsed());

    let tables = query(
        &cluster,
        "immich",
        "select string_agg(tablename, ',' order by tablename) from pg_tables where schemaname = 'public'",
    );
    assert_eq!(
        tables,
        "album,album_asset,asset,asset_exif,geodata_places,kysely_migrations,\
         kysely_migrations_lock,system_metadata,user,version_history"
    );
    let extensions = query(
        &cluster,
        "immich",
        "select string_agg(extname, ',' order by extname) from pg_extension",
    );
    assert_eq!(
        extensions,
        "cube,earthdistance,pg_trgm,plpgsql,unaccent,uuid-ossp"
    );

    let counts = query(
        &cluster,
        "immich",
        r#"select (select count(*) from asset), (select count(*) from asset_exif),
                  (select count(*) from "user"), (select count(*) from album),
                  (select count(*) from album_asset) > 100,
                  (select count(*) from kysely_migrations), (select count(*) from system_metadata),
                  (select count(*) from version_history), (select count(*) from geodata_places),
                  (select count(*) from asset where "type" = 'VIDEO')"#,
    );
    assert_eq!(counts, "5000|5000|3|4|t|4|4|2|400|250");
    let fks = query(
        &cluster,
        "immich",
        "select count(*) from pg_constraint where contype = 'f'",
    );
    assert_eq!(fks, "7");

    // Paths follow asset_original_path, and the geo index works.
    for n in [1, 5, 7, 10, 999, 1001, 4321, 5000] {
        let sql = format!(
            r#"select "originalPath" from asset where "deviceAssetId" = 'device-asset-{n}'"#
        );
        assert_eq!(
            query(&cluster, "immich", &sql),
            format!("/data/{}", asset_original_path(n))
        );
    }
    assert_eq!(asset_original_path(1), "library/admin/2024/IMG_0001.jpg");
    let unicode = query(
        &cluster,
        "immich",
        r#"select name from "user" where "storageLabel" = 'zoe'"#,
    );
    assert_eq!(unicode, "Zoë Müller");
    let near = query(
        &cluster,
        "immich",
        "select count(*) > 0 from asset_exif where earth_box(ll_to_earth_public(0, 0), 3000000) @> ll_to_earth_public(latitude, longitude)",
    );
    assert_eq!(near, "t");

    // Deterministic: a second build of the same size dumps identically.
    create_immich_like_db(&cluster, "immich_again", 5000).unwrap();
    let first = cluster.canonical_dump("immich").unwrap();
    assert_eq!(first, cluster.canonical_dump("immich_again").unwrap());
    assert!(first.contains("CREATE INDEX \"IDX_geodata_gist_earthcoord\""));
    assert!(
        create_immich_like_db(&cluster, "immich", 10).is_err(),
        "db exists already"
    );
}

/// Replay `dump` into `cluster` like Immich's docs do (psql without ON_ERROR_STOP); return the
/// ERROR lines psql printed.
fn replay(cluster: &PgCluster, dump: &str) -> Vec<String> {
    let mut cmd = cluster.client_command("psql");
    cmd.args(["-X", "-q", "-d", "postgres", "-f", "-"]);
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let dump = dump.to_owned();
    let writer = std::thread::spawn(move || stdin.write_all(dump.as_bytes()));
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap().unwrap();
    assert!(out.status.success(), "psql itself failed: {:?}", out.status);
    String::from_utf8(out.stderr)
        .unwrap()
        .lines()
        .filter(|l| l.contains("ERROR:"))
        .map(|l| l.split("ERROR:").nth(1).unwrap().trim().to_owned())
        .collect()
}

fn dumpall(cluster: &PgCluster) -> String {
    let out = cluster
        .client_command("pg_dumpall")
        .args(["--clean", "--if-exists"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn dumpall_replays_only_with_the_search_path_fix() {
    let source = start_cluster();
    create_immich_like_db(&source, "immich", 1000).unwrap();
    let dump = dumpall(&source);
    assert!(dump.contains(EMPTY_SEARCH_PATH));
    assert!(
        dump.lines().any(|l| l.starts_with("\\restrict ")),
        "expected PG 15.14+ \\restrict lines"
    );

    // Without the fix: the legacy earthdistance index cannot be rebuilt.
    let plain = start_cluster();
    let errors = replay(&plain, &dump);
    eprintln!("errors without the fix: {errors:#?}");
    assert!(
        errors.iter().any(|e| e == r#"type "earth" does not exist"#),
        "{errors:?}"
    );
    let legacy_index =
        r#"select count(*) from pg_indexes where indexname = 'IDX_geodata_gist_earthcoord'"#;
    assert_eq!(query(&plain, "immich", legacy_index), "0");
    assert_ne!(
        source.canonical_dump("immich").unwrap(),
        plain.canonical_dump("immich").unwrap()
    );

    // With the fix: only the errors every replay into a fresh cluster gives.
    let fixed = start_cluster();
    let errors = replay(&fixed, &dump.replace(EMPTY_SEARCH_PATH, FIXED_SEARCH_PATH));
    assert_eq!(
        errors,
        [
            "current user cannot be dropped",
            r#"role "postgres" already exists"#
        ],
        "unexpected errors with the fix"
    );
    assert_eq!(query(&fixed, "immich", legacy_index), "1");
    assert_eq!(
        query(&fixed, "immich", "select count(*) from asset"),
        "1000"
    );
    assert_eq!(
        source.canonical_dump("immich").unwrap(),
        fixed.canonical_dump("immich").unwrap()
    );
}

#[test]
fn canonical_dump_drops_restrict_keys_and_sorts_copy_rows() {
    let raw = "\\restrict abc\nSET x = 1;\n-- Started on 2025-01-01\nCOPY public.t (a) FROM stdin;\nb\na\n\\.\n\nCOPY public.u (a) FROM stdin;\n\\.\n\\unrestrict abc\n";
    assert_eq!(
        canonicalize_dump(raw),
        "SET x = 1;\nCOPY public.t (a) FROM stdin;\na\nb\n\\.\n\nCOPY public.u (a) FROM stdin;\n\\.\n"
    );

    let cluster = start_cluster();
    create_immich_like_db(&cluster, "immich", 50).unwrap();
    let dump = cluster.canonical_dump("immich").unwrap();
    assert!(!dump.contains("\\restrict"));
    assert!(dump.contains("COPY public.asset "));
    assert!(dump.contains("/data/library/admin/2024/IMG_0001.jpg"));
    assert!(dump.contains("CREATE FUNCTION public.ll_to_earth_public"));
    // Rows are compared as sets: an update moves a row to the end of the table, which changes
    // pg_dump's output but not the canonical dump.
    let raw_dump = |c: &PgCluster| {
        let out = c
            .client_command("pg_dump")
            .args(["-d", "immich"])
            .output()
            .unwrap();
        assert!(out.status.success());
        let text = String::from_utf8(out.stdout).unwrap();
        let start = text.find("COPY public.version_history").unwrap();
        text[start..start + 300].to_owned()
    };
    let before = raw_dump(&cluster);
    cluster
        .psql(
            "immich",
            "update version_history set version = version where version = 'v1.132.3'",
        )
        .unwrap();
    assert_ne!(
        before,
        raw_dump(&cluster),
        "pg_dump row order did not change"
    );
    assert_eq!(dump, cluster.canonical_dump("immich").unwrap());
}

/// Relative path -> (kind, size, mode, mtime, content or link target) for everything under root.
fn snapshot(root: &Path) -> BTreeMap<PathBuf, (char, u64, u32, i64, Vec<u8>)> {
    walkdir::WalkDir::new(root)
        .min_depth(1)
        .into_iter()
        .map(|e| {
            let e = e.unwrap();
            let meta = e.path().symlink_metadata().unwrap();
            let rel = e.path().strip_prefix(root).unwrap().to_path_buf();
            let (kind, content) = if meta.file_type().is_symlink() {
                (
                    'l',
                    fs::read_link(e.path())
                        .unwrap()
                        .into_os_string()
                        .into_encoded_bytes(),
                )
            } else if meta.is_dir() {
                ('d', vec![])
            } else {
                ('f', fs::read(e.path()).unwrap())
            };
            (
                rel,
                (
                    kind,
                    meta.len(),
                    meta.mode() & 0o7777,
                    meta.mtime(),
                    content,
                ),
            )
        })
        .collect()
}

fn deflated_len(bytes: &[u8]) -> usize {
    let mut enc = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
    enc.write_all(bytes).unwrap();
    enc.finish().unwrap().len()
}

#[test]
fn sample_library_has_what_it_should() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("upload-location");
    let t = Instant::now();
    let stats = create_sample_library(&root).unwrap();
    eprintln!("sample library {stats:?} written in {:?}", t.elapsed());
    let snap = snapshot(&root);

    for folder in ORIGINAL_FOLDERS.iter().chain(GENERATED_FOLDERS.iter()) {
        let marker = root.join(folder).join(MARKER_FILE);
        assert!(
            !fs::read(&marker).unwrap().is_empty(),
            "{}",
            marker.display()
        );
        let content = snap.iter().filter(|(p, v)| {
            v.0 == 'f' && p.starts_with(folder) && p.file_name().unwrap() != MARKER_FILE
        });
        assert!(content.count() > 0, "{folder} has nothing but its marker");
    }
    let top: Vec<_> = fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(top.len(), 6);

    // Counts agree with what is on disk.
    let files: Vec<_> = snap.iter().filter(|(_, v)| v.0 == 'f').collect();
    assert_eq!(stats.files, files.len());
    assert_eq!(stats.bytes, files.iter().map(|(_, v)| v.1).sum::<u64>());
    let originals: Vec<_> = files
        .iter()
        .filter(|(p, _)| ORIGINAL_FOLDERS.iter().any(|f| p.starts_with(f)))
        .collect();
    assert_eq!(stats.original_files, originals.len());
    assert_eq!(
        stats.original_bytes,
        originals.iter().map(|(_, v)| v.1).sum::<u64>()
    );
    assert_eq!(stats.symlinks, 1);
    assert!(stats.original_bytes > 10 << 20 && stats.original_bytes < stats.bytes);

    // The database's assets 1..=12 are there, with their bytes.
    for n in 1..=SAMPLE_ASSET_FILES {
        assert_eq!(
            fs::read(root.join(asset_original_path(n))).unwrap(),
            asset_file_bytes(n)
        );
    }
    assert!(root.join("library/admin/2024/IMG_0001.jpg").is_file());
    assert!(root.join("library/admin/Été 2024/café ☕.jpg").is_file());

    // Sizes: empty, above 64 KiB, above 8 MiB; big files do not compress.
    let size = |rel: &str| snap[Path::new(rel)].1;
    assert_eq!(size("library/admin/2024/empty.jpg"), 0);
    assert_eq!(size("library/admin/2023/PANO_0001.jpg"), 200 * 1024);
    assert!(size("library/admin/2023/VID_0002.mp4") > 1 << 20);
    assert_eq!(size("library/admin/2022/VID_0003.mov"), 9 << 20);
    let big = fs::read(root.join("library/admin/2022/VID_0003.mov")).unwrap();
    assert!(
        deflated_len(&big[..1 << 20]) > (1 << 20) * 99 / 100,
        "big file compresses"
    );

    // Duplicates, symlink, modes.
    assert_eq!(
        fs::read(root.join("library/zoe/shared with zoë/IMG_0001.jpg")).unwrap(),
        fs::read(root.join("library/admin/2024/IMG_0001.jpg")).unwrap()
    );
    let link = root.join("library/admin/2024/latest.jpg");
    assert_eq!(fs::read_link(&link).unwrap(), Path::new("IMG_0001.jpg"));
    assert_eq!(fs::read(&link).unwrap(), asset_file_bytes(1));
    let mode = |rel: &str| snap[Path::new(rel)].2;
    assert_eq!(mode(&format!("profile/{ADMIN_ID}/avatar.jpg")), 0o600);
    assert_eq!(mode("library/admin/2024/IMG_0003.jpg"), 0o755);
    assert_eq!(mode("library/admin/2024/IMG_0001.jpg"), 0o644);

    // Distinct past mtimes on everything.
    let mtimes: std::collections::BTreeSet<i64> = snap.values().map(|v| v.3).collect();
    assert_eq!(mtimes.len(), snap.len(), "mtimes are not distinct");
    let year_2020 = 1_577_836_800;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    assert!(mtimes
        .iter()
        .all(|&m| m > year_2020 && m < now.as_secs() as i64));

    // Deterministic: a second library is the same in every respect.
    let again = dir.path().join("again");
    assert_eq!(create_sample_library(&again).unwrap(), stats);
    assert!(snapshot(&again) == snap, "second sample library differs");
}

#[test]
fn add_photo_writes_seeded_bytes_below_root() {
    let dir = tempfile::tempdir().unwrap();
    let a = add_photo(dir.path(), "library/admin/2025/IMG_9001.jpg", 70_000, 7).unwrap();
    assert_eq!(a, dir.path().join("library/admin/2025/IMG_9001.jpg"));
    let bytes = fs::read(&a).unwrap();
    assert_eq!(bytes.len(), 70_000);
    assert_eq!(&bytes[..3], &[0xFF, 0xD8, 0xFF]);
    let b = add_photo(dir.path(), "upload/x/IMG_9001.jpg", 70_000, 7).unwrap();
    assert_eq!(fs::read(b).unwrap(), bytes, "same seed, same bytes");
    let c = add_photo(dir.path(), "upload/x/other.jpg", 70_000, 8).unwrap();
    assert_ne!(fs::read(c).unwrap(), bytes, "another seed, other bytes");
    assert_eq!(
        fs::read(add_photo(dir.path(), "z/empty.jpg", 0, 1).unwrap()).unwrap(),
        b""
    );
    for bad in ["../escape.jpg", "/etc/passwd", "a/../../b.jpg", ""] {
        assert!(
            add_photo(dir.path(), bad, 10, 1).is_err(),
            "{bad:?} accepted"
        );
    }
}
