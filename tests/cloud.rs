//! Cloud stores end to end, against real servers on 127.0.0.1:
//! - S3: s3s-fs in this process (a real S3 implementation over a directory that checks SigV4
//!   signatures), behind a layer that records requests and can misbehave on purpose;
//! - Azure Blob: Azurite (npm `azurite@3.35.0`, installed by `.ci/run` into `.ci/node_modules`);
//! - Google Cloud Storage: `common/gcs.rs`, a local server speaking the GCS XML API that object_store
//!   uses (see that file for exactly what it does and does not cover).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::azurite::Azurite;
use common::gcs::FakeGcs;
use common::s3::{S3Server, ACCESS_KEY, SECRET_KEY};
use common::*;
use immich_backup::config::StorageConfig;
use immich_backup::error::Error;
use immich_backup::format;
use immich_backup::repo::snapshots;
use immich_backup::repo::Repository;
use immich_backup::store::check::{self as storecheck, Status};
use immich_backup::store::{Store, PART_SIZE};

fn status_of(r: &storecheck::InitReport, check: &str) -> Status {
    r.checks
        .iter()
        .find(|c| c.check == check)
        .unwrap_or_else(|| panic!("no check {check}: {r:?}"))
        .status
}

/// Full backup → restore round trip through S3 with SigV4, including an object of more than two
/// multipart parts; a second backup uploads nothing.
#[test]
fn s3_backup_restore_round_trip_with_multipart_object() {
    let server = S3Server::start(&["photos"]);
    let source = Source::with_big_file(1500);
    let cfg = source.config_with(s3_storage(&server, "photos", "immich/nightly"));
    let rt = rt();

    let report = backup(&rt, &cfg).expect("backup to S3");
    assert_eq!(report.files as usize, source.lib.original_files);
    assert!(report.files_new > 0);
    // The report counts the requests the server received, by the kind a provider bills.
    assert_eq!(
        kinds(&report.requests),
        kinds(&requests_seen(&server)),
        "{:?}",
        server.seen()
    );
    assert!(
        report.requests.bytes_sent >= report.bytes_stored + report.dump_stored_bytes,
        "{:?}",
        report.requests
    );

    // The big file went up as a multipart upload of more than two parts, several at once.
    let seen = server.seen();
    let mut parts: BTreeMap<String, usize> = BTreeMap::new();
    for s in seen.iter().filter(|s| s.is_part()) {
        assert_eq!(s.status, 200, "{s:?}");
        let path = s.target.split('?').next().unwrap().to_string();
        *parts.entry(path).or_default() += 1;
    }
    let most = parts.values().copied().max().unwrap_or(0);
    let expected = BIG_FILE_SIZE.div_ceil(PART_SIZE);
    assert!(
        most >= expected && expected > 2,
        "parts per object: {parts:?}"
    );
    assert!(seen.iter().any(|s| s.is_complete() && s.status == 200));
    // Never more parts in flight than `concurrency` (that several go at once is shown by
    // s3_parallel_multipart_uploads_stay_bounded, where timing cannot hide it).
    let max_parallel = server.behaviour.parts_max.load(Ordering::SeqCst);
    assert!(
        (1..=cfg.storage.concurrency).contains(&max_parallel),
        "parts in flight at once: {max_parallel}"
    );
    // Everything stored is under the prefix; the manifest is there.
    let keys = server.keys("photos", "");
    assert!(
        keys.iter().all(|k| k.starts_with("immich/nightly/")),
        "{keys:?}"
    );
    assert!(keys.iter().any(|k| k.ends_with(&format!(
        "{}/{}",
        report.snapshot,
        format::MANIFEST_OBJECT
    ))));

    restore_and_verify(&rt, &source, &cfg);

    // Nothing changed: the next backup stores no content.
    server.clear_log();
    let again = backup(&rt, &cfg).expect("second backup");
    assert_eq!(again.files_new, 0);
    assert_eq!(again.bytes_stored, 0);
    assert_eq!(
        kinds(&again.requests),
        kinds(&requests_seen(&server)),
        "{:?}",
        server.seen()
    );
    let data_puts: Vec<_> = server
        .seen()
        .into_iter()
        .filter(|s| s.method == "PUT" && s.target.contains("/data/"))
        .collect();
    assert!(data_puts.is_empty(), "{data_puts:?}");
}

/// The S3 server's log of requests, counted as `report.requests` counts them (bytes aside; a batch
/// delete as one).
fn requests_seen(server: &S3Server) -> immich_backup::store::meter::TrafficCounts {
    let mut c = immich_backup::store::meter::TrafficCounts::default();
    for s in server.seen() {
        let q = s.target.split_once('?').map(|(_, q)| q).unwrap_or("");
        let counter = match s.method.as_str() {
            "PUT" if q.contains("partNumber=") => &mut c.part,
            "PUT" => &mut c.put,
            "POST" if q.contains("uploads") || q.contains("uploadId=") => &mut c.multipart,
            "DELETE" if q.contains("uploadId=") => &mut c.multipart,
            // One request deletes one object (DELETE) or a batch (POST ?delete).
            "DELETE" => &mut c.delete,
            "POST" if q.starts_with("delete") => &mut c.delete,
            "GET" if q.contains("list-type=") => &mut c.list,
            "GET" => &mut c.get,
            "HEAD" => &mut c.head,
            other => panic!("unexpected request {other} {}", s.target),
        };
        *counter += 1;
    }
    c
}

/// A report's request counts without its byte counts; deletions count objects, which S3
/// batches, so the server's delete requests are at most as many (and there are some only if the
/// report has some).
fn kinds(c: &immich_backup::store::meter::TrafficCounts) -> [u64; 8] {
    [
        c.put,
        c.part,
        c.multipart,
        c.get,
        c.head,
        c.list,
        c.delete.min(1),
        c.copy,
    ]
}

/// `backup --repair` on S3: a truncated small object (found by its size) and a damaged multipart
/// object (named, as a restore's report names it) are stored again, over the damaged copies, by an
/// overwriting put and a completed multipart upload; the store then restores byte-identical.
#[test]
fn s3_repair_replaces_damaged_objects() {
    let server = S3Server::start(&["photos"]);
    let source = Source::with_big_file(300);
    let cfg = source.config_with(s3_storage(&server, "photos", "immich/nightly"));
    let rt = rt();
    backup(&rt, &cfg).expect("backup to S3");
    let content_key = content_key_in(&cfg.storage, &source.identity);
    let id_of = |rel: &str| {
        let bytes = std::fs::read(source.upload.join(rel)).unwrap();
        format::ContentId(*blake3::keyed_hash(&content_key, &bytes).as_bytes())
    };
    let small = id_of("library/admin/2023/PANO_0001.jpg");
    let big = id_of(BIG_FILE);
    let path = |id: &format::ContentId| {
        server.object_path("photos", &format!("immich/nightly/{}", id.key()))
    };
    let bytes = std::fs::read(path(&small)).unwrap();
    std::fs::write(path(&small), &bytes[..bytes.len() - 100]).unwrap();
    let mut bytes = std::fs::read(path(&big)).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    std::fs::write(path(&big), &bytes).unwrap();

    server.clear_log();
    let report = rt
        .block_on(async {
            let store = Repository::open(&cfg.storage)?;
            let database = immich_backup::db::connect(&cfg.database)?;
            let recipients =
                immich_backup::crypto::Recipients::load(&cfg.encryption.recipients, None)?;
            let opts = immich_backup::backup::BackupOptions {
                repair: Some([big].into_iter().collect()),
            };
            immich_backup::backup::run_with(
                &cfg,
                database.as_ref(),
                &store,
                recipients,
                immich_backup::progress::Progress::hidden(),
                opts,
            )
            .await
        })
        .expect("backup --repair");
    let mut expected = vec![small.key(), big.key()];
    expected.sort();
    assert_eq!(report.repaired, expected);
    assert!(report.not_repaired.is_empty());
    let seen = server.seen();
    assert!(
        seen.iter()
            .any(|s| s.is_put_object() && s.target.contains(&small.to_string())),
        "the small object was put again"
    );
    assert!(
        seen.iter()
            .any(|s| s.is_complete() && s.target.contains(&big.to_string())),
        "the big object was uploaded again in parts"
    );
    restore_and_verify(&rt, &source, &cfg);
}

/// Several large objects at once: each goes up in parts, the parts in flight never exceed
/// `[storage] concurrency`, and every object reads back intact.
#[test]
fn s3_parallel_multipart_uploads_stay_bounded() {
    let server = S3Server::start(&["bounded"]);
    let mut storage = s3_storage(&server, "bounded", "p");
    storage.concurrency = 3;
    let rt = rt();
    let store = rt.block_on(async { Store::open(&storage) }).unwrap();
    let len = 3 * PART_SIZE + 777;
    let handle = rt.handle().clone();
    let threads: Vec<_> = (0..4u64)
        .map(|i| {
            let store = store.clone();
            let handle = handle.clone();
            std::thread::spawn(move || {
                let _g = handle.enter();
                let mut w = store.writer(&format!("data/big-{i}"));
                let data = immich_backup::demo::sample::pseudo_random_bytes(i, len);
                for chunk in data.chunks(100_000) {
                    std::io::Write::write_all(&mut w, chunk).unwrap();
                }
                assert_eq!(w.finish().unwrap(), len as u64);
                data
            })
        })
        .collect();
    let datas: Vec<Vec<u8>> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let max = server.behaviour.parts_max.load(Ordering::SeqCst);
    assert!((2..=3).contains(&max), "parts in flight at once: {max}");
    let parts = server.seen().iter().filter(|s| s.is_part()).count();
    assert_eq!(parts, 4 * len.div_ceil(PART_SIZE));
    for (i, data) in datas.iter().enumerate() {
        let got = rt
            .block_on(store.get_bytes(&format!("data/big-{i}")))
            .unwrap();
        assert!(got == data[..], "object {i} differs");
    }
}

/// An object announced as larger than the part limit allows at 8 MiB parts goes up in fewer,
/// larger parts of one size (S3 allows 10,000: 8 MiB parts would cap an object at 80 GiB; the test
/// lowers the limit to 3 so that 40 MiB shows it). Unannounced, the same object fails cleanly at
/// the limit, naming it, and nothing becomes visible.
#[test]
fn s3_large_objects_get_parts_that_fit_the_part_limit() {
    let server = S3Server::start(&["large"]);
    let storage = s3_storage(&server, "large", "p");
    let rt = rt();
    let store = rt
        .block_on(async { Store::open(&storage) })
        .unwrap()
        .with_max_parts(3);
    let len = 5 * PART_SIZE + 12_345;
    let data = immich_backup::demo::sample::pseudo_random_bytes(7, len);
    let write = |key: &str, announce: bool| {
        let _g = rt.handle().enter();
        let mut w = store.writer(key);
        if announce {
            w.expect_len(len as u64);
        }
        for chunk in data.chunks(1 << 20) {
            std::io::Write::write_all(&mut w, chunk)?;
        }
        w.finish().map_err(|e| std::io::Error::other(e.to_string()))
    };
    server.clear_log();
    assert_eq!(write("data/announced", true).unwrap(), len as u64);
    let sent = server.seen().iter().filter(|s| s.is_part()).count();
    assert_eq!(sent, 3, "parts the server received");
    let got = rt.block_on(store.get_bytes("data/announced")).unwrap();
    assert!(got == data[..], "the object reads back as written");

    let e = write("data/unannounced", false).unwrap_err().to_string();
    assert!(e.contains("larger than 3 parts of 8 MiB"), "{e}");
    assert!(e.contains("data/unannounced"), "{e}");
    assert!(server.keys("large", "p/data/unannounced").is_empty());
}

/// `[storage] upload_limit` and `download_limit` hold every request of their direction to the rate
/// (a functional check of the limit, with a generous lower bound: 3 MiB at 1 MiB/s, of which the
/// bucket's one second of burst goes at once, cannot take under 2 s); bad rates name their key
/// or flag.
#[test]
fn s3_bandwidth_limits_hold_uploads_and_downloads() {
    let server = S3Server::start(&["slow"]);
    let mut storage = s3_storage(&server, "slow", "p");
    storage.upload_limit = "1MiB/s".into();
    storage.download_limit = "1024".into(); // KiB/s, as restic
    let rt = rt();
    let store = rt.block_on(async { Store::open(&storage) }).unwrap();
    let data = immich_backup::demo::sample::pseudo_random_bytes(3, 3 << 20);
    let started = Instant::now();
    {
        let _g = rt.handle().enter();
        let mut w = store.writer("data/limited");
        std::io::Write::write_all(&mut w, &data).unwrap();
        w.finish().unwrap();
    }
    let up = started.elapsed();
    let started = Instant::now();
    let got = rt.block_on(store.get_bytes("data/limited")).unwrap();
    let down = started.elapsed();
    assert!(got == data[..]);
    assert!(up >= Duration::from_millis(1900), "upload took {up:?}");
    assert!(
        down >= Duration::from_millis(1900),
        "download took {down:?}"
    );
    let t = store.traffic();
    assert_eq!(
        (t.bytes_sent, t.bytes_received),
        (3 << 20, 3 << 20),
        "{t:?}"
    );

    storage.upload_limit = "fast".into();
    let e = Store::open(&storage).unwrap_err().to_string();
    assert!(
        e.contains("[storage] upload_limit = \"fast\" is not a rate"),
        "{e}"
    );
    let run = cli(None, &["--limit-download", "9 parsecs", "snapshots"], &[]);
    run.expect_code(2);
    assert!(
        run.stderr.contains("--limit-download") && run.stderr.contains("unknown unit"),
        "{}",
        run.stderr
    );
}

/// A wrong secret: every command fails with exit code 10 and one documented line, and no secret
/// (right or wrong, nor the session token) appears anywhere in the output, even with debug logs.
#[test]
fn s3_wrong_secret_is_one_documented_line_without_secrets() {
    let server = S3Server::start(&["photos"]);
    let work = tempdir();
    let upload = work.path().join("ul");
    std::fs::create_dir_all(upload.join("library")).unwrap();
    let wrong = "WrongSecretValue/abcdefghijklmnopqrstuvwxyz0123";
    let token = "FwoGZXIvYXdzEXAMPLESESSIONTOKENvalue1234567890";
    let config = work.path().join("c.toml");
    std::fs::write(
        &config,
        format!(
            "[immich]\nupload_location = {:?}\n[database]\nmode = \"local\"\n[storage]\nurl = \"s3://photos/immich\"\nendpoint = {:?}\nallow_http = true\nregion = \"us-east-1\"\naccess_key_id = {:?}\nretry_timeout_secs = 2\nmax_retries = 1\n[encryption]\nrecipients = [{:?}]\n[backup]\ncache_dir = {:?}\n",
            upload.display().to_string(),
            server.endpoint(),
            ACCESS_KEY,
            immich_backup::crypto::generate_key().recipient,
            work.path().join("cache").display().to_string()
        ),
    )
    .unwrap();
    let env = [
        ("IMMICH_BACKUP__STORAGE__SECRET_ACCESS_KEY", wrong),
        ("IMMICH_BACKUP__STORAGE__SESSION_TOKEN", token),
        ("IMMICH_BACKUP_LOG", "debug"),
    ];
    for args in [
        &["backup"][..],
        &["snapshots"],
        &["init"],
        &["-vv", "backup"],
    ] {
        let run = cli(Some(&config), args, &env);
        let (stdout, stderr) = (&run.stdout, &run.stderr);
        assert_eq!(run.code, 10, "{args:?}: {stdout}\n{stderr}");
        for secret in [wrong, token, SECRET_KEY] {
            assert!(
                !stdout.contains(secret) && !stderr.contains(secret),
                "{args:?} leaked a secret:\n{stdout}\n{stderr}"
            );
        }
        let errors = run.error_lines();
        assert_eq!(errors.len(), 1, "{args:?}: {stderr}");
        assert!(
            errors[0].contains("storage s3://photos/immich: ")
                && errors[0].contains("denied (SignatureDoesNotMatch)")
                || args == ["init"] && errors[0].contains("failed check(s): access"),
            "{args:?}: {}",
            errors[0]
        );
        if args == ["init"] {
            assert!(stdout.contains("FAIL access"), "{stdout}");
            assert!(
                stdout.contains("check [storage] access_key_id and secret_access_key"),
                "{stdout}"
            );
        }
    }
    // --json: one object with the failed check and the exit code.
    let run = cli(Some(&config), &["--json", "init"], &env);
    assert_eq!(run.code, 10);
    let v = run.json();
    assert_eq!(v["ok"], false);
    assert_eq!(v["exit_code"], 10);
    assert_eq!(v["checks"][0]["check"], "access");
    assert_eq!(v["checks"][0]["status"], "fail");
    assert!(!run.stdout.contains(wrong));

    // Debug of the config never shows a secret either.
    let storage = StorageConfig {
        secret_access_key: wrong.into(),
        session_token: token.into(),
        account_key: "azure-key-value==".into(),
        options: [("sas_token".to_string(), "sv=2023&sig=abcdef".to_string())].into(),
        ..StorageConfig::default()
    };
    let shown = format!("{storage:?}");
    for s in [wrong, token, "azure-key-value==", "sig=abcdef"] {
        assert!(!shown.contains(s), "{shown}");
    }
}

/// A bucket that does not exist: exit code 10 with the documented message; `init` says to create it.
#[test]
fn s3_missing_bucket_is_a_documented_error() {
    let server = S3Server::start(&["photos"]);
    let mut storage = s3_storage(&server, "no-such-bucket", "immich");
    storage.concurrency = 2;
    let rt = rt();
    let store = Store::open(&storage).unwrap();
    let err = rt
        .block_on(snapshots::open_or_init(&Repository::new(store.clone())))
        .unwrap_err();
    assert_eq!(err.exit_code(), 10);
    assert_eq!(
        err.to_string(),
        "storage s3://no-such-bucket/immich: bucket \"no-such-bucket\" does not exist (NoSuchBucket); create it, or correct [storage] url"
    );
    let report = rt.block_on(immich_backup::repo::snapshots::init(&Repository::new(
        store.clone(),
    )));
    assert!(!report.ok);
    let access = &report.checks[0];
    assert_eq!(access.status, Status::Fail);
    assert!(
        access
            .remedy
            .as_deref()
            .unwrap()
            .contains("create the bucket"),
        "{access:?}"
    );
    assert_eq!(status_of(&report, "write"), Status::Skipped);
    assert_eq!(storecheck::failure_error(&report).exit_code(), 10);
}

/// `init` runs every check and creates the repository; it tells a server that ignores conditional
/// writes (warning) from one that rejects them (failure, remedy: conditional_create = false), and
/// with that setting the store works.
#[test]
fn s3_init_checks_the_store() {
    let server = S3Server::start(&["photos"]);
    let storage = s3_storage(&server, "photos", "immich");
    let rt = rt();
    let store = Store::open(&storage).unwrap();

    let report = rt.block_on(immich_backup::repo::snapshots::init(&Repository::new(
        store.clone(),
    )));
    assert!(report.ok, "{report:#?}");
    for c in [
        "access",
        "write",
        "read",
        "list",
        "conditional-create",
        "delete",
        "repository",
    ] {
        assert_eq!(status_of(&report, c), Status::Ok, "{report:#?}");
    }
    assert!(report.created);
    // The probe is gone; only the marker remains.
    assert_eq!(
        server.keys("photos", ""),
        vec!["immich/immich-backup.json".to_string()]
    );
    let again = rt.block_on(immich_backup::repo::snapshots::init(&Repository::new(
        store.clone(),
    )));
    assert!(again.ok && !again.created);
    assert_eq!(again.repository, report.repository);

    server
        .behaviour
        .ignore_if_none_match
        .store(true, Ordering::SeqCst);
    let r = rt.block_on(immich_backup::repo::snapshots::init(&Repository::new(
        store.clone(),
    )));
    assert!(r.ok, "{r:#?}");
    assert_eq!(status_of(&r, "conditional-create"), Status::Warn);
    server
        .behaviour
        .ignore_if_none_match
        .store(false, Ordering::SeqCst);

    server
        .behaviour
        .reject_if_none_match
        .store(true, Ordering::SeqCst);
    let r = rt.block_on(immich_backup::repo::snapshots::init(&Repository::new(
        store.clone(),
    )));
    assert!(!r.ok);
    let write = r.checks.iter().find(|c| c.check == "write").unwrap();
    assert_eq!(write.status, Status::Fail, "{r:#?}");
    let mut fallback = storage.clone();
    fallback.conditional_create = false;
    let store2 = Store::open(&fallback).unwrap();
    let r = rt.block_on(immich_backup::repo::snapshots::init(&Repository::new(
        store2.clone(),
    )));
    assert!(r.ok, "{r:#?}");
    assert_eq!(status_of(&r, "conditional-create"), Status::Warn);
    // Check-then-write still never overwrites.
    assert!(rt
        .block_on(store2.put_new("x", Bytes::from_static(b"1")))
        .unwrap());
    assert!(!rt
        .block_on(store2.put_new("x", Bytes::from_static(b"2")))
        .unwrap());
    assert_eq!(&rt.block_on(store2.get_bytes("x")).unwrap()[..], b"1");
}

/// A store that keeps failing: the backup fails after its retries, naming the object and the
/// reason, with exit code 10; no snapshot becomes visible.
#[test]
fn s3_failing_upload_names_the_object() {
    let server = S3Server::start(&["photos"]);
    let source = Source::with_big_file(200);
    let cfg = source.config_with(s3_storage(&server, "photos", "immich"));
    let rt = rt();
    server
        .behaviour
        .fail_data_puts
        .store(true, Ordering::SeqCst);
    let started = Instant::now();
    let err = backup(&rt, &cfg).unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "retries took {:?}",
        started.elapsed()
    );
    assert_eq!(err.exit_code(), 10, "{err}");
    let text = err.to_string();
    match &err {
        Error::StorageObject { object, message } => {
            assert!(object.starts_with("data/"), "{text}");
            assert!(
                message.contains("SlowDown") || message.contains("503"),
                "{text}"
            );
        }
        other => panic!("unexpected error {other:?}"),
    }
    assert!(!text.contains('\n'), "{text}");
    assert!(!text.contains(SECRET_KEY));
    let store = Store::open(&cfg.storage).unwrap();
    assert!(rt
        .block_on(snapshots::list(&Repository::new(store.clone())))
        .unwrap()
        .is_empty());
}

/// Kill the backup (SIGKILL) while a multipart upload is in flight: no snapshot is visible; the next
/// run completes and uploads only the content that was missing.
#[test]
fn s3_killed_backup_resumes_uploading_only_what_is_missing() {
    let server = S3Server::start(&["photos"]);
    let source = Source::with_big_file(500);
    let mut storage = s3_storage(&server, "photos", "immich");
    storage.concurrency = 4;
    let cfg = source.config_with(storage);
    let config = source.write_config_with(&cfg.storage, "config.toml");
    let env = [("IMMICH_BACKUP__STORAGE__SECRET_ACCESS_KEY", SECRET_KEY)];
    let rt = rt();
    let store = Store::open(&cfg.storage).unwrap();

    server
        .behaviour
        .stall_data_parts
        .store(true, Ordering::SeqCst);
    let mut child = command(Some(&config), &["backup"])
        .envs(env)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_until_a_part_stalls(&server, &mut child);
    // Let the small files in flight land, then kill it in the middle of the multipart upload.
    std::thread::sleep(Duration::from_secs(2));
    child.kill().unwrap();
    child.wait().unwrap();
    server
        .behaviour
        .stall_data_parts
        .store(false, Ordering::SeqCst);

    assert!(rt
        .block_on(snapshots::list(&Repository::new(store.clone())))
        .unwrap()
        .is_empty());
    let ids = rt
        .block_on(snapshots::list_ids(&Repository::new(store.clone())))
        .unwrap();
    assert_eq!(ids.len(), 1, "{ids:?}");
    assert!(ids.values().all(|complete| !complete));
    let run = cli(Some(&config), &["snapshots"], &env);
    assert!(run.stdout.contains("0 snapshot(s)"), "{run:?}");
    let before: BTreeSet<String> = server.keys("photos", "immich/data").into_iter().collect();
    assert!(!before.is_empty(), "nothing was stored before the kill");

    server.clear_log();
    let run = cli(Some(&config), &["--json", "backup"], &env);
    let (stdout, stderr) = (&run.stdout, &run.stderr);
    assert_eq!(run.code, 0, "{stdout}\n{stderr}");
    let report: serde_json::Value = serde_json::from_str(stdout).unwrap();
    let after: BTreeSet<String> = server.keys("photos", "immich/data").into_iter().collect();
    let written: BTreeSet<String> = server
        .seen()
        .iter()
        .filter(|s| {
            (s.is_put_object() || s.is_complete()) && s.target.contains("/data/") && s.status == 200
        })
        .map(|s| {
            s.target
                .split('?')
                .next()
                .unwrap()
                .trim_start_matches("/photos/")
                .to_string()
        })
        .collect();
    assert!(
        written.is_disjoint(&before),
        "uploaded again: {:?}",
        written.intersection(&before).collect::<Vec<_>>()
    );
    assert_eq!(after.len(), before.len() + written.len());
    assert!(written.iter().any(|k| k.contains("/data/")) || !written.is_empty());
    assert_eq!(
        report["files_new"].as_u64().unwrap() as usize,
        written.len()
    );
    assert_eq!(
        report["files"].as_u64().unwrap() as usize,
        source.lib.original_files
    );
    let complete = rt
        .block_on(snapshots::list(&Repository::new(store.clone())))
        .unwrap();
    assert_eq!(complete.len(), 1);
    assert_eq!(complete[0].id, report["snapshot"].as_str().unwrap());
}

/// Azure Blob through Azurite: full round trip, then a wrong account key.
#[test]
fn azure_backup_restore_round_trip() {
    let azurite = Azurite::start();
    azurite.create_container("immich");
    let source = Source::with_big_file(800);
    let storage = quick(StorageConfig {
        url: "az://immich/nightly".into(),
        endpoint: azurite.endpoint(),
        allow_http: true,
        account_name: common::azurite::ACCOUNT.into(),
        account_key: common::azurite::KEY.into(),
        ..StorageConfig::default()
    });
    let cfg = source.config_with(storage);
    let rt = rt();
    let store = Store::open(&cfg.storage).unwrap();
    let init = rt.block_on(immich_backup::repo::snapshots::init(&Repository::new(
        store.clone(),
    )));
    assert!(init.ok, "{init:#?}");
    assert!(
        init.checks.iter().all(|c| c.status == Status::Ok),
        "{init:#?}"
    );
    let report = backup(&rt, &cfg).expect("backup to Azure");
    assert_eq!(report.files as usize, source.lib.original_files);
    restore_and_verify(&rt, &source, &cfg);
    let again = backup(&rt, &cfg).unwrap();
    assert_eq!(again.files_new, 0);
}

#[test]
fn azure_wrong_key_is_a_storage_error() {
    let azurite = Azurite::start();
    azurite.create_container("immich");
    let work = tempdir();
    let upload = work.path().join("ul");
    std::fs::create_dir_all(upload.join("library")).unwrap();
    // A well-formed key that is not the account's.
    let wrong =
        "QmFkS2V5QmFkS2V5QmFkS2V5QmFkS2V5QmFkS2V5QmFkS2V5QmFkS2V5QmFkS2V5QmFkS2V5QmFkS2V5QmFkS2V5";
    let config = work.path().join("c.toml");
    std::fs::write(
        &config,
        format!(
            "[immich]\nupload_location = {:?}\n[database]\nmode = \"local\"\n[storage]\nurl = \"az://immich/nightly\"\nendpoint = {:?}\nallow_http = true\naccount_name = \"devstoreaccount1\"\nretry_timeout_secs = 2\nmax_retries = 1\n[encryption]\nrecipients = [{:?}]\n[backup]\ncache_dir = {:?}\n",
            upload.display().to_string(),
            azurite.endpoint(),
            immich_backup::crypto::generate_key().recipient,
            work.path().join("cache").display().to_string()
        ),
    )
    .unwrap();
    let env = [
        ("IMMICH_BACKUP__STORAGE__ACCOUNT_KEY", wrong),
        ("IMMICH_BACKUP_LOG", "debug"),
    ];
    for args in [&["backup"][..], &["init"]] {
        let run = cli(Some(&config), args, &env);
        let (stdout, stderr) = (&run.stdout, &run.stderr);
        assert_eq!(run.code, 10, "{args:?}: {stdout}\n{stderr}");
        assert!(!stdout.contains(wrong) && !stderr.contains(wrong));
        assert!(!stdout.contains(common::azurite::KEY) && !stderr.contains(common::azurite::KEY));
        let errors = run.error_lines();
        assert_eq!(errors.len(), 1, "{stderr}");
        assert!(
            errors[0].contains("denied (Authentication")
                || errors[0].contains("denied (AuthorizationFailure)")
                || errors[0].contains("failed check(s): access"),
            "{}",
            errors[0]
        );
    }
}

/// GCS through object_store's real client and the local XML-API server: init, full round trip
/// (single and multipart uploads, create-only writes, paged listings, ranged reads), and a wrong
/// bearer token.
#[test]
fn gcs_backup_restore_round_trip() {
    let gcs = FakeGcs::start(&["immich-gcs"], "");
    let source = Source::with_big_file(800);
    let sa = gcs.service_account_file(source.work.path());
    let storage = quick(StorageConfig {
        url: "gs://immich-gcs/nightly".into(),
        service_account: sa.display().to_string(),
        allow_http: true,
        ..StorageConfig::default()
    });
    let cfg = source.config_with(storage);
    let rt = rt();
    let store = Store::open(&cfg.storage).unwrap();
    let init = rt.block_on(immich_backup::repo::snapshots::init(&Repository::new(
        store.clone(),
    )));
    assert!(init.ok, "{init:#?}");
    assert!(
        init.checks.iter().all(|c| c.status == Status::Ok),
        "{init:#?}"
    );
    let report = backup(&rt, &cfg).expect("backup to GCS");
    assert_eq!(report.files as usize, source.lib.original_files);
    let seen = gcs.seen();
    assert!(
        seen.iter()
            .any(|s| s.starts_with("POST ") && s.contains("?uploads")),
        "no multipart upload"
    );
    assert!(
        seen.iter()
            .filter(|s| s.starts_with("PUT ") && s.contains("partNumber="))
            .count()
            > 2
    );
    restore_and_verify(&rt, &source, &cfg);
    let again = backup(&rt, &cfg).unwrap();
    assert_eq!(again.files_new, 0);
    // The second backup listed the stored content over several pages.
    assert!(
        gcs.seen()
            .iter()
            .any(|s| s.starts_with("GET ") && s.contains("continuation-token=")),
        "listing was not paged"
    );
    assert!(gcs
        .keys("immich-gcs")
        .iter()
        .all(|k| k.starts_with("nightly/")));
}

#[test]
fn gcs_wrong_token_and_missing_bucket_are_storage_errors() {
    let gcs = FakeGcs::start(&["immich-gcs"], "right-token-0123456789");
    let rt = rt();
    let mut storage = quick(StorageConfig {
        url: "gs://immich-gcs/nightly".into(),
        endpoint: gcs.base_url(),
        allow_http: true,
        ..StorageConfig::default()
    });
    storage
        .options
        .insert("bearer_token".into(), "wrong-token-9876543210".into());
    let store = Store::open(&storage).unwrap();
    let err = rt
        .block_on(snapshots::open_or_init(&Repository::new(store.clone())))
        .unwrap_err();
    assert_eq!(err.exit_code(), 10);
    let text = err.to_string();
    assert!(text.contains("denied (AuthenticationRequired)"), "{text}");
    assert!(!text.contains("wrong-token-9876543210") && !text.contains("right-token"));

    storage
        .options
        .insert("bearer_token".into(), "right-token-0123456789".into());
    storage.url = "gs://no-such-bucket/x".into();
    let store = Store::open(&storage).unwrap();
    let err = rt
        .block_on(snapshots::open_or_init(&Repository::new(store.clone())))
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "storage gs://no-such-bucket/x: bucket \"no-such-bucket\" does not exist (NoSuchBucket); create it, or correct [storage] url"
    );
}

/// Unknown schemes and options are configuration errors (exit 2) that name the problem.
#[test]
fn bad_urls_and_options_are_config_errors() {
    for (url, want) in [
        ("ftp://host/x", "unknown scheme"),
        (
            "https://example.com/bucket",
            "plain http(s) stores are not supported",
        ),
        ("not a url", "a relative path"),
        (
            "s3:bucket",
            "use /absolute/path, file:///absolute/path, s3://bucket/prefix",
        ),
    ] {
        let s = StorageConfig {
            url: url.into(),
            ..StorageConfig::default()
        };
        let err = Store::open(&s).unwrap_err();
        assert_eq!(err.exit_code(), 2, "{err}");
        assert!(err.to_string().contains(want), "{url}: {err}");
    }
    let mut s = StorageConfig {
        url: "s3://b/p".into(),
        ..StorageConfig::default()
    };
    s.options.insert("no_such_option".into(), "1".into());
    let err = Store::open(&s).unwrap_err();
    assert!(
        err.to_string()
            .contains("\"no_such_option\" is not an S3 option"),
        "{err}"
    );
    let s = StorageConfig {
        url: "s3://b/p".into(),
        access_key_id: "AKIA".into(),
        ..StorageConfig::default()
    };
    assert!(Store::open(&s)
        .unwrap_err()
        .to_string()
        .contains("go together"));
}

/// config.example.toml shows every key with its default.
#[test]
fn config_example_shows_the_defaults() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config.example.toml");
    let cfg = immich_backup::config::Config::load(Some(&path)).unwrap();
    assert_eq!(
        format!("{:?}", cfg.storage),
        format!("{:?}", StorageConfig::default())
    );
    assert_eq!(
        format!("{cfg:?}"),
        format!("{:?}", immich_backup::config::Config::default())
    );
}

/// A link that drops for 10 s in the middle of a multipart upload (the server's port closed and
/// every open connection cut, then back on the same port): with the default retry settings the
/// backup waits it out instead of failing, re-sends only what was in flight, and the snapshot
/// restores.
#[test]
fn s3_backup_waits_out_a_ten_second_outage() {
    let server = S3Server::start(&["photos"]);
    let source = Source::with_big_file(ASSETS);
    let mut storage = s3_storage(&server, "photos", "immich");
    let defaults = StorageConfig::default();
    storage.retry_timeout_secs = defaults.retry_timeout_secs;
    storage.max_retries = defaults.max_retries;
    let config = source.write_config_with(&storage, "config.toml");
    let env = [("IMMICH_BACKUP__STORAGE__SECRET_ACCESS_KEY", SECRET_KEY)];

    server
        .behaviour
        .stall_data_parts
        .store(true, Ordering::SeqCst);
    let mut child = command(Some(&config), &["--json", "backup"])
        .envs(env)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_until_a_part_stalls(&server, &mut child);
    server
        .behaviour
        .stall_data_parts
        .store(false, Ordering::SeqCst);
    let started = Instant::now();
    server.outage(Duration::from_secs(10));
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(started.elapsed() >= Duration::from_secs(10));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    // Every part was sent at most twice: the ones cut off in flight, again.
    let mut parts: BTreeMap<String, usize> = BTreeMap::new();
    for s in server.seen().iter().filter(|s| s.is_part()) {
        *parts.entry(s.target.clone()).or_default() += 1;
    }
    assert!(parts.values().all(|&n| n <= 2), "{parts:?}");
    let run = cli(Some(&config), &["--json", "check", "--read-data"], &env);
    run.expect_code(immich_backup::error::exit::OK);
    assert_eq!(report["signed"], true, "{report}");
}

/// Over a far link, small files are uploaded more at once than `[storage] concurrency` (their
/// uploads wait on the round trip, not on bandwidth), while multipart parts stay within it.
#[test]
fn s3_small_objects_go_up_more_at_once_than_parts() {
    let server = S3Server::start(&["photos"]);
    server
        .behaviour
        .data_put_delay_ms
        .store(100, Ordering::SeqCst);
    let source = Source::with_big_file(ASSETS);
    let mut storage = s3_storage(&server, "photos", "immich");
    storage.concurrency = 2;
    let cfg = source.config_with(storage);
    backup(&rt(), &cfg).expect("backup to S3");
    let puts = server.behaviour.puts_max.load(Ordering::SeqCst);
    let parts = server.behaviour.parts_max.load(Ordering::SeqCst);
    assert!(puts > 2 && puts <= 8, "small objects at once: {puts}");
    assert!((1..=2).contains(&parts), "parts at once: {parts}");
}

/// A backup across a network trusts its record of the stored content while no prune ran since the
/// store was listed: an unchanged library needs no listing of `data/`. A prune leaves a mark, and
/// the next backup lists the store again, so content the prune removed is uploaded again when a
/// file brings it back.
#[test]
fn s3_backups_list_the_content_again_only_after_a_prune() {
    let server = S3Server::start(&["photos"]);
    let source = Source::new(ASSETS);
    let storage = s3_storage(&server, "photos", "immich");
    let config = source.write_config_with(&storage, "config.toml");
    let env = [("IMMICH_BACKUP__STORAGE__SECRET_ACCESS_KEY", SECRET_KEY)];
    let lists_data = |server: &S3Server| {
        server
            .seen()
            .iter()
            .filter(|s| {
                s.method == "GET"
                    && s.target.contains("list-type=2")
                    && (s.target.contains("immich%2Fdata") || s.target.contains("immich/data"))
            })
            .count()
    };
    let backup = |what: &str| {
        let run = cli(Some(&config), &["--json", "backup"], &env);
        // 3: the photo the database names is missing (partial, but a snapshot).
        assert!(run.code == 0 || run.code == 3, "{what}: {}", run.stderr);
        run.json()
    };
    backup("first");
    assert!(lists_data(&server) >= 1);

    server.clear_log();
    let second = backup("unchanged");
    assert_eq!(
        lists_data(&server),
        0,
        "no listing of data/ without a prune"
    );
    assert_eq!(second["files_new"], 0);

    // A photo goes, its snapshot is forgotten and pruned: its content is deleted, with a mark.
    let gone = "library/admin/2024/IMG_0002.jpg";
    let bytes = std::fs::read(source.upload.join(gone)).unwrap();
    std::fs::remove_file(source.upload.join(gone)).unwrap();
    backup("without the photo");
    let run = cli(
        Some(&config),
        &["--json", "forget", "--keep-last", "1", "--prune"],
        &env,
    );
    assert_eq!(run.code, 0, "{}", run.stderr);
    let pruned = run.json();
    assert!(
        pruned["prune"]["content_removed"].as_u64().unwrap() >= 1,
        "{pruned}"
    );
    assert_eq!(server.keys("photos", "immich/prunes").len(), 1);

    // It comes back: the backup lists the store again and uploads it again.
    std::fs::write(source.upload.join(gone), &bytes).unwrap();
    server.clear_log();
    let back = backup("with the photo again");
    assert!(lists_data(&server) >= 1, "listed again after the prune");
    assert!(back["files_new"].as_u64().unwrap() >= 1, "{back}");
    let run = cli(Some(&config), &["--json", "check", "--read-data"], &env);
    assert_eq!(run.code, 0, "{}", run.stderr);
}

/// Wait (up to 3 minutes) until the backup `child` has a part upload held by the server's
/// `stall_data_parts`; it must not end first.
fn wait_until_a_part_stalls(server: &S3Server, child: &mut std::process::Child) {
    let deadline = Instant::now() + Duration::from_secs(180);
    while server.behaviour.stalled.load(Ordering::SeqCst) == 0 {
        assert!(
            Instant::now() < deadline,
            "no part upload reached the server"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "backup ended before uploading parts"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
