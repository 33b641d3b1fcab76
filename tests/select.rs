//! Integration tests of issue 15 (restoring a selection): `restore --include/--exclude` and the
//! Immich-aware selections (`--user`, `--album`, `--taken-from/--taken-to`, `--missing-now`) through
//! the real binary, against a real PostgreSQL source, with a folder store and an S3 store (s3s in
//! this process). Every expected set comes from SQL on the source database or from its files.

mod common;

use std::collections::BTreeSet;
use std::fs;
use std::path::Path;

use common::s3::{S3Server, SECRET_KEY};
use common::*;
use immich_backup::demo::sample;
use immich_backup::error::exit;

/// A file name with accents, a space, an emoji and CJK, in one asset of the shared-name album.
const UNICODE_FILE: &str = "library/admin/2024/Été à la plage ☀️ 海.jpg";

/// A source whose database has, besides the sample (three users, albums, trashed assets): a
/// second album named "Family" (so the name is shared), an asset in two albums, and an asset with
/// a Unicode file name in that album.
fn source() -> Source {
    let s = Source::new(ASSETS);
    sample::add_photo(&s.upload, UNICODE_FILE, 4321, 77).unwrap();
    let sql = format!(
        "INSERT INTO asset (id, \"deviceAssetId\", \"ownerId\", \"deviceId\", type, \"originalPath\",
           \"originalFileName\", \"fileCreatedAt\", \"fileModifiedAt\", \"localDateTime\", checksum)
         SELECT md5('unicode')::uuid, 'device-unicode', id, 'test', 'IMAGE', '/data/{UNICODE_FILE}',
           'Été à la plage ☀️ 海.jpg', '2024-07-14 08:00+00', '2024-07-14 08:00+00',
           '2024-07-14 10:00+00', '\\x01'::bytea FROM \"user\" WHERE email = 'admin@example.com';
         INSERT INTO album (id, \"ownerId\", \"albumName\")
           SELECT md5('album-5')::uuid, id, 'Family' FROM \"user\" WHERE email = 'admin@example.com';
         INSERT INTO album_asset (\"albumId\", \"assetId\")
           SELECT md5('album-5')::uuid, id FROM asset
           WHERE CASE WHEN \"deviceAssetId\" ~ '^device-asset-[0-9]+$'
             THEN substr(\"deviceAssetId\", 14)::int % 11 = 0 ELSE \"deviceAssetId\" = 'device-unicode' END;"
    );
    s.cluster.psql(DB, &sql).unwrap();
    s
}

/// The snapshot paths of the originals that `condition` (SQL on `asset a`, `"user" u`) selects on
/// the source database, in UTC.
fn expected(s: &Source, condition: &str) -> BTreeSet<String> {
    let sql = format!(
        "SET TIME ZONE 'UTC'; SELECT DISTINCT a.\"originalPath\" FROM asset a JOIN \"user\" u ON u.id = a.\"ownerId\" WHERE {condition};"
    );
    let out = s.cluster.psql(DB, &sql).unwrap();
    let set: BTreeSet<String> = out
        .lines()
        .filter(|l| !l.is_empty())
        .map(|l| l.strip_prefix("/data/").expect("under /data").to_string())
        .collect();
    assert!(!set.is_empty(), "the SQL selects nothing: {condition}");
    set
}

/// The snapshot paths of the selected files a `--json` report lists.
fn selected(report: &serde_json::Value) -> BTreeSet<String> {
    report["selected"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["path"].as_str().unwrap().to_string())
        .collect()
}

/// Regular files under `root` (relative paths), but the asset list.
fn files_under(root: &Path) -> BTreeSet<String> {
    walkdir::WalkDir::new(root)
        .into_iter()
        .flatten()
        .filter(|e| e.file_type().is_file())
        .map(|e| {
            e.path()
                .strip_prefix(root)
                .unwrap()
                .to_string_lossy()
                .into_owned()
        })
        .filter(|p| p != "restored-assets.csv")
        .collect()
}

/// Each file is byte-identical to the source's.
fn assert_same_as_source(s: &Source, target: &Path, paths: &BTreeSet<String>) {
    for p in paths {
        assert_eq!(
            fs::read(target.join(p)).unwrap(),
            fs::read(s.upload.join(p)).unwrap(),
            "{p}"
        );
    }
}

fn restore(config: &Path, s: &Source, extra: &[&str], env: &[(&str, &str)]) -> Run {
    cli(Some(config), &restore_args(&s.identity, extra), env)
}

/// `--user`, `--album` (a name two albums share), dates and their combinations select exactly what
/// SQL on the source database selects; an asset in two albums is listed with both names; the album
/// is restored with its asset list; unknown names are one-line usage errors.
#[test]
fn immich_selections_match_sql_on_the_source_database() {
    let s = source();
    s.backup_lib();
    let config = s.write_config("config.toml");
    let t = s.work.path().join("t");
    let target = path_arg(&t);
    let cases: [(&[&str], &str); 5] = [
        (&["--user", "zoe@example.com"], "u.email = 'zoe@example.com'"),
        (
            &["--album", "Family"],
            "a.id IN (SELECT aa.\"assetId\" FROM album_asset aa JOIN album al ON al.id = aa.\"albumId\" WHERE al.\"albumName\" = 'Family')",
        ),
        (
            &["--taken-from", "2024-03-01", "--taken-to", "2024-05-31"],
            "a.\"localDateTime\" >= '2024-03-01' AND a.\"localDateTime\" < '2024-06-01'",
        ),
        (
            &["--album", "Family", "--user", "admin@example.com", "--taken-to", "2024-07-14"],
            "u.email = 'admin@example.com' AND a.\"localDateTime\" < '2024-07-15' AND a.id IN (SELECT aa.\"assetId\" FROM album_asset aa JOIN album al ON al.id = aa.\"albumId\" WHERE al.\"albumName\" = 'Family')",
        ),
        (
            &["--user", "admin@example.com", "--include", "library/admin/2024/**", "--exclude", "**/*.mp4"],
            "u.email = 'admin@example.com' AND a.\"originalPath\" LIKE '/data/library/admin/2024/%' AND a.\"originalPath\" NOT LIKE '%.mp4'",
        ),
    ];
    for (args, condition) in cases {
        let mut extra = vec!["--dry-run", "--target", target];
        extra.extend_from_slice(args);
        let run = restore(&config, &s, &extra, &[]);
        run.expect_code(exit::OK);
        let report = run.json();
        assert_eq!(selected(&report), expected(&s, condition), "{args:?}");
        // Every selected asset is one of those files (none left out by the globs is listed).
        let assets = report["assets"].as_array().unwrap();
        assert_eq!(assets.len(), selected(&report).len(), "{args:?}");
        assert!(
            assets.iter().all(|a| a["outcome"] == "restored"),
            "{args:?}"
        );
        assert!(!t.exists(), "a dry run writes nothing");
    }
    // `ls --assets` lists the same selection without restoring: the album's assets, as SQL on the
    // source database selects them, with both album names of an asset in two albums.
    let identity = s.identity.display().to_string();
    let listed = cli(
        Some(&config),
        &[
            "--json", "ls", "latest", "--assets", "--album", "Family", "-i", &identity,
        ],
        &[],
    );
    listed.expect_code(exit::OK);
    let lines: Vec<serde_json::Value> = listed
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let paths: BTreeSet<String> = lines
        .iter()
        .filter(|l| l["message_type"] == "asset")
        .map(|l| l["asset"]["snapshot_path"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        paths,
        expected(
            &s,
            "a.id IN (SELECT aa.\"assetId\" FROM album_asset aa JOIN album al ON al.id = aa.\"albumId\" WHERE al.\"albumName\" = 'Family')"
        )
    );
    let summary = lines.last().unwrap();
    assert_eq!(summary["message_type"], "summary");
    assert_eq!(summary["assets"].as_u64().unwrap() as usize, paths.len());
    let text = cli(
        Some(&config),
        &[
            "ls",
            "latest",
            "--assets",
            "--user",
            "zoe@example.com",
            "-i",
            &identity,
        ],
        &[],
    );
    text.expect_code(exit::OK);
    let zoe = expected(&s, "u.email = 'zoe@example.com'");
    assert_eq!(
        text.stdout.lines().count(),
        zoe.len() + 1,
        "{}",
        text.stdout
    );
    assert!(
        zoe.iter().all(|p| text.stdout.contains(p.as_str())),
        "{}",
        text.stdout
    );
    let wrong = cli(
        Some(&config),
        &["ls", "latest", "--album", "Family", "-i", &identity],
        &[],
    );
    wrong.expect_code(exit::USAGE);
    assert!(wrong.stderr.contains("add --assets"), "{}", wrong.stderr);

    // Trashed assets are selected like the others (they are what "empty trash" took away).
    let admin = restore(
        &config,
        &s,
        &[
            "--dry-run",
            "--target",
            target,
            "--user",
            "admin@example.com",
        ],
        &[],
    )
    .json();
    let trashed = expected(&s, "a.status = 'trashed' AND u.email = 'admin@example.com'");
    assert!(trashed.is_subset(&selected(&admin)));

    // The same as text: each file named, and what would be done.
    let text = cli(
        Some(&config),
        &[
            "restore",
            "--dry-run",
            "--target",
            target,
            "--album",
            "Family",
            "--identity",
            path_arg(&s.identity),
        ],
        &[],
    );
    text.expect_code(exit::OK);
    assert!(
        text.stdout.contains(&format!("{UNICODE_FILE}  (")),
        "{}",
        text.stdout
    );
    assert!(text.stdout.contains("would restore"), "{}", text.stdout);
    assert!(
        text.stdout.trim_end().ends_with("nothing was written."),
        "{}",
        text.stdout
    );

    // The album, restored: exactly its files, identical, and the list of its assets.
    let run = restore(&config, &s, &["--target", target, "--album", "Family"], &[]);
    run.expect_code(exit::OK);
    let report = run.json();
    let family = expected(&s, "a.id IN (SELECT aa.\"assetId\" FROM album_asset aa JOIN album al ON al.id = aa.\"albumId\" WHERE al.\"albumName\" = 'Family')");
    assert!(family.contains(UNICODE_FILE));
    assert_eq!(files_under(&t), family);
    assert_same_as_source(&s, &t, &family);
    assert_eq!(
        report["files_restored"].as_u64().unwrap() as usize,
        family.len()
    );
    // Asset 56 is in "Été 2024 ☀️" (n % 7) and the sample's "Family" (n % 8); asset 88 in both
    // albums named "Family" (n % 8, and the one added here: n % 11).
    let assets = report["assets"].as_array().unwrap();
    let by_path = |p: &str| {
        assets
            .iter()
            .find(|a| a["snapshot_path"] == p)
            .unwrap_or_else(|| panic!("{p} not listed"))
    };
    let n88 = by_path(&sample::asset_original_path(88));
    assert_eq!(n88["albums"], serde_json::json!(["Family", "Family"]));
    let n56 = by_path(&sample::asset_original_path(56));
    assert_eq!(n56["albums"], serde_json::json!(["Family", "Été 2024 ☀️"]));
    let uni = by_path(UNICODE_FILE);
    assert_eq!(uni["file_name"], "Été à la plage ☀️ 海.jpg");
    assert_eq!(uni["taken"], "2024-07-14T10:00:00Z");
    assert_eq!(uni["owner"], "admin@example.com");
    let csv = fs::read_to_string(t.join("restored-assets.csv")).unwrap();
    assert_eq!(csv.lines().count(), family.len() + 1, "{csv}");
    assert!(csv.contains("Été à la plage ☀️ 海.jpg"), "{csv}");

    // Run again: everything is present, nothing written.
    let again = restore(&config, &s, &["--target", target, "--album", "Family"], &[]);
    again.expect_code(exit::OK);
    assert_eq!(
        again.json()["files_already_present"].as_u64().unwrap() as usize,
        family.len()
    );

    // Unknown names: one line each, the usage code.
    for args in [["--user", "nobody@example.com"], ["--album", "family"]] {
        let mut extra = vec!["--target", target];
        extra.extend_from_slice(&args);
        let run = restore(&config, &s, &extra, &[]);
        run.expect_code(exit::USAGE);
        assert_eq!(run.error_lines().len(), 1, "{}", run.stderr);
    }
    // A selection needs a target (but --missing-now).
    restore(&config, &s, &["--user", "zoe@example.com"], &[]).expect_code(exit::USAGE);
}

/// `--missing-now`: the assets whose original is gone from UPLOAD_LOCATION (a trashed one and the
/// Unicode one among them) are restored into a new folder, never into the live library.
#[test]
fn missing_now_restores_what_was_deleted_into_a_new_folder() {
    let s = source();
    s.backup_lib();
    let config = s.write_config("config.toml");
    let gone = [
        UNICODE_FILE.to_string(),
        sample::asset_original_path(97), // trashed in the sample
        sample::asset_original_path(150),
    ];
    let kept: Vec<Vec<u8>> = gone
        .iter()
        .map(|p| fs::read(s.upload.join(p)).unwrap())
        .collect();
    for p in &gone {
        fs::remove_file(s.upload.join(p)).unwrap();
    }
    let all = expected(&s, "true");
    let want: BTreeSet<String> = all
        .into_iter()
        .filter(|p| !s.upload.join(p).exists())
        .collect();
    assert_eq!(want, gone.iter().cloned().collect());

    // Never into the live library.
    let inside = s.upload.join("restored");
    let run = restore(
        &config,
        &s,
        &["--missing-now", "--target", path_arg(&inside)],
        &[],
    );
    run.expect_code(exit::USAGE);
    assert!(!inside.exists());

    // By default into ./immich-restore-<snapshot>-<date>.
    let cwd = s.work.path().join("cwd");
    fs::create_dir_all(&cwd).unwrap();
    let mut cmd = command(
        Some(&config),
        &restore_args(&s.identity, &["--missing-now"]),
    );
    cmd.current_dir(&cwd);
    let run = run_to_end(cmd);
    run.expect_code(exit::OK);
    let report = run.json();
    let made: Vec<_> = fs::read_dir(&cwd)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert_eq!(made.len(), 1, "{made:?}");
    let name = made[0].file_name().unwrap().to_string_lossy().into_owned();
    assert!(
        name.starts_with(&format!(
            "immich-restore-{}-",
            report["snapshot"].as_str().unwrap()
        )),
        "{name}"
    );
    assert_eq!(files_under(&made[0]), want);
    for (p, bytes) in gone.iter().zip(&kept) {
        assert_eq!(&fs::read(made[0].join(p)).unwrap(), bytes, "{p}");
    }
    let csv = fs::read_to_string(made[0].join("restored-assets.csv")).unwrap();
    assert_eq!(csv.lines().count(), 4, "{csv}");
    assert!(csv.lines().next().unwrap().starts_with("original_path,"));
}

/// `--include`/`--exclude` restore exactly the matching files, from a folder store and from S3;
/// a file that differs is left as it is (exit 3) unless `--overwrite`; a damaged content object
/// makes the restore name the file and exit with the damaged-content code, writing nothing at its
/// path, while every other file is restored.
#[test]
fn include_restores_exactly_refuses_to_overwrite_and_names_damage() {
    let server = S3Server::start(&["photos"]);
    let s = source();
    s.backup_lib();
    let folder_config = s.write_config("config.toml");
    let mut s3_cfg = s.config_with(s3_storage(&server, "photos", "immich"));
    s3_cfg.backup.cache_dir = s.work.path().join("cache-s3").display().to_string();
    backup(&rt(), &s3_cfg).expect("backup to S3");
    let s3_config = s.write_config_with(&s3_cfg.storage, "s3.toml");
    let env = [("IMMICH_BACKUP__STORAGE__SECRET_ACCESS_KEY", SECRET_KEY)];
    let want: BTreeSet<String> = files_under(&s.upload)
        .into_iter()
        .filter(|p| {
            p.starts_with("library/zoe/") && !p.ends_with(".mp4") && !p.ends_with(".immich")
        })
        .collect();
    assert!(want.len() > 5);
    for (name, config, env) in [
        ("folder", &folder_config, &env[..0]),
        ("s3", &s3_config, &env[..]),
    ] {
        let t = s.work.path().join(format!("inc-{name}"));
        let args = [
            "--target",
            path_arg(&t),
            "--include",
            "library/zoe",
            "--exclude",
            "**/*.mp4",
            "--exclude",
            "**/.immich",
        ];
        let run = restore(config, &s, &args, env);
        run.expect_code(exit::OK);
        assert_eq!(files_under(&t), want, "{name}");
        assert_same_as_source(&s, &t, &want);

        // A differing file is left as it is, listed, exit 3; the others are present.
        let victim = want.iter().next().unwrap().clone();
        fs::write(t.join(&victim), b"my own edit").unwrap();
        let run = restore(config, &s, &args, env);
        run.expect_code(exit::PARTIAL);
        let report = run.json();
        assert_eq!(report["refused"], serde_json::json!([victim]));
        assert_eq!(fs::read(t.join(&victim)).unwrap(), b"my own edit");
        assert_eq!(
            report["files_already_present"].as_u64().unwrap() as usize,
            want.len() - 1
        );
        // --overwrite replaces it with the snapshot's.
        let mut over = args.to_vec();
        over.push("--overwrite");
        let run = restore(config, &s, &over, env);
        run.expect_code(exit::OK);
        assert_eq!(run.json()["files_overwritten"], 1);
        assert_same_as_source(&s, &t, &want);
        assert!(partial_files(&t).is_empty());
    }

    // A damaged content object (folder store): named, exit 4, nothing at its path.
    let victim = want.iter().nth(1).unwrap().clone();
    let bytes = fs::read(s.upload.join(&victim)).unwrap();
    flip_middle_byte(&s.store.join(object_key(&s, &bytes)));
    let t = s.work.path().join("damaged");
    let run = restore(
        &folder_config,
        &s,
        &["--target", path_arg(&t), "--include", "library/zoe/**"],
        &[],
    );
    run.expect_code(exit::DAMAGED);
    let report = run.json();
    let damaged = report["damaged"].as_array().unwrap();
    assert_eq!(damaged.len(), 1, "{damaged:?}");
    assert_eq!(damaged[0]["path"], victim.as_str());
    assert!(!t.join(&victim).exists());
    assert!(partial_files(&t).is_empty());
    let others: BTreeSet<String> = want.iter().filter(|p| **p != victim).cloned().collect();
    assert!(others.is_subset(&files_under(&t)));
    assert_same_as_source(&s, &t, &others);
}
