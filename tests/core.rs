//! Integration tests of issue 2 (core): backup → restore against real throwaway PostgreSQL clusters and
//! a folder store, through the library API and through the real `immich-backup` binary.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::CString;
use std::fs;
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use age::secrecy::{ExposeSecret, SecretString};
use common::*;
use immich_backup::crypto;
use immich_backup::demo;
use immich_backup::demo::sample::{
    self, asset_original_path, PgCluster, GENERATED_FOLDERS, MARKER_FILE, ORIGINAL_FOLDERS,
};
use immich_backup::error::exit;
use immich_backup::format::{ContentId, EntryKind};

fn start_cluster() -> PgCluster {
    PgCluster::start(None).expect("start a PostgreSQL cluster")
}

/// Every path under the original folders of `root` (the folders themselves included), relative.
fn original_paths(root: &Path) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for f in ORIGINAL_FOLDERS {
        for e in walkdir::WalkDir::new(root.join(f)) {
            let e = e.unwrap();
            out.insert(
                e.path()
                    .strip_prefix(root)
                    .unwrap()
                    .to_string_lossy()
                    .into_owned(),
            );
        }
    }
    out
}

/// Regular files under the original folders of `root`: relative path → bytes.
fn original_files(root: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    for f in ORIGINAL_FOLDERS {
        for e in walkdir::WalkDir::new(root.join(f)) {
            let e = e.unwrap();
            if e.file_type().is_file() {
                let rel = e.path().strip_prefix(root).unwrap().to_string_lossy();
                out.insert(rel.into_owned(), fs::read(e.path()).unwrap());
            }
        }
    }
    out
}

/// Row count of one table, straight from the server.
fn count_rows(cluster: &PgCluster, table: &str) -> u64 {
    cluster
        .psql(DB, &format!("select count(*) from {table}"))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// The error the CLI printed must be exactly one line (logging off) and name `what`.
fn assert_one_line_error(run: &Run, what: &str) {
    let stderr = run.stderr.trim_end();
    eprintln!("exit {}: {stderr}", run.code);
    assert_eq!(
        stderr.lines().count(),
        1,
        "expected a one-line error, got:\n{stderr}"
    );
    assert!(stderr.starts_with("error: "), "{stderr}");
    assert!(
        stderr.contains(what),
        "error does not name {what:?}: {stderr}"
    );
}

/// Logging off, so stderr holds only what the CLI itself says.
const QUIET: (&str, &str) = ("IMMICH_BACKUP_LOG", "off");

// ---------------------------------------------------------------------------------------------------
// 1. backup → restore into a fresh install

#[test]
fn backup_then_restore_into_fresh_install_is_identical() {
    let src = Source::new(ASSETS);
    let config = src.write_config("config.toml");

    // Backup through the binary.
    let run = cli(Some(&config), &["--json", "backup"], &[]);
    run.expect_code(exit::OK);
    let rep = run.json();
    let id = rep["snapshot"].as_str().unwrap().to_string();

    // Only the originals are in the snapshot: report counts, file list, stored objects.
    assert_eq!(rep["files"], src.lib.original_files as u64, "{rep}");
    assert_eq!(rep["bytes_total"], src.lib.original_bytes, "{rep}");
    assert_eq!(rep["symlinks"], src.lib.symlinks as u64, "{rep}");
    assert_eq!(rep["skipped"].as_array().unwrap().len(), 0, "{rep}");
    let list = file_list(&src.store, &src.identity, &id);
    let listed: BTreeSet<String> = list.iter().map(|e| e.path.clone()).collect();
    assert_eq!(listed, original_paths(&src.upload));
    for e in &list {
        assert!(
            !GENERATED_FOLDERS
                .iter()
                .any(|g| e.path == *g || e.path.starts_with(&format!("{g}/"))),
            "generated path {} was backed up",
            e.path
        );
    }
    let link = list
        .iter()
        .find(|e| e.path == "library/admin/2024/latest.jpg")
        .expect("the symlink is listed");
    assert_eq!(link.kind, EntryKind::Symlink);
    assert_eq!(link.target.as_deref(), Some("IMG_0001.jpg"));
    let objects = data_objects(&src.store);
    for g in GENERATED_FOLDERS {
        for e in walkdir::WalkDir::new(src.upload.join(g)) {
            let e = e.unwrap();
            if e.file_type().is_file() && e.file_name() != MARKER_FILE {
                let key = object_key(&src, &fs::read(e.path()).unwrap());
                assert!(
                    !objects.contains_key(&key),
                    "{} was stored",
                    e.path().display()
                );
            }
        }
    }
    for (path, bytes) in original_files(&src.upload) {
        assert!(
            objects.contains_key(&object_key(&src, &bytes)),
            "{path} not stored"
        );
    }
    // The snapshot's row counts are the source's.
    let m = manifest(&src.store, &src.identity, &id);
    for table in ["asset", "\"user\"", "album", "kysely_migrations"] {
        let key = format!("public.{}", table.trim_matches('"'));
        assert_eq!(
            m.database.row_counts.get(&key),
            Some(&count_rows(&src.cluster, table)),
            "{key}"
        );
    }

    // Restore through the binary into a new cluster and an empty folder.
    let fresh = start_cluster();
    let target = src.work.path().join("restored");
    let rconfig = src.write_restore_config("restore.toml", &fresh, &target);
    let run = cli(
        Some(&rconfig),
        &restore_args(&src.identity, &["latest"]),
        &[],
    );
    run.expect_code(exit::OK);
    let r = run.json();
    assert_eq!(r["snapshot"], id.as_str());
    assert_eq!(r["dry_run"], false);
    assert_eq!(r["files"], src.lib.original_files as u64);
    assert_eq!(r["files_restored"], src.lib.original_files as u64);
    assert_eq!(r["files_already_present"], 0);
    assert_eq!(r["rows_match"], true, "{r}");
    let checks = r["row_checks"].as_array().unwrap();
    assert_eq!(checks.len(), m.database.row_counts.len(), "{r}");
    for c in checks {
        assert!(c["expected"].is_u64(), "{c}");
        assert_eq!(c["expected"], c["actual"], "{c}");
    }

    // The database and the files are identical.
    assert!(
        src.dump() == fresh.canonical_dump(DB).unwrap(),
        "pg_dump differs"
    );
    assert_eq!(
        count_rows(&fresh, "asset"),
        count_rows(&src.cluster, "asset")
    );
    let diff = demo::compare_trees(&src.upload, &target, &original_folders()).unwrap();
    assert!(diff.differences.is_empty(), "{:?}", diff.differences);
    assert_eq!(diff.compared, listed.len());

    // Immich's six folders exist with their marker; the generated ones hold nothing else.
    for f in ORIGINAL_FOLDERS.iter().chain(GENERATED_FOLDERS.iter()) {
        assert!(target.join(f).join(MARKER_FILE).is_file(), "{f}/.immich");
    }
    for g in GENERATED_FOLDERS {
        let names: Vec<_> = fs::read_dir(target.join(g))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, [MARKER_FILE], "{g}");
    }
    assert!(partial_files(&target).is_empty());
}

// ---------------------------------------------------------------------------------------------------
// 2. incremental

#[test]
fn second_backup_stores_only_the_new_photo_and_the_cache_is_only_an_optimisation() {
    let src = Source::new(ASSETS);
    let config = src.write_config("config.toml");
    // Files changed within seconds of a backup are read again by the next one: these must not be.
    wait_until_settled();

    let first = cli(Some(&config), &["--json", "backup"], &[]);
    let first = first.expect_code(exit::OK).json();
    let before = data_objects(&src.store);
    // Every distinct content stored once.
    let files = original_files(&src.upload);
    let distinct: BTreeSet<String> = files.values().map(|b| object_key(&src, b)).collect();
    assert_eq!(before.keys().cloned().collect::<BTreeSet<_>>(), distinct);
    assert_eq!(first["files_new"], distinct.len() as u64, "{first}");
    assert_eq!(
        first["files_deduplicated"],
        (files.len() - distinct.len()) as u64,
        "{first}"
    );
    assert_eq!(first["files_unchanged"], 0);

    // Add one photo.
    let size = 300_000usize;
    let photo =
        sample::add_photo(&src.upload, "library/admin/2025/IMG_9001.jpg", size, 9001).unwrap();
    let photo_key = object_key(&src, &fs::read(&photo).unwrap());
    let second = cli(Some(&config), &["--json", "backup"], &[]);
    let second = second.expect_code(exit::OK).json();
    let after = data_objects(&src.store);
    assert_eq!(after.len(), before.len() + 1);
    let new: Vec<&String> = after.keys().filter(|k| !before.contains_key(*k)).collect();
    assert_eq!(new, [&photo_key]);
    assert_eq!(second["files"], files.len() as u64 + 1);
    assert_eq!(second["files_new"], 1, "{second}");
    // Everything else came from the metadata cache, unread.
    assert_eq!(second["files_unchanged"], files.len() as u64, "{second}");
    assert_eq!(second["bytes_read"], size as u64, "{second}");
    let stored = second["bytes_stored"].as_u64().unwrap();
    assert_eq!(stored, after[&photo_key], "report vs object size");
    // age: a header of a few hundred bytes, a 16-byte nonce, a 16-byte tag per 64 KiB chunk.
    let chunks = size.div_ceil(64 * 1024) as u64;
    assert!(
        stored > size as u64 && stored <= size as u64 + 16 * chunks + 16 + 512,
        "stored {stored} for a {size}-byte photo"
    );

    // Third backup without the local cache: everything is read again, nothing is uploaded.
    fs::remove_dir_all(&src.cache).unwrap();
    let third = cli(Some(&config), &["--json", "backup"], &[]);
    let third = third.expect_code(exit::OK).json();
    assert_eq!(third["files_new"], 0, "{third}");
    assert_eq!(third["files_unchanged"], 0, "{third}");
    assert_eq!(third["files_deduplicated"], third["files"], "{third}");
    assert_eq!(third["bytes_stored"], 0, "{third}");
    assert_eq!(third["bytes_read"], third["bytes_total"], "{third}");
    assert_eq!(data_objects(&src.store), after);

    // Three complete snapshots, listed without the identity.
    let snaps = cli(Some(&config), &["--json", "snapshots"], &[]);
    let snaps = snaps.expect_code(exit::OK).json();
    let ids: Vec<&str> = snaps
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap())
        .collect();
    assert_eq!(
        ids,
        [&first, &second, &third].map(|r| r["snapshot"].as_str().unwrap())
    );
    assert_eq!(snaps[1]["summary"]["bytes_added"], stored);
    assert_eq!(snaps[2]["summary"]["bytes_added"], 0);
}

// ---------------------------------------------------------------------------------------------------
// 3. fresh-install checks

/// Copy `rel` from `from` to `to` as an interrupted restore would have left it (mode and mtime too).
fn copy_as_restored(from: &Path, to: &Path, rel: &str) {
    let (src, dst) = (from.join(rel), to.join(rel));
    fs::create_dir_all(dst.parent().unwrap()).unwrap();
    fs::copy(&src, &dst).unwrap();
    let meta = fs::metadata(&src).unwrap();
    fs::set_permissions(&dst, meta.permissions()).unwrap();
    fs::File::options()
        .write(true)
        .open(&dst)
        .unwrap()
        .set_modified(meta.modified().unwrap())
        .unwrap();
}

#[test]
fn restore_refuses_a_used_target_writes_nothing_and_resumes() {
    let src = Source::new(ASSETS);
    src.backup_lib();
    let fresh = start_cluster();

    // --dry-run on a fresh target: fine, and nothing is written.
    let target = src.work.path().join("target");
    let rconfig = src.write_restore_config("restore.toml", &fresh, &target);
    let run = cli(
        Some(&rconfig),
        &restore_args(&src.identity, &["--dry-run"]),
        &[],
    );
    let plan = run.expect_code(exit::OK).json();
    assert_eq!(plan["dry_run"], true);
    assert_eq!(plan["files"], src.lib.original_files as u64);
    assert_eq!(plan["files_already_present"], 0);
    assert!(!target.exists(), "dry run created the target");
    assert!(!database_exists(&fresh, DB), "dry run created the database");

    // A target holding a different file at a snapshot path, or a file the snapshot lacks: refused.
    let changed = asset_original_path(1);
    for (name, rel, seed) in [
        ("different", changed.as_str(), 1u64),
        ("extra", "library/admin/2024/not in the snapshot.jpg", 2),
    ] {
        let folder = src.work.path().join(name);
        sample::add_photo(&folder, rel, 1_000, seed).unwrap();
        let state = tree_state(&folder);
        let args = restore_args(&src.identity, &["--target", path_arg(&folder)]);
        let run = cli(Some(&rconfig), &args, &[QUIET]);
        run.expect_code(exit::NOT_FRESH);
        assert_one_line_error(&run, rel);
        assert_eq!(tree_state(&folder), state, "{name}: the folder changed");
        assert!(
            !database_exists(&fresh, DB),
            "{name}: the database was written"
        );
    }

    // A resumed restore: the target already holds some files exactly as a restore writes them.
    let big = "library/admin/2022/VID_0003.mov";
    for rel in [big, "library/admin/Été 2024/café ☕.jpg", changed.as_str()] {
        copy_as_restored(&src.upload, &target, rel);
    }
    let run = cli(Some(&rconfig), &restore_args(&src.identity, &[]), &[]);
    let r = run.expect_code(exit::OK).json();
    assert_eq!(r["files_already_present"], 3, "{r}");
    assert_eq!(
        r["files_restored"],
        src.lib.original_files as u64 - 3,
        "{r}"
    );
    assert_eq!(r["rows_match"], true, "{r}");
    let diff = demo::compare_trees(&src.upload, &target, &original_folders()).unwrap();
    assert!(diff.differences.is_empty(), "{:?}", diff.differences);
    let restored_dump = fresh.canonical_dump(DB).unwrap();
    assert!(src.dump() == restored_dump, "pg_dump differs");

    // Restoring again into the same (now used) database: refused, naming the tables; nothing written.
    let again = src.work.path().join("again");
    let args = restore_args(&src.identity, &["--target", path_arg(&again)]);
    let run = cli(Some(&rconfig), &args, &[QUIET]);
    run.expect_code(exit::NOT_FRESH);
    assert_one_line_error(&run, "kysely_migrations");
    assert!(run.stderr.contains("asset"), "{}", run.stderr);
    assert!(!again.exists(), "the refused restore created the target");
    assert!(
        fresh.canonical_dump(DB).unwrap() == restored_dump,
        "the refused restore changed the database"
    );
    // The --json error is machine-readable too.
    let err = run.json();
    assert_eq!(err["exit_code"], exit::NOT_FRESH);
}

// ---------------------------------------------------------------------------------------------------
// 4. wrong identity, tampered and missing objects

#[test]
fn wrong_identity_tampered_and_missing_objects_fail_with_the_documented_codes() {
    let src = Source::new(ASSETS);
    let id = src.backup_lib().snapshot;
    let fresh = start_cluster();
    let m = manifest(&src.store, &src.identity, &id);

    // Another identity.
    let other = src.work.path().join("other-identity.txt");
    cli(None, &["keygen", "-o", path_arg(&other)], &[]).expect_code(exit::OK);
    let target = src.work.path().join("t-wrong-key");
    let rconfig = src.write_restore_config("restore.toml", &fresh, &target);
    let run = cli(Some(&rconfig), &restore_args(&other, &[]), &[QUIET]);
    run.expect_code(exit::WRONG_KEY);
    assert_one_line_error(&run, &format!("snapshots/{id}/manifest.json.age"));
    assert!(!target.exists());
    assert!(!database_exists(&fresh, DB));

    // The dump object tampered with, then truncated: refused before anything is written.
    let dump_path = src.store.join(&m.dump.key);
    let dump_orig = fs::read(&dump_path).unwrap();
    for how in ["flipped byte", "truncated"] {
        if how == "truncated" {
            fs::write(&dump_path, &dump_orig[..dump_orig.len() / 2]).unwrap();
        } else {
            flip_middle_byte(&dump_path);
        }
        let target = src.work.path().join("t-dump");
        let args = restore_args(&src.identity, &["--target", path_arg(&target)]);
        let run = cli(Some(&rconfig), &args, &[QUIET]);
        run.expect_code(exit::INTEGRITY);
        assert_one_line_error(&run, &m.dump.key);
        assert!(!target.exists(), "{how}");
        assert!(!database_exists(&fresh, DB), "{how}");
        fs::write(&dump_path, &dump_orig).unwrap();
    }

    // A content object bigger than one age chunk, tampered with in the middle, and another one
    // missing: every other file is restored, and the two are listed (exit 4).
    let pano = "library/admin/2023/PANO_0001.jpg";
    let pano_key = object_key(&src, &fs::read(src.upload.join(pano)).unwrap());
    let pano_obj = src.store.join(&pano_key);
    assert!(fs::metadata(&pano_obj).unwrap().len() > 64 * 1024);
    flip_middle_byte(&pano_obj);
    let vid = "library/admin/2023/VID_0002.mp4";
    let vid_key = object_key(&src, &fs::read(src.upload.join(vid)).unwrap());
    fs::remove_file(src.store.join(&vid_key)).unwrap();
    let target = src.work.path().join("t-damaged");
    let args = restore_args(&src.identity, &["--target", path_arg(&target)]);
    let run = cli(Some(&rconfig), &args, &[]);
    let r = run.expect_code(exit::DAMAGED).json();
    let damaged = r["damaged"].as_array().unwrap();
    let listed: Vec<(&str, &str)> = damaged
        .iter()
        .map(|d| (d["path"].as_str().unwrap(), d["object"].as_str().unwrap()))
        .collect();
    assert_eq!(
        listed,
        vec![(pano, pano_key.as_str()), (vid, vid_key.as_str())],
        "{r}"
    );
    assert!(
        damaged[1]["reason"].as_str().unwrap().contains("missing"),
        "{r}"
    );
    assert_eq!(damaged[0]["also_in"], serde_json::json!([id]), "{r}");
    assert_eq!(
        r["files_restored"],
        src.lib.original_files as u64 - 2,
        "{r}"
    );
    assert_eq!(r["rows_match"], true, "{r}");
    for rel in [pano, vid] {
        assert!(
            fs::symlink_metadata(target.join(rel)).is_err(),
            "{rel} was written"
        );
    }
    assert_eq!(partial_files(&target), Vec::<PathBuf>::new());
    let diff = demo::compare_trees(&src.upload, &target, &original_folders()).unwrap();
    assert_eq!(diff.differences.len(), 2, "{:?}", diff.differences);
    assert!(
        target.join("thumbs").join(MARKER_FILE).exists(),
        "the markers are made whatever failed"
    );
    // The restore's state stays, so that a run after a repair finishes the files and skips the
    // database it already restored.
    assert!(target.join(".immich-backup-restore.json").exists());
    fs::write(&pano_obj, {
        let mut b = fs::read(&pano_obj).unwrap();
        let mid = b.len() / 2;
        b[mid] ^= 0x55;
        b
    })
    .unwrap();
    let vid_sealed = {
        let out = std::process::Command::new("age")
            .args(["-r", &sealing_recipient(&src)])
            .arg(src.upload.join(vid))
            .output()
            .unwrap();
        assert!(out.status.success());
        out.stdout
    };
    fs::write(src.store.join(&vid_key), vid_sealed).unwrap();
    let run = cli(Some(&rconfig), &args, &[]);
    let r = run.expect_code(exit::OK).json();
    assert_eq!(r["database_resumed"], true, "{r}");
    assert_eq!(r["files_restored"], 2, "{r}");
    let diff = demo::compare_trees(&src.upload, &target, &original_folders()).unwrap();
    assert!(diff.differences.is_empty(), "{:?}", diff.differences);
    assert!(!target.join(".immich-backup-restore.json").exists());
}

// ---------------------------------------------------------------------------------------------------
// 5. an interrupted backup

#[test]
fn killed_backup_leaves_no_snapshot_and_the_next_run_reuses_its_uploads() {
    let src = Source::new(ASSETS);
    // More files, so the backup is still running when it is seen uploading.
    for i in 0..40u64 {
        let rel = format!("upload/bulk/IMG_{i:04}.jpg");
        sample::add_photo(&src.upload, &rel, 256 * 1024, 10_000 + i).unwrap();
    }
    let config = src.write_config("config.toml");

    let mut child = command(Some(&config), &["backup"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(300);
    // Content is staged until the snapshot commits (docs/FORMAT.md): count both places.
    let stored = |store: &Path| {
        let mut all = data_objects(store);
        all.extend(staged_objects(store));
        all
    };
    while stored(&src.store).len() < 3 {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the backup ended ({status}) before it could be killed");
        }
        assert!(
            Instant::now() < deadline,
            "the backup never stored anything"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    child.kill().unwrap(); // SIGKILL
    let status = child.wait().unwrap();
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(9)
    );
    let at_kill = stored(&src.store);
    assert!(
        data_objects(&src.store).is_empty(),
        "nothing is published before the commit"
    );
    let files = original_files(&src.upload);
    eprintln!(
        "killed with {} of {} files' objects stored",
        at_kill.len(),
        files.len()
    );
    assert!(at_kill.len() < files.len());

    // No visible snapshot.
    assert_eq!(manifests(&src.store), Vec::<PathBuf>::new());
    let snaps = cli(Some(&config), &["--json", "snapshots"], &[]);
    assert_eq!(snaps.expect_code(exit::OK).json(), serde_json::json!([]));
    let run = cli(
        Some(&config),
        &restore_args(&src.identity, &["--dry-run"]),
        &[],
    );
    run.expect_code(exit::USAGE);

    // The next backup completes and reuses what was uploaded.
    let run = cli(Some(&config), &["--json", "backup"], &[]);
    let r = run.expect_code(exit::OK).json();
    let total = r["files"].as_u64().unwrap();
    let new = r["files_new"].as_u64().unwrap();
    assert_eq!(total, files.len() as u64);
    assert!(new < total, "{r}");
    assert!(
        r["files_deduplicated"].as_u64().unwrap() >= at_kill.len() as u64,
        "{r}"
    );
    let after = data_objects(&src.store);
    assert_eq!(after.len() as u64, at_kill.len() as u64 + new, "{r}");
    for (k, size) in &at_kill {
        assert_eq!(after.get(k), Some(size), "{k} changed");
    }
    assert_eq!(manifests(&src.store).len(), 1);
    let snaps = cli(Some(&config), &["--json", "snapshots"], &[]);
    let snaps = snaps.expect_code(exit::OK).json();
    assert_eq!(snaps.as_array().unwrap().len(), 1);
    assert_eq!(snaps[0]["id"], r["snapshot"]);

    // Every object the snapshot references (those the killed run wrote included) decrypts to its file.
    let id = r["snapshot"].as_str().unwrap();
    let ids = unlocked_in(&src.config().storage, &src.identity);
    let mut checked = 0;
    for e in file_list(&src.store, &src.identity, id) {
        let Some(content) = e.content else { continue };
        let sealed = fs::read(src.store.join(content.key())).unwrap();
        let mut plain = Vec::new();
        ids.decrypt(&sealed[..], &content.key())
            .unwrap()
            .read_to_end(&mut plain)
            .unwrap_or_else(|err| panic!("{}: {err}", e.path));
        assert!(
            plain == files[&e.path],
            "{} restores different bytes",
            e.path
        );
        checked += 1;
    }
    assert_eq!(checked, files.len());
}

#[test]
fn staged_uploads_of_an_earlier_boot_are_dropped_and_uploaded_again() {
    // A power cut cannot be made to happen here, so its leftover is written by hand: a staging
    // folder whose owner ran on this host under another boot id, holding an object for a real
    // photo whose bytes never reached the disk (here: garbage under the photo's address).
    let src = Source::new(ASSETS);
    let config = src.write_config("config.toml");
    cli(Some(&config), &["init"], &[]).expect_code(exit::OK);
    let files = original_files(&src.upload);
    let (rel, content) = files.iter().next().unwrap();
    let id = ContentId(*blake3::keyed_hash(&content_key(&src), content).as_bytes());
    let hex = id.to_string();
    let run = src.store.join("staging/20260101T000000.000Z-deadbeef");
    fs::create_dir_all(run.join(&hex[..2])).unwrap();
    fs::write(run.join(&hex[..2]).join(&hex), b"lost in the power cut").unwrap();
    let owner = serde_json::json!({
        "host": immich_backup::host::hostname(),
        "boot_id": "00000000-0000-0000-0000-000000000000",
        "pid": 1,
        "started": "2026-01-01T00:00:00Z",
    });
    fs::write(run.join("owner.json"), owner.to_string()).unwrap();

    let r = cli(Some(&config), &["--json", "backup"], &[]);
    let r = r.expect_code(exit::OK).json();
    assert!(!run.exists(), "the untrusted staging folder is removed");
    let distinct: BTreeSet<&Vec<u8>> = files.values().collect();
    assert_eq!(
        r["files_new"].as_u64().unwrap(),
        distinct.len() as u64,
        "{r}"
    );
    let sealed = fs::read(src.store.join(id.key())).unwrap();
    let mut plain = Vec::new();
    unlocked_in(&src.config().storage, &src.identity)
        .decrypt(&sealed[..], &id.key())
        .unwrap()
        .read_to_end(&mut plain)
        .unwrap();
    assert!(
        &plain == content,
        "{rel} is stored from the file, not the leftover"
    );
}

// ---------------------------------------------------------------------------------------------------
// 6. identities

fn age_keygen_text(id: &age::x25519::Identity) -> String {
    format!(
        "# created: 2025-06-01T10:00:00+02:00\n# public key: {}\n{}\n",
        id.to_public(),
        id.to_string().expose_secret()
    )
}

#[test]
fn keygen_age_keygen_and_passphrase_protected_identities() {
    let work = tempdir();

    // keygen: a 0600 identity file and its recipient.
    let key_file = work.path().join("keygen.txt");
    let run = cli(None, &["--json", "keygen", "-o", path_arg(&key_file)], &[]);
    let out = run.expect_code(exit::OK).json();
    let keygen_recipient = out["recipient"].as_str().unwrap().to_string();
    assert!(keygen_recipient.starts_with("age1"), "{out}");
    let mode = fs::metadata(&key_file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let text = fs::read(&key_file).unwrap();
    assert!(String::from_utf8_lossy(&text).contains("AGE-SECRET-KEY-1"));
    assert_eq!(
        crypto::recipient_of_identity_file(&key_file).unwrap(),
        Some(keygen_recipient.clone())
    );
    // ... never overwritten.
    let run = cli(None, &["keygen", "-o", path_arg(&key_file)], &[QUIET]);
    assert_ne!(run.code, exit::OK);
    assert_eq!(run.code, exit::USAGE, "{}", run.stderr);
    assert_one_line_error(&run, "already exists");
    assert_eq!(fs::read(&key_file).unwrap(), text);
    assert_eq!(
        fs::metadata(&key_file).unwrap().permissions().mode() & 0o777,
        0o600
    );

    // An identity file in age-keygen's format holding two keys (`age-keygen >> keys.txt` twice);
    // the snapshot is encrypted to the second.
    let decoy = age::x25519::Identity::generate();
    let keygen_style = age::x25519::Identity::generate();
    let keys_file = work.path().join("keys.txt");
    fs::write(
        &keys_file,
        age_keygen_text(&decoy) + &age_keygen_text(&keygen_style),
    )
    .unwrap();
    fs::set_permissions(&keys_file, fs::Permissions::from_mode(0o600)).unwrap();

    // A passphrase-protected identity file, as `age -p` makes it.
    let passphrase = "correct horse battery staple";
    let protected_id = age::x25519::Identity::generate();
    let encryptor = age::Encryptor::with_user_passphrase(SecretString::from(passphrase));
    let mut sealed = Vec::new();
    let mut w = encryptor.wrap_output(&mut sealed).unwrap();
    w.write_all(age_keygen_text(&protected_id).as_bytes())
        .unwrap();
    w.finish().unwrap();
    let protected_file = work.path().join("protected.age");
    fs::write(&protected_file, &sealed).unwrap();

    // The backup machine signs with the keys made from each identity (`signing-key`, on the
    // machine that keeps it), so that a restore with any of them trusts the snapshot.
    let mut signing = Vec::new();
    for (i, identity) in [&key_file, &keys_file, &protected_file].iter().enumerate() {
        let out = work.path().join(format!("signing-{i}.key"));
        let args = [
            "signing-key",
            "--identity",
            path_arg(identity),
            "-o",
            path_arg(&out),
        ];
        cli(
            None,
            &args,
            &[("IMMICH_BACKUP_PASSPHRASE", "correct horse battery staple")],
        )
        .expect_code(exit::OK);
        assert_eq!(
            fs::metadata(&out).unwrap().permissions().mode() & 0o777,
            0o600
        );
        for line in fs::read_to_string(&out).unwrap().lines() {
            if line.starts_with("IMMICH-BACKUP-SIGNING-KEY-1") {
                signing.push(line.to_string());
            }
        }
    }
    assert_eq!(signing.len(), 4, "keys.txt holds two identities");

    // A backup to the three public keys (not to the source's own identity).
    let src = Source::new(ASSETS);
    let mut toml = src.toml();
    toml.signing_key = Some(signing.join(","));
    toml.recipients = vec![
        keygen_recipient,
        keygen_style.to_public().to_string(),
        protected_id.to_public().to_string(),
    ];
    toml.identity = None;
    let config = toml.write(&src.work.path().join("config.toml"));
    cli(Some(&config), &["--json", "backup"], &[]).expect_code(exit::OK);

    let fresh = start_cluster();
    let target = src.work.path().join("target");
    let rconfig = src.write_restore_config("restore.toml", &fresh, &target);
    // The keygen and age-keygen identities decrypt it (a dry run decrypts manifest, file list and dump).
    for identity in [&key_file, &keys_file] {
        let run = cli(Some(&rconfig), &restore_args(identity, &["--dry-run"]), &[]);
        let plan = run.expect_code(exit::OK).json();
        assert_eq!(plan["dry_run"], true, "{}", identity.display());
    }
    // The source's identity is not a recipient.
    let run = cli(
        Some(&rconfig),
        &restore_args(&src.identity, &["--dry-run"]),
        &[QUIET],
    );
    run.expect_code(exit::WRONG_KEY);

    // The protected identity: a wrong passphrase is a wrong key; the right one restores.
    let run = cli(
        Some(&rconfig),
        &restore_args(&protected_file, &["--dry-run"]),
        &[QUIET, ("IMMICH_BACKUP_PASSPHRASE", "not the passphrase")],
    );
    assert_eq!(
        run.code,
        exit::WRONG_KEY,
        "stdout:\n{}\nstderr:\n{}",
        run.stdout,
        run.stderr
    );
    assert!(!target.exists());
    let run = cli(
        Some(&rconfig),
        &restore_args(&protected_file, &[]),
        &[("IMMICH_BACKUP_PASSPHRASE", passphrase)],
    );
    let r = run.expect_code(exit::OK).json();
    assert_eq!(r["rows_match"], true, "{r}");
    assert!(
        src.dump() == fresh.canonical_dump(DB).unwrap(),
        "pg_dump differs"
    );
    let diff = demo::compare_trees(&src.upload, &target, &original_folders()).unwrap();
    assert!(diff.differences.is_empty(), "{:?}", diff.differences);
}

// ---------------------------------------------------------------------------------------------------
// 7 and 8: a small install (empty Immich database, a few files) for config and policy tests

/// A cluster with an empty `immich` database, a small UPLOAD_LOCATION, a store and a key.
struct Small {
    cluster: PgCluster,
    upload: PathBuf,
    toml: ConfigToml,
    identity: PathBuf,
    work: tempfile::TempDir,
}

impl Small {
    fn new() -> Small {
        let work = tempdir();
        let cluster = start_cluster();
        cluster
            .psql("postgres", &format!("CREATE DATABASE {DB}"))
            .unwrap();
        cluster
            .psql(
                DB,
                "CREATE TABLE asset (id int); INSERT INTO asset VALUES (1), (2);",
            )
            .unwrap();
        let upload = work.path().join("upload");
        for f in ORIGINAL_FOLDERS {
            let marker = upload.join(f).join(MARKER_FILE);
            fs::create_dir_all(marker.parent().unwrap()).unwrap();
            fs::write(marker, f).unwrap();
        }
        sample::add_photo(&upload, "library/admin/2024/IMG_0001.jpg", 70_000, 1).unwrap();
        sample::add_photo(&upload, "upload/u1/aa/IMG_0002.jpg", 3_000, 2).unwrap();
        let store = work.path().join("store");
        fs::create_dir_all(&store).unwrap();
        let identity = work.path().join("identity.txt");
        let key = crypto::generate_key();
        crypto::write_identity_file(&identity, &key).unwrap();
        let toml = ConfigToml {
            port: cluster.port,
            bin_dir: cluster.bin_dir.clone(),
            upload_location: upload.clone(),
            store,
            storage: None,
            cache: work.path().join("cache"),
            signing_key: Some(signing_text(&key)),
            recipients: vec![key.recipient],
            identity: Some(identity.clone()),
            backup_extra: String::new(),
            extra: String::new(),
        };
        Small {
            cluster,
            upload,
            toml,
            identity,
            work,
        }
    }

    fn write(&self, name: &str) -> PathBuf {
        self.toml.write(&self.work.path().join(name))
    }

    fn snapshots(&self, config: &Path) -> Vec<serde_json::Value> {
        let run = cli(Some(config), &["--json", "snapshots"], &[]);
        run.expect_code(exit::OK).json().as_array().unwrap().clone()
    }
}

#[test]
fn config_env_override_and_bad_keys() {
    let mut small = Small::new();
    let real_port = small.cluster.port.to_string();
    // The file names a port nobody listens on.
    small.toml.port = 1;
    let config = small.write("config.toml");

    let run = cli(Some(&config), &["--json", "backup"], &[QUIET]);
    run.expect_code(exit::DATABASE);
    assert_eq!(run.json()["exit_code"], exit::DATABASE);
    assert_eq!(manifests(&small.toml.store), Vec::<PathBuf>::new());

    // IMMICH_BACKUP__DATABASE__PORT overrides it.
    let env = [("IMMICH_BACKUP__DATABASE__PORT", real_port.as_str())];
    let run = cli(Some(&config), &["--json", "backup"], &env);
    let r = run.expect_code(exit::OK).json();
    assert_eq!(r["files"], 5, "{r}");
    assert_eq!(r["row_counts"]["public.asset"], 2, "{r}");
    // ... also when the config comes from IMMICH_BACKUP_CONFIG.
    let mut cmd = command(None, &["--json", "snapshots"]);
    cmd.env("IMMICH_BACKUP_CONFIG", &config);
    let out = cmd.output().unwrap();
    assert!(out.status.success());
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(listed[0]["id"], r["snapshot"]);

    // Bad keys and values: exit 2 with a one-line message naming the problem.
    let base = small.toml.text();
    let cases = [
        (
            "unknown key",
            base.replace("port = 1\n", "prot = 1\n"),
            "prot",
            vec![],
        ),
        (
            "unknown section",
            format!("{base}\n[databse]\nport = 5432\n"),
            "databse",
            vec![],
        ),
        (
            "wrong type",
            base.replace("port = 1\n", "port = \"fifty\"\n"),
            "port",
            vec![],
        ),
        (
            "bad enum value",
            base.replace("mode = \"local\"", "mode = \"lokal\""),
            "lokal",
            vec![],
        ),
        (
            "unknown key in the environment",
            base.clone(),
            "prot",
            vec![("IMMICH_BACKUP__DATABASE__PROT", "5432")],
        ),
    ];
    for (what, text, needle, env) in cases {
        let path = small.work.path().join("bad.toml");
        fs::write(&path, text).unwrap();
        let mut env = env;
        env.push(QUIET);
        let run = cli(Some(&path), &["snapshots"], &env);
        assert_eq!(
            run.code,
            exit::USAGE,
            "{what}: stdout:\n{}\nstderr:\n{}",
            run.stdout,
            run.stderr
        );
        assert_one_line_error(&run, needle);
    }
    // A missing config file too.
    let missing = small.work.path().join("missing.toml");
    let run = cli(Some(&missing), &["snapshots"], &[QUIET]);
    run.expect_code(exit::USAGE);
    assert_one_line_error(&run, "missing.toml");
}

fn mkfifo(path: &Path) {
    let c = CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: a NUL-terminated path and a mode.
    let rc = unsafe { libc::mkfifo(c.as_ptr(), 0o644) };
    assert_eq!(rc, 0, "mkfifo: {}", std::io::Error::last_os_error());
}

#[test]
fn unreadable_files_are_recorded_as_skipped_or_fail_the_backup() {
    let small = Small::new();
    // Tests run as root in CI, where permission bits do not stop reads; a FIFO is unreadable for a
    // backup whoever runs it (not a regular file, and reading it would block).
    let fifo = "library/admin/2024/stuck.fifo";
    mkfifo(&small.upload.join(fifo));
    let mut unreadable = vec![fifo.to_string()];
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        let locked = "upload/u1/aa/locked.jpg";
        let p = sample::add_photo(&small.upload, locked, 1_000, 3).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o000)).unwrap();
        unreadable.push(locked.to_string());
    }
    unreadable.sort();

    // Default policy (warn): the snapshot is made, records the files, and the exit code says partial.
    let config = small.write("config.toml");
    let run = cli(Some(&config), &["--json", "backup"], &[]);
    let r = run.expect_code(exit::PARTIAL).json();
    let mut skipped: Vec<String> = r["skipped"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["path"].as_str().unwrap().to_string())
        .collect();
    skipped.sort();
    assert_eq!(skipped, unreadable, "{r}");
    assert!(
        r["skipped"][0]["error"]
            .as_str()
            .unwrap()
            .contains("not a regular file"),
        "{r}"
    );
    assert_eq!(r["files"], 5, "{r}");
    let snaps = small.snapshots(&config);
    assert_eq!(snaps.len(), 1);
    assert_eq!(snaps[0]["summary"]["skipped"], unreadable.len() as u64);
    let id = r["snapshot"].as_str().unwrap();
    let m = manifest(&small.toml.store, &small.identity, id);
    let mut recorded: Vec<String> = m.skipped.iter().map(|s| s.path.clone()).collect();
    recorded.sort();
    assert_eq!(recorded, unreadable);
    assert!(file_list(&small.toml.store, &small.identity, id)
        .iter()
        .all(|e| e.path != fifo));
    // The human output warns too.
    let run = cli(Some(&config), &["backup"], &[QUIET]);
    run.expect_code(exit::PARTIAL);
    assert!(run.stdout.contains("could not be read"), "{}", run.stdout);
    assert!(run.stdout.contains(fifo), "{}", run.stdout);

    // on_unreadable = "fail": the backup fails, names the file, and makes no snapshot.
    let mut toml = small.toml;
    toml.backup_extra = "on_unreadable = \"fail\"\n".into();
    let strict = toml.write(&small.work.path().join("strict.toml"));
    let before = manifests(&toml.store);
    let run = cli(Some(&strict), &["backup"], &[QUIET]);
    assert_ne!(run.code, exit::OK);
    assert_ne!(run.code, exit::PARTIAL);
    assert_one_line_error(&run, &unreadable[0]);
    assert_eq!(manifests(&toml.store), before);
    let run = cli(Some(&strict), &["--json", "snapshots"], &[]);
    assert_eq!(
        run.expect_code(exit::OK).json().as_array().unwrap().len(),
        2
    );
}

// ---------------------------------------------------------------------------------------------------
// 7. the storage format: plain age files

/// `age -d -i identity object`: the reference `age` command (Debian's `age` package; .ci/run
/// installs it).
fn age_decrypt(identity: &Path, object: &Path) -> Vec<u8> {
    let out = std::process::Command::new("age")
        .arg("-d")
        .arg("-i")
        .arg(identity)
        .arg(object)
        .output()
        .expect("the `age` command (apt-get install age) decrypts objects in this test");
    assert!(
        out.status.success(),
        "age -d {}: {}",
        object.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

#[test]
fn every_object_is_a_plain_age_file_the_age_command_decrypts() {
    let src = Source::new(ASSETS);
    let config = src.write_config("config.toml");
    let rep = cli(Some(&config), &["--json", "backup"], &[]);
    let id = rep.expect_code(exit::OK).json()["snapshot"]
        .as_str()
        .unwrap()
        .to_string();
    // Format 2, by hand (docs/FORMAT.md): the identity opens a key file, whose plaintext is the
    // repository key as an identity file; that opens every object. The identity alone opens none.
    let repo_key = repository_identity_by_hand(&src, &src.work.path().join("repository-key.txt"));
    let any = src
        .store
        .join("snapshots")
        .join(&id)
        .join("manifest.json.age");
    let alone = std::process::Command::new("age")
        .arg("-d")
        .arg("-i")
        .arg(&src.identity)
        .arg(&any)
        .output()
        .unwrap();
    assert!(!alone.status.success(), "sealed to the repository key only");
    // Each photo's object decrypts to the photo.
    for (path, bytes) in original_files(&src.upload) {
        let object = src.store.join(object_key(&src, &bytes));
        assert!(age_decrypt(&repo_key, &object) == bytes, "{path}");
    }
    // The dump is a gzip stream of pg_dumpall's output; the file list is gzipped JSON lines.
    let snap = src.store.join("snapshots").join(&id);
    let mut sql = String::new();
    flate2::read::GzDecoder::new(&age_decrypt(&repo_key, &snap.join("dump.sql.gz.age"))[..])
        .read_to_string(&mut sql)
        .unwrap();
    assert!(
        sql.contains("PostgreSQL database cluster dump"),
        "{sql:.200}"
    );
    assert!(sql.contains(&format!("\\connect {DB}")));
    let mut list = String::new();
    flate2::read::GzDecoder::new(&age_decrypt(&repo_key, &snap.join("files.jsonl.gz.age"))[..])
        .read_to_string(&mut list)
        .unwrap();
    assert_eq!(list.lines().count(), original_paths(&src.upload).len());
    let manifest: serde_json::Value =
        serde_json::from_slice(&age_decrypt(&repo_key, &snap.join("manifest.json.age"))).unwrap();
    assert_eq!(manifest["id"], id.as_str());
    // The manifest and the plaintext summary name the key folder; the content key is derived
    // from the repository key's public half as FORMAT.md says.
    let summary: serde_json::Value =
        serde_json::from_slice(&fs::read(snap.join("summary.json")).unwrap()).unwrap();
    let folder = manifest["repository_key"].as_str().unwrap();
    assert_eq!(summary["repository_key"], folder);
    assert!(src.store.join("keys").join(folder).is_dir());
    let public = sealing_recipient(&src);
    assert_eq!(
        manifest["content_key"],
        hex::encode(blake3::derive_key(
            "immich-backup 2026-11 content address key v1",
            public.as_bytes()
        ))
    );
    assert!(fs::read_to_string(&repo_key).unwrap().contains(&public));
}

/// `demo --dir` into a folder that holds anything (an earlier demo) is refused with what to do,
/// before anything is written there.
#[test]
fn demo_refuses_a_folder_that_is_not_empty() {
    let dir = tempdir();
    std::fs::write(dir.path().join("earlier.txt"), b"x").unwrap();
    let run = cli(None, &["demo", "--dir", path_arg(dir.path())], &[]);
    run.expect_code(exit::USAGE);
    assert!(run.stderr.contains("not empty"), "{}", run.stderr);
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
}
