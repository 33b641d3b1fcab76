//! Issue 12: a restore replays only what this repository's backup machine wrote, writes only inside
//! its target, and is not stopped by damage. Tried as an attacker would: with write access to the
//! store and the public recipient (it is in the config), forged objects are made exactly as `age -r`,
//! gzip and sha256sum would make them (the library's own encryption to the public recipient is that
//! same age file), against real PostgreSQL clusters and a folder store.

mod common;

use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;
use flate2::write::GzEncoder;
use immich_backup::crypto::sign::{self, SignatureFile, SigningKey, Statement};
use immich_backup::crypto::Recipients;
use immich_backup::demo::sample::{self, PgCluster, MARKER_FILE};
use immich_backup::error::exit;
use immich_backup::format::{
    ContentId, Entry, EntryKind, Manifest, ObjectRef, Summary, MANIFEST_FORMAT,
};
use sha2::Digest;

/// A marker file outside everything, which a forged dump tries to create.
fn pwned_marker(work: &Path) -> PathBuf {
    work.join(format!("pwned-{}", rand::random::<u32>()))
}

/// What an attacker with write access to the store and the public recipient can write.
struct Forger {
    store: PathBuf,
    recipients: Recipients,
}

impl Forger {
    fn new(src: &Source) -> Forger {
        Forger {
            store: src.store.clone(),
            recipients: Recipients::load(std::slice::from_ref(&src.recipient), None).unwrap(),
        }
    }

    /// `age -r RECIPIENT` of `plain`.
    fn seal(&self, plain: &[u8]) -> Vec<u8> {
        let mut w = self.recipients.encrypt(Vec::new()).unwrap();
        w.write_all(plain).unwrap();
        w.finish().unwrap()
    }

    fn gzip(plain: &[u8]) -> Vec<u8> {
        let mut gz = GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(plain).unwrap();
        gz.finish().unwrap()
    }

    fn put(&self, key: &str, bytes: &[u8]) {
        let path = self.store.join(key);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, bytes).unwrap();
    }

    /// A content object for `bytes`, named as the backup machine would name it.
    fn content(&self, bytes: &[u8]) -> ContentId {
        let id = ContentId(*blake3::keyed_hash(&self.recipients.content_key(), bytes).as_bytes());
        self.put(&id.key(), &self.seal(bytes));
        id
    }

    /// A complete snapshot `id`: `dump_sql` as its dump, `entries` as its file list; signed with
    /// `signer` when given (a key the attacker made). Returns the id.
    fn snapshot(
        &self,
        id: &str,
        dump_sql: &[u8],
        entries: &[Entry],
        signer: Option<&SigningKey>,
    ) -> String {
        let time = chrono::Utc::now();
        let dump_gz = Self::gzip(dump_sql);
        let dump_key = format!("snapshots/{id}/dump.sql.gz.age");
        self.put(&dump_key, &self.seal(&dump_gz));
        let mut list = Vec::new();
        for e in entries {
            serde_json::to_writer(&mut list, e).unwrap();
            list.push(b'\n');
        }
        let list_gz = Self::gzip(&list);
        let files_key = format!("snapshots/{id}/files.jsonl.gz.age");
        self.put(&files_key, &self.seal(&list_gz));
        let refs = Self::gzip(b"");
        self.put(&format!("snapshots/{id}/refs.txt.gz"), &refs);
        let summary = Summary {
            id: id.into(),
            time,
            host: "forged".into(),
            tool_version: "0.1.0".into(),
            files: entries.len() as u64,
            bytes: 0,
            bytes_added: 0,
            repository_key: None,
            dump_bytes: dump_gz.len() as u64,
            skipped: 0,
            consistency: None,
        };
        let summary = serde_json::to_vec(&summary).unwrap();
        self.put(&format!("snapshots/{id}/summary.json"), &summary);
        let manifest = Manifest {
            format: MANIFEST_FORMAT,
            id: id.into(),
            time,
            host: "forged".into(),
            tool_version: "0.1.0".into(),
            content_key: hex::encode(self.recipients.content_key()),
            repository_key: None,
            upload_location: "/srv/immich/library".into(),
            folders: vec!["library".into(), "upload".into(), "profile".into()],
            database: Default::default(),
            dump: object(&dump_key, &dump_gz),
            files: object(&files_key, &list_gz),
            totals: Default::default(),
            skipped: Vec::new(),
            external_libraries: Vec::new(),
            consistency: None,
        };
        let mut manifest = manifest;
        manifest.database.database = DB.into();
        manifest.database.username = "postgres".into();
        manifest.database.server_version_num = 150000;
        let sealed = self.seal(&serde_json::to_vec(&manifest).unwrap());
        if let Some(key) = signer {
            let st = Statement {
                id: id.into(),
                time,
                manifest_sha256: sign::sha256_hex(&sealed),
                summary_sha256: sign::sha256_hex(&summary),
                refs_sha256: sign::sha256_hex(&refs),
            };
            let file = SignatureFile::sign(&st, std::slice::from_ref(key));
            self.put(
                &format!("snapshots/{id}/signature.json"),
                &serde_json::to_vec(&file).unwrap(),
            );
        }
        self.put(&format!("snapshots/{id}/manifest.json.age"), &sealed);
        id.to_string()
    }
}

fn object(key: &str, plain: &[u8]) -> ObjectRef {
    ObjectRef {
        key: key.into(),
        size: plain.len() as u64,
        sha256: hex::encode(sha2::Sha256::digest(plain)),
        header_mac: None,
    }
}

/// A snapshot id later than every real one.
fn later_id(n: u32) -> String {
    format!("29991231T2359{n:02}.000Z-0000000{n}")
}

fn entry(path: &str, kind: EntryKind, mode: u32) -> Entry {
    Entry {
        path: path.into(),
        kind,
        size: 0,
        mtime_ns: 1_600_000_000_000_000_000,
        mode,
        content: None,
        target: None,
        uid: None,
        gid: None,
    }
}

/// The head of a real `pg_dumpall --clean --if-exists` dump, then `evil`.
fn dump_with(evil: &str) -> Vec<u8> {
    format!(
        "--\n-- PostgreSQL database cluster dump\n--\n\nSET default_transaction_read_only = off;\n\n\
         SET client_encoding = 'UTF8';\nSET standard_conforming_strings = on;\n\n\
         CREATE ROLE forged;\n{evil}\n"
    )
    .into_bytes()
}

#[test]
fn a_forged_snapshot_is_never_restored_and_never_runs_a_command() {
    let src = Source::new(ASSETS);
    let genuine = src.backup_lib().snapshot;
    let forger = Forger::new(&src);
    let marker = pwned_marker(src.work.path());
    let touch = format!("\\! touch {}", marker.display());
    let fresh = PgCluster::start(None).unwrap();
    let target = src.work.path().join("target");
    let rconfig = src.write_restore_config("restore.toml", &fresh, &target);

    // 1. Unsigned, newer than the real one: `latest` skips it (saying so) and restores the real one.
    let forged = forger.snapshot(&later_id(1), &dump_with(&touch), &[], None);
    // 2. Signed by a key the attacker made: not trusted either.
    let attacker_key = SigningKey::from_seed([7u8; 32]);
    let forged_signed = forger.snapshot(&later_id(2), &dump_with(&touch), &[], Some(&attacker_key));
    for id in [&forged, &forged_signed] {
        let other = src.work.path().join(format!("t-{id}"));
        let args = restore_args(&src.identity, &[id, "--target", path_arg(&other)]);
        let run = cli(Some(&rconfig), &args, &[("IMMICH_BACKUP_LOG", "off")]);
        run.expect_code(exit::INTEGRITY);
        assert!(run.stderr.contains("cannot be trusted"), "{}", run.stderr);
        assert!(!other.exists(), "the refused restore wrote its target");
        assert!(!database_exists(&fresh, DB));
    }
    // Even told to accept unsigned snapshots, the forged dump's `\!` never reaches psql.
    let other = src.work.path().join("t-unsigned");
    let args = restore_args(
        &src.identity,
        &[&forged, "--allow-unsigned", "--target", path_arg(&other)],
    );
    let run = cli(Some(&rconfig), &args, &[("IMMICH_BACKUP_LOG", "off")]);
    run.expect_code(exit::INTEGRITY);
    assert!(
        run.stderr.contains("pg_dumpall never writes") && run.stderr.contains("line 11"),
        "{}",
        run.stderr
    );
    assert!(!other.exists() && !database_exists(&fresh, DB));
    assert!(!marker.exists(), "the forged dump ran a command");

    // The backup machine sees which snapshots its key signed, without the identity.
    let config = src.write_config("config.toml");
    let run = cli(Some(&config), &["--json", "snapshots"], &[]);
    let listed = run.expect_code(exit::OK).json();
    let status = |id: &str| {
        listed
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["id"] == id)
            .map(|s| s["signature"].as_str().unwrap().to_string())
            .unwrap()
    };
    assert_eq!(status(&genuine), "trusted", "{listed}");
    assert_eq!(status(&forged), "unsigned", "{listed}");
    assert_eq!(status(&forged_signed), "untrusted", "{listed}");

    // `latest` is the newest snapshot that is genuinely ours.
    let run = cli(
        Some(&rconfig),
        &restore_args(&src.identity, &["latest"]),
        &[],
    );
    let r = run.expect_code(exit::OK).json();
    assert_eq!(r["snapshot"], genuine.as_str(), "{r}");
    assert!(r["signed_by"]
        .as_str()
        .unwrap()
        .starts_with("immich-verify1"));
    assert!(run.stderr.contains(&forged) && run.stderr.contains(&forged_signed));
    assert!(!marker.exists());
}

#[test]
fn forged_dumps_with_server_side_programs_or_garbage_are_refused_before_psql() {
    let src = Source::new(ASSETS);
    src.backup_lib();
    let forger = Forger::new(&src);
    let fresh = PgCluster::start(None).unwrap();
    let rconfig = src.write_restore_config("restore.toml", &fresh, &src.work.path().join("t"));
    let marker = pwned_marker(src.work.path());
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "copy to program",
            dump_with(&format!(
                "COPY (SELECT 1) TO PROGRAM 'touch {}';",
                marker.display()
            )),
            "line 11",
        ),
        (
            "a meta-command after SQL on one line",
            dump_with(&format!("SELECT 1; \\! touch {}", marker.display())),
            "line 11",
        ),
        (
            "a failing COPY whose data is a command",
            dump_with(&format!(
                "COPY nowhere.nothing (a) FROM stdin;\n\\! touch {}\n\\.",
                marker.display()
            )),
            "",
        ),
    ];
    for (n, (what, sql, line)) in cases.into_iter().enumerate() {
        let id = forger.snapshot(&later_id(n as u32 + 1), &sql, &[], None);
        let target = src.work.path().join(format!("t{n}"));
        let args = restore_args(
            &src.identity,
            &[&id, "--allow-unsigned", "--target", path_arg(&target)],
        );
        let run = cli(Some(&rconfig), &args, &[("IMMICH_BACKUP_LOG", "off")]);
        assert_ne!(run.code, exit::OK, "{what}: {}", run.stderr);
        assert!(!marker.exists(), "{what}: the forged dump ran a command");
        if !line.is_empty() {
            assert_eq!(run.code, exit::INTEGRITY, "{what}: {}", run.stderr);
            assert!(run.stderr.contains(line), "{what}: {}", run.stderr);
            assert!(!target.exists(), "{what}");
        }
    }
    // A dump that is not gzip at all: the corruption code, not "store unreachable".
    let id = later_id(9);
    forger.snapshot(&id, b"", &[], None);
    let key = format!("snapshots/{id}/dump.sql.gz.age");
    let garbage = b"this is not gzip".to_vec();
    forger.put(&key, &forger.seal(&garbage));
    let manifest_path = src.store.join(format!("snapshots/{id}/manifest.json.age"));
    let ids = immich_backup::crypto::Identities::load(&src.identity).unwrap();
    let mut m: Manifest = {
        let sealed = fs::read(&manifest_path).unwrap();
        let mut plain = Vec::new();
        std::io::Read::read_to_end(&mut ids.decrypt(&sealed[..], "m").unwrap(), &mut plain)
            .unwrap();
        serde_json::from_slice(&plain).unwrap()
    };
    m.dump = object(&key, &garbage);
    fs::write(
        &manifest_path,
        forger.seal(&serde_json::to_vec(&m).unwrap()),
    )
    .unwrap();
    let target = src.work.path().join("t-garbage");
    let args = restore_args(
        &src.identity,
        &[&id, "--allow-unsigned", "--target", path_arg(&target)],
    );
    let run = cli(Some(&rconfig), &args, &[("IMMICH_BACKUP_LOG", "off")]);
    run.expect_code(exit::INTEGRITY);
    assert!(run.stderr.contains("gzip"), "{}", run.stderr);
}

#[test]
fn an_old_snapshot_copied_under_a_newer_id_is_refused() {
    let src = Source::new(ASSETS);
    let first = src.backup_lib().snapshot;
    wait_until_settled();
    sample::add_photo(&src.upload, "library/admin/2024/NEW.jpg", 5_000, 77).unwrap();
    let second = src.backup_lib().snapshot;
    // The first snapshot's folder, copied under an id newer than the second.
    let copy = later_id(3);
    let from = src.store.join("snapshots").join(&first);
    let to = src.store.join("snapshots").join(&copy);
    fs::create_dir_all(&to).unwrap();
    for e in fs::read_dir(&from).unwrap() {
        let e = e.unwrap();
        fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
    let fresh = PgCluster::start(None).unwrap();
    let target = src.work.path().join("target");
    let rconfig = src.write_restore_config("restore.toml", &fresh, &target);
    let run = cli(
        Some(&rconfig),
        &restore_args(&src.identity, &[&copy, "--allow-unsigned"]),
        &[("IMMICH_BACKUP_LOG", "off")],
    );
    run.expect_code(exit::INTEGRITY);
    assert!(
        run.stderr.contains("copied under another name"),
        "{}",
        run.stderr
    );
    assert!(!target.exists());
    let run = cli(
        Some(&rconfig),
        &restore_args(&src.identity, &["--dry-run"]),
        &[],
    );
    let r = run.expect_code(exit::OK).json();
    assert_eq!(r["snapshot"], second.as_str(), "{r}");
}

#[test]
fn unsigned_stores_keep_working_loudly_and_special_modes_are_dropped() {
    let src = Source::new(ASSETS);
    // A setuid file and a sticky folder in the library (root runs the tests, as a restore would).
    let suid = "library/admin/2024/IMG_0001.jpg";
    fs::set_permissions(src.upload.join(suid), fs::Permissions::from_mode(0o6755)).unwrap();
    let sticky = "library/admin/2023";
    fs::set_permissions(src.upload.join(sticky), fs::Permissions::from_mode(0o1777)).unwrap();
    // A backup machine without a signing key: a new repository refuses to start unsigned.
    let mut toml = src.toml();
    toml.signing_key = None;
    let unsigned_config = toml.write(&src.work.path().join("unsigned.toml"));
    let quiet = [("IMMICH_BACKUP_LOG", "off")];
    let run = cli(Some(&unsigned_config), &["backup"], &quiet);
    run.expect_code(exit::USAGE);
    assert!(run.stderr.contains("signing_key_file"), "{}", run.stderr);
    // A store as 0.1 wrote it (format 1: no repository key; complete snapshots, none signed)
    // goes on unsigned, saying so at every backup.
    fs::create_dir_all(&src.store).unwrap();
    fs::write(
        src.store.join("immich-backup.json"),
        r#"{"format": 1, "id": "0123456789abcdef0123456789abcdef", "created": "2026-01-01T00:00:00Z", "tool": "immich-backup 0.1.0"}"#,
    )
    .unwrap();
    let first = src.backup_lib().snapshot;
    assert!(
        !src.store.join("keys").exists(),
        "format 1 until `key migrate`"
    );
    fs::remove_file(src.store.join(format!("snapshots/{first}/signature.json"))).unwrap();
    let run = cli(Some(&unsigned_config), &["--json", "backup"], &[]);
    let rep = run.expect_code(exit::OK).json();
    let old = rep["snapshot"].as_str().unwrap().to_string();
    assert_eq!(rep["signed"], false, "{rep}");
    assert!(run.stderr.contains("NOT signed"), "{}", run.stderr);

    // A store with no signed snapshot at all keeps working, loudly.
    let fresh = PgCluster::start(None).unwrap();
    let target = src.work.path().join("target");
    let rconfig = src.write_restore_config("restore.toml", &fresh, &target);
    let run = cli(Some(&rconfig), &restore_args(&src.identity, &[]), &[]);
    let r = run.expect_code(exit::OK).json();
    assert!(r["signed_by"].is_null(), "{r}");
    assert!(
        run.stderr.contains("no snapshot in this store is signed"),
        "{}",
        run.stderr
    );
    let mode = |p: PathBuf| fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode(target.join(suid)), 0o755, "setuid/setgid dropped");
    assert_eq!(mode(target.join(sticky)), 0o777, "sticky dropped");

    // Once the machine signs, an unsigned snapshot (old, or planted) needs --allow-unsigned, and
    // a backup without the key is refused.
    cli(Some(&src.write_config("signed.toml")), &["backup"], &[]).expect_code(exit::OK);
    let run = cli(Some(&unsigned_config), &["backup"], &quiet);
    run.expect_code(exit::USAGE);
    assert!(
        run.stderr.contains("snapshots are signed"),
        "{}",
        run.stderr
    );
    fresh
        .psql("postgres", &format!("DROP DATABASE {DB} WITH (FORCE)"))
        .unwrap();
    let kept = src.work.path().join("kept");
    let run = cli(
        Some(&rconfig),
        &restore_args(&src.identity, &[&old, "--target", path_arg(&kept)]),
        &[("IMMICH_BACKUP_LOG", "off")],
    );
    run.expect_code(exit::INTEGRITY);
    assert!(run.stderr.contains("--allow-unsigned"), "{}", run.stderr);
    assert!(!kept.exists());
    // With it (and --keep-special-modes) the old snapshot restores, special bits and all.
    let args = restore_args(
        &src.identity,
        &[
            &old,
            "--allow-unsigned",
            "--keep-special-modes",
            "--target",
            path_arg(&kept),
        ],
    );
    let run = cli(Some(&rconfig), &args, &[]);
    run.expect_code(exit::OK);
    assert!(run.stderr.contains("NOT signed"), "{}", run.stderr);
    assert_eq!(mode(kept.join(suid)), 0o6755);
    assert_eq!(mode(kept.join(sticky)), 0o1777);
}

#[test]
fn restore_writes_nothing_outside_its_target_through_symlinks() {
    let src = Source::new(ASSETS);
    src.backup_lib();
    let forger = Forger::new(&src);
    let outside = src.work.path().join("outside");
    fs::create_dir_all(&outside).unwrap();
    let before = tree_state(&outside);
    let fresh = PgCluster::start(None).unwrap();
    let rconfig = src.write_restore_config("restore.toml", &fresh, &src.work.path().join("x"));

    // A forged list: `library/evil → outside` with a folder and a file under it, and
    // `upload → outside` with a file under it. (The dump is a harmless empty one.)
    let photo = b"forged photo".to_vec();
    let id_photo = forger.content(&photo);
    let mut evil = entry("library/evil", EntryKind::Symlink, 0o777);
    evil.target = Some(outside.display().to_string());
    let mut upload = entry("upload", EntryKind::Symlink, 0o777);
    upload.target = Some(outside.display().to_string());
    let mut file = entry("library/evil/sub/x.jpg", EntryKind::File, 0o644);
    file.size = photo.len() as u64;
    file.content = Some(id_photo);
    let mut file2 = entry("upload/y.jpg", EntryKind::File, 0o644);
    file2.size = photo.len() as u64;
    file2.content = Some(id_photo);
    let entries = vec![
        entry("library", EntryKind::Dir, 0o755),
        evil,
        entry("library/evil/sub", EntryKind::Dir, 0o700),
        file,
        upload,
        file2,
    ];
    let id = forger.snapshot(&later_id(4), b"SELECT 1;\n", &entries, None);
    let target = src.work.path().join("t-forged");
    let args = restore_args(
        &src.identity,
        &[&id, "--allow-unsigned", "--target", path_arg(&target)],
    );
    let run = cli(Some(&rconfig), &args, &[]);
    assert!(
        run.code == exit::OK || run.code == exit::DATABASE,
        "{}",
        run.stderr
    );
    assert_eq!(
        tree_state(&outside),
        before,
        "restore wrote outside its target"
    );
    assert!(target.join("library/evil/sub/x.jpg").is_file());
    assert!(!fs::symlink_metadata(target.join("library/evil"))
        .unwrap()
        .file_type()
        .is_symlink());

    // The same forged list restored as a selection (files only, into any folder): nothing
    // through its symlinks either; nor through a symlink the target folder already holds.
    let selected = src.work.path().join("t-forged-selection");
    let args = restore_args(
        &src.identity,
        &[
            &id,
            "--allow-unsigned",
            "--include",
            "**",
            "--target",
            path_arg(&selected),
        ],
    );
    let run = cli(Some(&rconfig), &args, &[]);
    assert!(
        run.code == exit::OK || run.code == exit::PARTIAL,
        "{}",
        run.stderr
    );
    assert_eq!(
        tree_state(&outside),
        before,
        "a selection wrote outside its target"
    );
    assert!(selected.join("library/evil/sub/x.jpg").is_file());
    let planted = src.work.path().join("t-planted");
    fs::create_dir_all(&planted).unwrap();
    std::os::unix::fs::symlink(&outside, planted.join("library")).unwrap();
    let args = restore_args(
        &src.identity,
        &[
            "latest",
            "--include",
            "library/**",
            "--target",
            path_arg(&planted),
        ],
    );
    let run = cli(Some(&rconfig), &args, &[]);
    assert_ne!(run.code, exit::OK, "{}", run.stdout);
    assert!(
        run.stderr.contains("library: is not a folder"),
        "{}",
        run.stderr
    );
    assert_eq!(
        tree_state(&outside),
        before,
        "a selection wrote through a symlink in its target"
    );

    // A genuine snapshot into a target whose `thumbs` is a symlink to elsewhere: no marker is
    // written through it, and the restore says so.
    fresh
        .psql(
            "postgres",
            &format!("DROP DATABASE IF EXISTS {DB} WITH (FORCE)"),
        )
        .unwrap();
    let target = src.work.path().join("t-genuine");
    fs::create_dir_all(&target).unwrap();
    std::os::unix::fs::symlink(&outside, target.join("thumbs")).unwrap();
    let args = restore_args(&src.identity, &["latest", "--target", path_arg(&target)]);
    let run = cli(Some(&rconfig), &args, &[]);
    let r = run.expect_code(exit::OK).json();
    assert_eq!(
        tree_state(&outside),
        before,
        "a marker went through the symlink"
    );
    assert!(r["warnings"][0].as_str().unwrap().contains("thumbs"), "{r}");
    assert!(target.join("library").join(MARKER_FILE).is_file());
}

#[test]
fn paths_longer_than_path_max_are_backed_up_and_restored_with_the_markers() {
    let src = Source::new(ASSETS);
    // library/deep/ddd…/ddd…/photo.jpg, past 4096 bytes, made one folder at a time.
    let component = "d".repeat(200);
    let deep: Vec<&str> = std::iter::repeat_n(component.as_str(), 24).collect();
    let rel = format!("library/deep/{}", deep.join("/"));
    assert!(rel.len() > 4096);
    let photo = sample::photo_bytes(9, 70_000);
    let t = immich_backup::restore::target::Target::open(&src.upload, false)
        .unwrap()
        .unwrap();
    let folder = t.folder(&rel, true).unwrap().unwrap();
    assert!(folder
        .create_small(std::ffi::OsStr::new("photo.jpg"), &photo, 0o644)
        .unwrap());
    let run = cli(
        Some(&src.write_config("config.toml")),
        &["--json", "backup"],
        &[],
    );
    let rep = run.expect_code(exit::OK).json();
    assert_eq!(rep["files"], src.lib.original_files as u64 + 1, "{rep}");

    let fresh = PgCluster::start(None).unwrap();
    let target = src.work.path().join("target");
    let rconfig = src.write_restore_config("restore.toml", &fresh, &target);
    let run = cli(Some(&rconfig), &restore_args(&src.identity, &[]), &[]);
    let r = run.expect_code(exit::OK).json();
    assert_eq!(r["rows_match"], true, "{r}");
    for f in immich_backup::immich::FOLDERS {
        assert!(target.join(f).join(MARKER_FILE).is_file(), "{f}");
    }
    let restored = immich_backup::restore::target::Target::open(&target, false)
        .unwrap()
        .unwrap();
    let deepest = restored.folder(&rel, false).unwrap().expect("restored");
    let mut back = Vec::new();
    std::io::Read::read_to_end(
        &mut deepest
            .open_file(std::ffi::OsStr::new("photo.jpg"))
            .unwrap(),
        &mut back,
    )
    .unwrap();
    assert!(back == photo, "the deep photo differs");
}

#[test]
fn restore_takes_the_shared_lock_unless_told_not_to() {
    let src = Source::new(ASSETS);
    src.backup_lib();
    let fresh = PgCluster::start(None).unwrap();
    let target = src.work.path().join("target");
    let mut toml = src.toml();
    toml.port = fresh.port;
    toml.upload_location = target.clone();
    toml.extra = "[lock]\nwait_secs = 1\n".into();
    let rconfig = toml.write(&src.work.path().join("restore.toml"));
    // A prune holds the exclusive lock.
    let (rt, lock) = hold_exclusive_lock(&src.config());
    let run = cli(
        Some(&rconfig),
        &restore_args(&src.identity, &[]),
        &[("IMMICH_BACKUP_LOG", "off")],
    );
    run.expect_code(exit::LOCKED);
    assert!(!target.exists() && !database_exists(&fresh, DB));
    let run = cli(
        Some(&rconfig),
        &restore_args(&src.identity, &["--no-lock"]),
        &[],
    );
    run.expect_code(exit::OK);
    assert!(run.stderr.contains("--no-lock"), "{}", run.stderr);
    rt.block_on(lock.release());
}

#[test]
fn another_client_on_the_target_refuses_the_restore_before_anything_is_written() {
    let src = Source::new(ASSETS);
    src.backup_lib();
    let fresh = PgCluster::start(None).unwrap();
    let target = src.work.path().join("target");
    let rconfig = src.write_restore_config("restore.toml", &fresh, &target);
    let mut client = fresh
        .client_command("psql")
        .args(["-d", "postgres", "-c", "SELECT pg_sleep(60)"])
        .env("PGAPPNAME", "photo-viewer")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !fresh
        .psql(
            "postgres",
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'photo-viewer'",
        )
        .unwrap()
        .contains('1')
    {
        assert!(Instant::now() < deadline, "the client did not connect");
        std::thread::sleep(Duration::from_millis(100));
    }
    let run = cli(
        Some(&rconfig),
        &restore_args(&src.identity, &[]),
        &[("IMMICH_BACKUP_LOG", "off")],
    );
    let _ = client.kill();
    let _ = client.wait();
    run.expect_code(exit::NOT_FRESH);
    assert!(run.stderr.contains("photo-viewer"), "{}", run.stderr);
    assert!(!target.exists() && !database_exists(&fresh, DB));
}

#[test]
fn a_restore_interrupted_while_replaying_says_so_and_an_identity_readable_by_others_is_warned_about(
) {
    let src = Source::new(ASSETS);
    let id = src.backup_lib().snapshot;
    let fresh = PgCluster::start(None).unwrap();
    let target = src.work.path().join("target");
    let rconfig = src.write_restore_config("restore.toml", &fresh, &target);
    cli(Some(&rconfig), &restore_args(&src.identity, &[]), &[]).expect_code(exit::OK);
    // As a restore killed while psql ran leaves it.
    fs::write(
        target.join(".immich-backup-restore.json"),
        format!(
            "{{\"snapshot\":\"{id}\",\"database\":\"replaying\",\"updated\":\"2026-12-04T00:00:00Z\",\"tool\":\"t\"}}"
        ),
    )
    .unwrap();
    let run = cli(
        Some(&rconfig),
        &restore_args(&src.identity, &[]),
        &[("IMMICH_BACKUP_LOG", "off")],
    );
    run.expect_code(exit::NOT_FRESH);
    assert!(run.stderr.contains("half-restored"), "{}", run.stderr);

    fs::set_permissions(&src.identity, fs::Permissions::from_mode(0o644)).unwrap();
    let run = cli(
        Some(&rconfig),
        &restore_args(&src.identity, &["--dry-run"]),
        &[],
    );
    assert!(
        run.stderr.contains("can be read by other users"),
        "{}",
        run.stderr
    );
}

#[test]
fn damaged_content_is_repaired_by_backup_while_the_originals_exist() {
    let src = Source::new(ASSETS);
    // Settled files go into the metadata cache: later backups do not read them.
    wait_until_settled();
    let first = src.backup_lib().snapshot;
    let config = src.write_config("config.toml");
    let key_of = |rel: &str| object_key(&src, &fs::read(src.upload.join(rel)).unwrap());
    let flipped = "library/admin/2023/PANO_0001.jpg";
    let truncated = "library/admin/2023/VID_0002.mp4";
    let gone = "library/admin/Été 2024/café ☕.jpg";
    let (flipped_key, truncated_key, gone_key) = (key_of(flipped), key_of(truncated), key_of(gone));
    flip_middle_byte(&src.store.join(&flipped_key));
    flip_middle_byte(&src.store.join(&gone_key));
    let t = src.store.join(&truncated_key);
    let bytes = fs::read(&t).unwrap();
    fs::write(&t, &bytes[..bytes.len() - 1000]).unwrap();

    // The restore lists the three (and restores everything else); its report names them.
    let fresh = PgCluster::start(None).unwrap();
    let target = src.work.path().join("t1");
    let rconfig = src.write_restore_config("restore.toml", &fresh, &target);
    let run = cli(Some(&rconfig), &restore_args(&src.identity, &[]), &[]);
    run.expect_code(exit::DAMAGED);
    let report = src.work.path().join("report.json");
    fs::write(&report, &run.stdout).unwrap();
    let damaged: Vec<String> = run.json()["damaged"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["path"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(damaged.len(), 3, "{damaged:?}");

    // A plain backup does not notice; --repair alone replaces what has the wrong size (even
    // though the metadata cache says the files are unchanged).
    let run = cli(Some(&config), &["--json", "backup", "--repair"], &[]);
    let r = run.expect_code(exit::OK).json();
    assert_eq!(r["repaired"], serde_json::json!([truncated_key]), "{r}");
    assert!(
        r["files_unchanged"].as_u64().unwrap() > 0,
        "the cache was used: {r}"
    );
    // The report names the others; the one whose original is gone cannot be repaired.
    fs::remove_file(src.upload.join(gone)).unwrap();
    let args = ["--json", "backup", "--damaged", path_arg(&report)];
    let run = cli(Some(&config), &args, &[]);
    let r = run.expect_code(exit::OK).json();
    let repaired: Vec<&str> = r["repaired"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k.as_str().unwrap())
        .collect();
    assert!(repaired.contains(&flipped_key.as_str()), "{r}");
    assert!(!repaired.contains(&gone_key.as_str()), "{r}");
    assert_eq!(r["not_repaired"], serde_json::json!([gone_key]), "{r}");
    assert!(run.stderr.contains(&gone_key), "{}", run.stderr);

    // The first snapshot now restores everything but the file whose original was gone.
    fresh
        .psql("postgres", &format!("DROP DATABASE {DB} WITH (FORCE)"))
        .unwrap();
    let target = src.work.path().join("t2");
    let args = restore_args(&src.identity, &[&first, "--target", path_arg(&target)]);
    let run = cli(Some(&rconfig), &args, &[]);
    let r = run.expect_code(exit::DAMAGED).json();
    let left: Vec<&str> = r["damaged"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["path"].as_str().unwrap())
        .collect();
    assert_eq!(left, [gone], "{r}");
    for rel in [flipped, truncated] {
        assert_eq!(
            fs::read(target.join(rel)).unwrap(),
            fs::read(src.upload.join(rel)).unwrap(),
            "{rel}"
        );
    }
}

/// The pids of the processes whose parent is `parent` and whose command name is `name`.
fn children_named(parent: u32, name: &str) -> Vec<u32> {
    let mut out = Vec::new();
    for e in fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        // pid (comm) state ppid …
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let comm = &stat[open + 1..close];
        let ppid = stat[close + 1..].split_whitespace().nth(1);
        if comm == name && ppid == Some(parent.to_string().as_str()) {
            out.push(pid);
        }
    }
    out
}

#[test]
fn a_killed_restore_takes_its_psql_with_it() {
    let src = Source::new(ASSETS);
    src.backup_lib();
    // A dump whose replay takes a while (valid SQL; unsigned, so restored with --allow-unsigned).
    let id = Forger::new(&src).snapshot(&later_id(5), b"SELECT pg_sleep(60);\n", &[], None);
    let fresh = PgCluster::start(None).unwrap();
    let target = src.work.path().join("target");
    let rconfig = src.write_restore_config("restore.toml", &fresh, &target);
    let args = restore_args(&src.identity, &[&id, "--allow-unsigned"]);
    let mut restore = command(Some(&rconfig), &args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let psql = loop {
        if let Some(p) = children_named(restore.id(), "psql").into_iter().find(|p| {
            fs::read_to_string(format!("/proc/{p}/cmdline"))
                .is_ok_and(|c| c.contains("ON_ERROR_STOP"))
        }) {
            break p;
        }
        assert!(Instant::now() < deadline, "the replay's psql did not start");
        assert!(
            restore.try_wait().unwrap().is_none(),
            "the restore ended early"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    restore.kill().unwrap(); // SIGKILL: nothing of ours runs after it
    restore.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while Path::new(&format!("/proc/{psql}")).exists()
        && !fs::read_to_string(format!("/proc/{psql}/stat")).is_ok_and(|s| s.contains(") Z "))
    {
        assert!(
            Instant::now() < deadline,
            "psql {psql} went on after the restore was killed"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn objects_swapped_under_a_signed_manifest_are_refused_and_other_keys_need_their_verify_key() {
    let src = Source::new(ASSETS);
    // The backup machine signs with a random key (`signing-key --new`), not one made from the
    // identity: a restore trusts it only when told its verify key.
    let key_file = src.work.path().join("random.key");
    let run = cli(
        None,
        &["--json", "signing-key", "--new", "-o", path_arg(&key_file)],
        &[],
    );
    let verify = run.expect_code(exit::OK).json()["verify_keys"][0]
        .as_str()
        .unwrap()
        .to_string();
    let mut toml = src.toml();
    toml.signing_key = None;
    toml.extra = String::new();
    let text = toml.text().replace(
        "[backup]",
        &format!(
            "signing_key_file = {:?}\n\n[backup]",
            key_file.display().to_string()
        ),
    );
    let config = src.work.path().join("random.toml");
    fs::write(&config, text).unwrap();
    let id = cli(Some(&config), &["--json", "backup"], &[])
        .expect_code(exit::OK)
        .json()["snapshot"]
        .as_str()
        .unwrap()
        .to_string();
    let fresh = PgCluster::start(None).unwrap();
    let target = src.work.path().join("target");
    let rconfig = src.write_restore_config("restore.toml", &fresh, &target);
    let quiet = [("IMMICH_BACKUP_LOG", "off")];
    let run = cli(
        Some(&rconfig),
        &restore_args(&src.identity, &["--dry-run"]),
        &quiet,
    );
    run.expect_code(exit::INTEGRITY);
    assert!(run.stderr.contains("--verify-key"), "{}", run.stderr);
    let dry = restore_args(&src.identity, &["--dry-run", "--verify-key", &verify]);
    cli(Some(&rconfig), &dry, &[]).expect_code(exit::OK);

    // The dump and the file list replaced by new age files of the very same plaintext (more than
    // an attacker could do): the signed manifest pins the originals, so both are refused.
    let m = manifest(&src.store, &src.identity, &id);
    let forger = Forger::new(&src);
    let ids = unlocked_in(&src.config().storage, &src.identity);
    for key in [&m.dump.key, &m.files.key] {
        let path = src.store.join(key);
        let original = fs::read(&path).unwrap();
        let mut plain = Vec::new();
        std::io::Read::read_to_end(&mut ids.decrypt(&original[..], key).unwrap(), &mut plain)
            .unwrap();
        fs::write(&path, forger.seal(&plain)).unwrap();
        let run = cli(Some(&rconfig), &dry, &quiet);
        run.expect_code(exit::INTEGRITY);
        assert!(
            run.stderr.contains("replaced") && run.stderr.contains(key.as_str()),
            "{}",
            run.stderr
        );
        fs::write(&path, original).unwrap();
    }
    // An edited summary (what retention reads) breaks the signature too.
    let summary = src.store.join(format!("snapshots/{id}/summary.json"));
    let original = fs::read_to_string(&summary).unwrap();
    fs::write(&summary, original.replace("\"host\"", "\"host\" ")).unwrap();
    let run = cli(Some(&rconfig), &dry, &quiet);
    run.expect_code(exit::INTEGRITY);
    assert!(run.stderr.contains("summary.json"), "{}", run.stderr);
    fs::write(&summary, original).unwrap();
    let run = cli(
        Some(&rconfig),
        &restore_args(&src.identity, &["--verify-key", &verify]),
        &[],
    );
    let r = run.expect_code(exit::OK).json();
    assert_eq!(r["signed_by"], verify.as_str(), "{r}");
}

/// Unmounts a tmpfs on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    /// A tmpfs of `size` (e.g. "4m") at a new folder under `parent` (the tests run as root, as
    /// `.ci/run` does).
    fn mount(parent: &Path, size: &str) -> Tmpfs {
        let dir = parent.join("small-disk");
        fs::create_dir_all(&dir).unwrap();
        let st = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&dir)
            .status()
            .unwrap();
        assert!(st.success(), "mount tmpfs (this test needs root)");
        Tmpfs(dir)
    }

    fn resize(&self, size: &str) {
        let st = std::process::Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.0)
            .status()
            .unwrap();
        assert!(st.success());
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn a_restore_stopped_by_a_full_disk_leaves_no_wrong_file_and_finishes_when_run_again() {
    let src = Source::new(ASSETS);
    src.backup_lib();
    let fresh = PgCluster::start(None).unwrap();
    // The library's originals take about 11 MB; the target's disk holds 3.
    let disk = Tmpfs::mount(src.work.path(), "3m");
    let target = disk.0.join("upload-location");
    let rconfig = src.write_restore_config("restore.toml", &fresh, &target);
    let run = cli(
        Some(&rconfig),
        &restore_args(&src.identity, &[]),
        &[("IMMICH_BACKUP_LOG", "off")],
    );
    run.expect_code(exit::FAILURE);
    assert!(run.stderr.contains("disk is full"), "{}", run.stderr);
    // Whatever has its name is complete and right; nothing half-written is left.
    assert_eq!(partial_files(&target), Vec::<PathBuf>::new());
    for e in walkdir::WalkDir::new(&target).into_iter().flatten() {
        let rel = e.path().strip_prefix(&target).unwrap();
        if e.file_type().is_file() && e.file_name() != MARKER_FILE && rel.components().count() > 1 {
            assert_eq!(
                fs::read(e.path()).unwrap(),
                fs::read(src.upload.join(rel)).unwrap(),
                "{} is not the snapshot's",
                rel.display()
            );
        }
    }
    // More room, the same command again: the database (replayed the first time) is kept, the
    // files are finished.
    disk.resize("64m");
    // A partial file, as a restore killed mid-file leaves where unnamed files are not possible.
    let partial = target.join("library/.IMG_9.jpg.immich-backup-partial");
    fs::create_dir_all(partial.parent().unwrap()).unwrap();
    fs::write(&partial, b"half a photo").unwrap();
    let run = cli(Some(&rconfig), &restore_args(&src.identity, &[]), &[]);
    let r = run.expect_code(exit::OK).json();
    assert_eq!(r["database_resumed"], true, "{r}");
    assert_eq!(r["rows_match"], true, "{r}");
    assert_same_originals(&src.upload, &target);
    assert!(!target.join(".immich-backup-restore.json").exists());
    assert!(!partial.exists());
}
