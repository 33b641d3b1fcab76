//! The agent end to end, on real data: a throwaway PostgreSQL cluster with an Immich-like database,
//! a sample UPLOAD_LOCATION and a local folder store.
//!
//! - forget + prune round trip: the kept snapshots restore byte-identical, nothing unreferenced is
//!   left, and it all runs with only the public recipients (no identity in the config);
//! - a backup and a prune started together: both finish, or the prune refuses with exit 11; every
//!   kept snapshot still restores;
//! - next-run computation with a manual clock;
//! - the real `immich-backup run` binary: backs up on a seconds-level cron, applies retention, serves
//!   `/healthz` and `/metrics` with the store's values, pings, and exits 0 on SIGTERM in the middle of
//!   a backup without leaving a visible partial snapshot or a lock;
//! - the agent's `[check]` schedules: the structural check and read-data slices run on their own
//!   crons, a damaged object makes `/healthz` 503 (and pings `/fail`) until its slice reads clean.

use std::collections::{BTreeSet, HashSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use immich_backup::backup::{self, BackupReport};
use immich_backup::config::Config;
use immich_backup::crypto::{self, Identities, Recipients};
use immich_backup::db;
use immich_backup::demo::sample::{self, PgCluster, SampleLibrary};
use immich_backup::demo::{compare_trees, local_config};
use immich_backup::format::{self, ContentId};
use immich_backup::policy::schedule::{ManualClock, Planner, Schedule};
use immich_backup::progress::Progress;
use immich_backup::repo::lock;
use immich_backup::repo::snapshots;
use immich_backup::repo::trust::Trust;
use immich_backup::repo::Repository;
use immich_backup::restore::{self, RestoreOptions};

const BIN: &str = env!("CARGO_BIN_EXE_immich-backup");

/// One source Immich (database + library), a key pair and a store.
struct Env {
    work: tempfile::TempDir,
    cluster: PgCluster,
    lib: PathBuf,
    sample: SampleLibrary,
    store_dir: PathBuf,
    identity: PathBuf,
    cfg: Config,
    store: Repository,
}

/// What the source looked like at one backup.
struct Saved {
    snapshot: String,
    lib: PathBuf,
    dump: String,
}

impl Env {
    fn new(assets: usize) -> Env {
        let work = tempfile::tempdir().unwrap();
        let cluster = PgCluster::start(None).expect("start PostgreSQL");
        sample::create_immich_like_db(&cluster, "immich", assets).unwrap();
        let lib = work.path().join("upload-location");
        let sample = sample::create_sample_library_for(&lib, assets).unwrap();
        let store_dir = work.path().join("store");
        std::fs::create_dir_all(&store_dir).unwrap();
        // The identity lives apart from everything the backup side is given.
        let identity = work.path().join("offline").join("identity.txt");
        std::fs::create_dir_all(identity.parent().unwrap()).unwrap();
        let key = crypto::generate_key();
        crypto::write_identity_file(&identity, &key).unwrap();
        let mut cfg = local_config(
            &cluster,
            &lib,
            &store_dir,
            &key.recipient,
            &work.path().join("cache"),
        );
        cfg.encryption.signing_key = {
            use age::secrecy::ExposeSecret;
            key.signing.to_text().expose_secret().to_string()
        };
        cfg.lock.wait_secs = 120;
        cfg.lock.stale_secs = 60;
        let store = Repository::open(&cfg.storage).unwrap();
        Env {
            work,
            cluster,
            lib,
            sample,
            store_dir,
            identity,
            cfg,
            store,
        }
    }

    /// A config file for the binary: only public keys, plus `extra` sections.
    fn config_file(&self, name: &str, extra: &str) -> PathBuf {
        let c = &self.cfg;
        let text = format!(
            "[immich]\nupload_location = {:?}\n\n[database]\nmode = \"local\"\nhost = \"127.0.0.1\"\nport = {}\nbin_dir = {:?}\n\n\
             [storage]\nurl = {:?}\n\n[encryption]\nrecipients = [{:?}]\nsigning_key = {:?}\n\n[backup]\ncache_dir = {:?}\n\n{extra}\n",
            c.immich.upload_location.display().to_string(),
            c.database.port,
            c.database.bin_dir,
            c.storage.url,
            c.encryption.recipients[0],
            c.encryption.signing_key,
            c.backup.cache_dir,
        );
        assert!(
            !text.contains("identity"),
            "the backup side gets no identity"
        );
        let path = self.work.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    async fn backup(&self) -> BackupReport {
        let recipients = Recipients::load(&self.cfg.encryption.recipients, None).unwrap();
        let database = db::connect(&self.cfg.database).unwrap();
        let r = backup::run(
            &self.cfg,
            database.as_ref(),
            &self.store,
            recipients,
            Progress::hidden(),
        )
        .await
        .unwrap();
        assert!(r.skipped.is_empty(), "{:?}", r.skipped);
        r
    }

    /// Remember the source as `snapshot` saw it (a copy of the library, the database dump).
    fn save(&self, snapshot: &str) -> Saved {
        let lib = self.work.path().join(format!("saved-{snapshot}"));
        let st = Command::new("cp")
            .arg("-a")
            .arg(&self.lib)
            .arg(&lib)
            .status()
            .unwrap();
        assert!(st.success());
        Saved {
            snapshot: snapshot.to_string(),
            lib,
            dump: self.cluster.canonical_dump("immich").unwrap(),
        }
    }

    fn sql(&self, sql: &str) {
        self.cluster.psql("immich", sql).unwrap();
    }
}

/// Restore `saved.snapshot` into a fresh cluster and folder with the identity; compare everything.
async fn restore_and_compare(env: &Env, saved: &Saved) {
    let target_cluster = PgCluster::start(None).unwrap();
    let target = env.work.path().join(format!("restored-{}", saved.snapshot));
    let mut cfg = local_config(
        &target_cluster,
        &target,
        &env.store_dir,
        &env.cfg.encryption.recipients[0],
        &env.work.path().join("cache-restore"),
    );
    cfg.encryption.identity_file = env.identity.display().to_string();
    let database = db::connect(&cfg.database).unwrap();
    let identities = Arc::new(Identities::load(&env.identity).unwrap());
    let trust = Trust::new(&identities, Vec::new(), false);
    let report = restore::run(
        database.as_ref(),
        &env.store,
        identities,
        RestoreOptions::new(&saved.snapshot, target.clone(), trust),
    )
    .await
    .unwrap_or_else(|e| panic!("restore {}: {e}", saved.snapshot));
    assert!(report.rows_match, "{:?}", report.row_checks);
    let diff = compare_trees(&saved.lib, &target, &env.cfg.immich.folders).unwrap();
    assert!(
        diff.differences.is_empty(),
        "snapshot {}: {:?}",
        saved.snapshot,
        diff.differences
    );
    assert!(diff.compared > 10);
    assert_eq!(
        target_cluster.canonical_dump("immich").unwrap(),
        saved.dump,
        "database of snapshot {}",
        saved.snapshot
    );
}

/// Complete snapshot ids in the store.
async fn complete_ids(store: &Repository) -> Vec<String> {
    snapshots::list_ids(store)
        .await
        .unwrap()
        .into_iter()
        .filter(|(_, c)| *c)
        .map(|(id, _)| id)
        .collect()
}

/// The content objects in the store.
async fn content(store: &Repository) -> BTreeSet<ContentId> {
    store
        .store()
        .list_keys(format::DATA_DIR)
        .await
        .unwrap()
        .into_iter()
        .map(|(k, _)| ContentId::from_key(&k).unwrap())
        .collect()
}

/// What the plaintext refs of the complete snapshots reference.
async fn referenced(store: &Repository) -> BTreeSet<ContentId> {
    let mut out = BTreeSet::new();
    for id in complete_ids(store).await {
        let gz = store
            .store()
            .get_bytes(&format::snapshot_key(&id, format::REFS_OBJECT))
            .await
            .unwrap();
        let mut text = String::new();
        flate2::read::GzDecoder::new(&gz[..])
            .read_to_string(&mut text)
            .unwrap();
        out.extend(text.lines().map(|l| l.parse::<ContentId>().unwrap()));
    }
    out
}

fn run_bin(config: &Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(BIN)
        .arg("--config")
        .arg(config)
        .args(args)
        .env_remove("IMMICH_BACKUP_CONFIG")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn forget_and_prune_round_trip_without_the_identity() {
    let env = Env::new(300);

    // Snapshot 1: the sample library, plus a photo only this snapshot will have.
    sample::add_photo(&env.lib, "library/admin/2019/only-in-s1.jpg", 300_000, 101).unwrap();
    let s1 = env.backup().await;
    let saved1 = env.save(&s1.snapshot);
    // Snapshot 2: that photo deleted, a new one, a database change.
    std::fs::remove_file(env.lib.join("library/admin/2019/only-in-s1.jpg")).unwrap();
    sample::add_photo(&env.lib, "upload/new/in-s2-and-s3.jpg", 200_000, 202).unwrap();
    env.sql("INSERT INTO system_metadata (key, value) VALUES ('agent-test', '{\"n\": 2}')");
    let s2 = env.backup().await;
    let saved2 = env.save(&s2.snapshot);
    // Snapshot 3: another photo, another change.
    sample::add_photo(&env.lib, "library/admin/2026/in-s3.jpg", 150_000, 303).unwrap();
    env.sql("UPDATE system_metadata SET value = '{\"n\": 3}' WHERE key = 'agent-test'");
    let s3 = env.backup().await;
    let saved3 = env.save(&s3.snapshot);
    assert_eq!(complete_ids(&env.store).await.len(), 3);

    // Leftovers: an interrupted backup from long ago, one still being written (its id says it
    // started now), orphan content.
    let old_incomplete = "20200101T000000Z-0badc0de";
    let fresh_incomplete = format::new_snapshot_id(Utc::now());
    let fresh_incomplete = fresh_incomplete.as_str();
    for id in [old_incomplete, fresh_incomplete] {
        env.store
            .store()
            .put_new(
                &format::snapshot_key(id, format::DUMP_OBJECT),
                bytes::Bytes::from_static(b"partial"),
            )
            .await
            .unwrap();
    }
    let orphan = ContentId([0xab; 32]);
    env.store
        .store()
        .put_new(&orphan.key(), bytes::Bytes::from_static(b"orphan"))
        .await
        .unwrap();

    let refs_before: BTreeSet<ContentId> = {
        let before = referenced(&env.store).await;
        assert!(before.len() > 10);
        before
    };
    let content_before = content(&env.store).await;

    // The binary, with a config holding only the recipient; keep the 2 newest.
    let config = env.config_file(
        "prune.toml",
        "[retention]\nkeep_last = 2\nkeep_daily = 0\nkeep_weekly = 0\nkeep_monthly = 0\n\n[lock]\nstale_secs = 60\n",
    );

    // Dry run: says what would go and why, changes nothing.
    let (code, out, err) = run_bin(&config, &["--json", "forget", "--dry-run", "--prune"]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["dry_run"], true);
    assert_eq!(v["removed"], serde_json::json!([s1.snapshot]));
    let decisions = v["decisions"].as_array().unwrap();
    assert_eq!(decisions.len(), 3);
    assert_eq!(decisions[0]["id"], s3.snapshot.as_str());
    assert_eq!(decisions[0]["keep"], true);
    assert_eq!(decisions[0]["reasons"][0]["rule"], "last");
    assert_eq!(decisions[2]["keep"], false);
    assert!(v["prune"]["content_removed"].as_u64().unwrap() >= 2);
    assert_eq!(complete_ids(&env.store).await.len(), 3);
    assert_eq!(content(&env.store).await, content_before);
    let (code, out, _) = run_bin(&config, &["forget", "--dry-run"]);
    assert_eq!(code, 0);
    assert!(out.contains("policy: keep 2 last snapshots (UTC)"), "{out}");
    assert!(
        out.contains(&format!("{} ", s1.snapshot)) && out.contains("remove"),
        "{out}"
    );
    // The columns line up under their headings.
    let head = out.lines().find(|l| l.starts_with("ID ")).expect("heading");
    let row = out
        .lines()
        .find(|l| l.starts_with(&s1.snapshot))
        .expect("row");
    let col = head.find("TIME").unwrap();
    assert!(row[col..].starts_with("20"), "{out}");
    // --keep-* flags replace [retention] (keep_last = 2) for one run: rules not given are off.
    let (code, out, err) = run_bin(&config, &["forget", "--dry-run", "--keep-last", "1"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("policy: keep 1 last snapshots (UTC) (--keep-* flags; [retention] not used)"),
        "{out}"
    );
    assert!(
        out.contains("1 snapshot(s) kept, 2 would be removed"),
        "{out}"
    );
    let (code, out, err) = run_bin(
        &config,
        &[
            "--json",
            "forget",
            "-n",
            "--keep-daily",
            "1",
            "--keep-yearly",
            "-1",
        ],
    );
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    // The newest for its day; the oldest as "oldest yearly" (the rule has count left).
    assert_eq!(v["removed"], serde_json::json!([s2.snapshot]), "{v}");
    assert_eq!(v["decisions"][0]["reasons"][0]["rule"], "daily", "{v}");
    assert_eq!(v["decisions"][2]["reasons"][0]["oldest"], true, "{v}");
    // --keep-within: the three snapshots were made within minutes of each other.
    let (code, out, err) = run_bin(&config, &["--json", "forget", "-n", "--keep-within", "1h"]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["removed"], serde_json::json!([]), "{v}");
    assert_eq!(v["decisions"][2]["reasons"][0]["rule"], "within", "{v}");
    let (code, _, err) = run_bin(&config, &["forget", "-n", "--keep-within", "7w"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--keep-within") && err.contains("7d"), "{err}");
    let (code, _, err) = run_bin(&config, &["forget", "-n", "--keep-last", "-2"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--keep-last"), "{err}");

    // For real.
    let (code, out, err) = run_bin(&config, &["--json", "forget", "--prune"]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["removed"], serde_json::json!([s1.snapshot]));
    assert_eq!(
        v["prune"]["incomplete_removed"],
        serde_json::json!([old_incomplete])
    );
    assert_eq!(
        v["prune"]["incomplete_kept"],
        serde_json::json!([fresh_incomplete])
    );

    // s1's folder is gone entirely, the recent incomplete folder stays, no lock is left.
    assert_eq!(
        complete_ids(&env.store).await,
        vec![s2.snapshot.clone(), s3.snapshot.clone()]
    );
    let folders: BTreeSet<String> = snapshots::list_ids(&env.store)
        .await
        .unwrap()
        .into_keys()
        .collect();
    assert_eq!(
        folders,
        BTreeSet::from([
            s2.snapshot.clone(),
            s3.snapshot.clone(),
            fresh_incomplete.to_string()
        ])
    );
    assert!(env
        .store
        .store()
        .list_keys(lock::LOCKS_DIR)
        .await
        .unwrap()
        .is_empty());

    // Exactly the referenced content remains.
    let now_referenced = referenced(&env.store).await;
    let now_content = content(&env.store).await;
    assert_eq!(
        now_content, now_referenced,
        "content == references of the kept snapshots"
    );
    assert!(!now_content.contains(&orphan));
    let dropped: Vec<_> = refs_before.difference(&now_referenced).collect();
    assert!(!dropped.is_empty(), "the photo only s1 had is gone");
    assert_eq!(
        v["prune"]["content_removed"].as_u64().unwrap() as usize,
        dropped.len() + 1,
        "its content and the orphan"
    );

    // Prune again: nothing more to do.
    let (code, out, err) = run_bin(&config, &["--json", "prune"]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["content_removed"], 0);

    // Every kept snapshot restores byte-identical (with the identity, which only restore has).
    restore_and_compare(&env, &saved2).await;
    restore_and_compare(&env, &saved3).await;
    drop(saved1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn backup_and_prune_started_together() {
    let env = Env::new(300);
    let first = env.backup().await;
    sample::add_photo(&env.lib, "library/admin/2019/old.jpg", 400_000, 7).unwrap();
    let second = env.backup().await;
    assert_ne!(first.snapshot, second.snapshot);
    // The next backup drops old.jpg, so a prune that ran in the middle of it could delete content
    // that it lists and dedups against (the sample's 9 MiB file is in every snapshot).
    std::fs::remove_file(env.lib.join("library/admin/2019/old.jpg")).unwrap();
    sample::add_photo(&env.lib, "upload/x/concurrent.jpg", 3_000_000, 8).unwrap();

    // Round 1: both at once, each may wait for the other: both finish.
    let config = env.config_file(
        "together.toml",
        "[retention]\nkeep_last = 1\nkeep_daily = 0\nkeep_weekly = 0\nkeep_monthly = 0\n\n[lock]\nstale_secs = 60\nwait_secs = 120\n",
    );
    let spawn = |args: &[&str]| {
        Command::new(BIN)
            .arg("--config")
            .arg(&config)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let b = spawn(&["--json", "--no-progress", "backup"]);
    let p = spawn(&["--json", "forget", "--prune"]);
    let b = b.wait_with_output().unwrap();
    let p = p.wait_with_output().unwrap();
    assert_eq!(
        b.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&b.stderr)
    );
    assert_eq!(
        p.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&p.stderr)
    );
    let backed: serde_json::Value = serde_json::from_slice(&b.stdout).unwrap();
    let third = backed["snapshot"].as_str().unwrap().to_string();
    let saved3 = env.save(&third);

    // Round 2: a prune while a backup holds the lock, with no waiting: it refuses (exit 11).
    sample::add_photo(&env.lib, "upload/x/round2.jpg", 2_000_000, 9).unwrap();
    let config0 = env.config_file(
        "nowait.toml",
        "[retention]\nkeep_last = 1\nkeep_daily = 0\nkeep_weekly = 0\nkeep_monthly = 0\n\n[lock]\nstale_secs = 60\nwait_secs = 0\n",
    );
    let pg = PgTableLock::take(&env.cluster); // holds the backup in its database phase
    let mut b = Command::new(BIN)
        .arg("--config")
        .arg(&config0)
        .args(["--json", "--no-progress", "backup"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for(Duration::from_secs(60), "the backup's lock", || {
        std::fs::read_dir(env.store_dir.join("locks"))
            .map(|d| d.count() > 0)
            .unwrap_or(false)
    });
    let (code, _, err) = run_bin(&config0, &["forget", "--prune"]);
    assert_eq!(code, 11, "prune must refuse while a backup runs: {err}");
    assert!(err.contains("shared lock of `backup`"), "{err}");
    drop(pg);
    let status = wait_timeout(&mut b, Duration::from_secs(120));
    let out = b.wait_with_output().unwrap();
    assert_eq!(status, Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let backed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let fourth = backed["snapshot"].as_str().unwrap().to_string();
    let saved4 = env.save(&fourth);

    // The store is consistent: every reference of every snapshot is stored, and every kept snapshot
    // restores byte-identical.
    let ids = complete_ids(&env.store).await;
    assert!(ids.contains(&fourth), "{ids:?}");
    let stored = content(&env.store).await;
    let missing: Vec<_> = referenced(&env.store)
        .await
        .difference(&stored)
        .cloned()
        .collect();
    assert!(missing.is_empty(), "referenced but not stored: {missing:?}");
    assert!(env
        .store
        .store()
        .list_keys(lock::LOCKS_DIR)
        .await
        .unwrap()
        .is_empty());
    if ids.contains(&third) {
        restore_and_compare(&env, &saved3).await;
    }
    restore_and_compare(&env, &saved4).await;
}

#[test]
fn next_run_computation_with_a_controllable_clock() {
    let t = |s: &str| DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc);
    let clock = ManualClock::new(t("2026-06-30T21:59:59Z"));
    // 00:00 in Berlin (CEST, +02:00) is 22:00 UTC.
    let mut p = Planner::new(Schedule::parse("@daily", "Europe/Berlin").unwrap(), false);
    assert_eq!(p.next(&clock), Some(t("2026-06-30T22:00:00Z")));
    clock.set(t("2026-06-30T22:00:00Z"));
    assert_eq!(p.next(&clock), Some(t("2026-07-01T22:00:00Z")));
    // Every 10 seconds, 6 fields.
    let mut p = Planner::new(Schedule::parse("*/10 * * * * *", "UTC").unwrap(), true);
    assert_eq!(
        p.next(&clock),
        Some(t("2026-06-30T22:00:00Z")),
        "backup_on_start: now"
    );
    assert_eq!(p.next(&clock), Some(t("2026-06-30T22:00:10Z")));
    // 5 fields, weekdays at 03:15 in New York (EDT, -04:00); Friday evening → Monday.
    let mut p = Planner::new(
        Schedule::parse("15 3 * * 1-5", "America/New_York").unwrap(),
        false,
    );
    clock.set(t("2026-07-03T12:00:00Z")); // a Friday
    assert_eq!(p.next(&clock), Some(t("2026-07-06T07:15:00Z")));
}

/// Holds `ACCESS EXCLUSIVE` on the asset table in an open transaction: pg_dump waits for it.
struct PgTableLock {
    child: Child,
}

impl PgTableLock {
    fn take(cluster: &PgCluster) -> PgTableLock {
        let mut cmd = cluster.client_command("psql");
        cmd.args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", "immich"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let mut child = cmd.spawn().unwrap();
        child
            .stdin
            .as_mut()
            .unwrap()
            .write_all(b"BEGIN;\nLOCK TABLE public.asset IN ACCESS EXCLUSIVE MODE;\n")
            .unwrap();
        child.stdin.as_mut().unwrap().flush().unwrap();
        wait_for(Duration::from_secs(30), "the table lock", || {
            cluster
                .psql(
                    "immich",
                    "SELECT count(*) FROM pg_locks WHERE relation = 'public.asset'::regclass AND mode = 'AccessExclusiveLock' AND granted",
                )
                .map(|s| s.trim() == "1")
                .unwrap_or(false)
        });
        PgTableLock { child }
    }
}

impl Drop for PgTableLock {
    fn drop(&mut self) {
        drop(self.child.stdin.take()); // psql exits, the transaction ends
        let _ = self.child.wait();
    }
}

fn wait_for(limit: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn wait_timeout(child: &mut Child, limit: Duration) -> Option<i32> {
    let start = Instant::now();
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st.code();
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            panic!("process did not exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// GET `path` from the agent: (status, body).
fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut resp = String::new();
    s.read_to_string(&mut resp).ok()?;
    let status = resp.split_whitespace().nth(1)?.parse().ok()?;
    let body = resp.split_once("\r\n\r\n")?.1.to_string();
    Some((status, body))
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .unwrap_or_else(|| panic!("{name} missing in\n{text}"))
        .parse()
        .unwrap()
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A tiny HTTP server recording the paths it is asked for (the healthchecks.io stand-in).
fn ping_server() -> (u16, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let mut reader = BufReader::new(conn.try_clone().unwrap());
            let mut line = String::new();
            if reader.read_line(&mut line).is_err() {
                continue;
            }
            let mut len = 0usize;
            loop {
                let mut h = String::new();
                if reader.read_line(&mut h).is_err() || h.trim().is_empty() {
                    break;
                }
                if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
                    len = v.trim().parse().unwrap_or(0);
                }
            }
            let mut body = vec![0u8; len];
            let _ = reader.read_exact(&mut body);
            let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
            log.lock().unwrap().push(path);
            let _ = conn
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nOK");
        }
    });
    (port, seen)
}

/// The sizes of `data/` and `snapshots/` on disk.
async fn store_bytes(store: &Repository) -> u64 {
    let mut total = 0;
    for dir in [format::DATA_DIR, format::SNAPSHOTS_DIR] {
        total += store
            .store()
            .list_keys(dir)
            .await
            .unwrap()
            .iter()
            .map(|(_, s)| s)
            .sum::<u64>();
    }
    total
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn agent_backs_up_on_schedule_serves_health_and_stops_on_sigterm() {
    let env = Env::new(200);
    let port = free_port();
    let (ping_port, pings) = ping_server();
    let config = env.config_file(
        "agent.toml",
        &format!(
            "[schedule]\ncron = \"*/2 * * * * *\"\ntimezone = \"Europe/Berlin\"\n\n\
             [retention]\nkeep_last = 2\nkeep_daily = 0\nkeep_weekly = 0\nkeep_monthly = 0\n\n\
             [lock]\nstale_secs = 60\n\n\
             [agent]\nlisten = \"127.0.0.1:{port}\"\ngrace_secs = 600\nping_url = \"http://127.0.0.1:{ping_port}/check/\"\n"
        ),
    );
    let log = env.work.path().join("agent.log");
    let mut agent = Command::new(BIN)
        .arg("--config")
        .arg(&config)
        .arg("run")
        .env("IMMICH_BACKUP_LOG", "immich_backup=debug")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let show_log = || std::fs::read_to_string(&log).unwrap_or_default();

    // Before the first backup: healthy, waiting.
    wait_for(Duration::from_secs(30), "the health endpoint", || {
        http_get(port, "/healthz").is_some()
    });
    let (code, body) = http_get(port, "/healthz").unwrap();
    assert_eq!(code, 200, "{body}");
    // `health` (the container's healthcheck) asks the same endpoint from [agent] listen.
    let (code, out, err) = run_bin(&config, &["health"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.starts_with("ok"), "{out}");
    let (code, out, _) = run_bin(&config, &["--json", "health"]);
    assert_eq!(code, 0);
    let probe: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(probe["healthy"], true, "{out}");
    assert_eq!(probe["status"], 200, "{out}");
    assert_eq!(
        probe["url"],
        format!("http://127.0.0.1:{port}/healthz"),
        "{out}"
    );

    // Scheduled backups happen, and retention keeps 2.
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let (_, m) = http_get(port, "/metrics").unwrap();
        if metric(&m, "immich_backup_successes_total") >= 3.0
            && metric(&m, "immich_backup_running") == 0.0
        {
            break;
        }
        assert_eq!(
            metric(&m, "immich_backup_failures_total"),
            0.0,
            "{}",
            show_log()
        );
        assert!(
            Instant::now() < deadline,
            "no scheduled backups:\n{}",
            show_log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Hold the next backup in the middle of uploading its dump, so the store and the numbers stand
    // still: pg_dumpall dumps a database of ~20 MB of text first (by name), which starts the dump
    // object's multipart upload, then waits for a lock on the Immich database's asset table.
    env.cluster
        .psql(
            "postgres",
            "CREATE DATABASE aaa_filler;\n\\connect aaa_filler\nCREATE TABLE filler AS SELECT md5(g::text) || md5((g * 7)::text) AS x FROM generate_series(1, 400000) AS g;\n",
        )
        .unwrap();
    // Backups started from now on dump it: wait for one that started before to be out of the way.
    let (_, m) = http_get(port, "/metrics").unwrap();
    let done = metric(&m, "immich_backup_successes_total");
    wait_for(Duration::from_secs(120), "a backup with the filler", || {
        http_get(port, "/metrics")
            .map(|(_, m)| metric(&m, "immich_backup_successes_total") > done)
            .unwrap_or(false)
    });
    let pg = PgTableLock::take(&env.cluster);
    wait_for(
        Duration::from_secs(120),
        "a backup waiting on the table lock",
        || {
            env.cluster
                .psql(
                    "immich",
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND datname = 'immich'",
                )
                .map(|s| s.trim() != "0")
                .unwrap_or(false)
        },
    );
    let ids = complete_ids(&env.store).await;
    let on_disk = |dir: &Path| -> BTreeSet<String> {
        std::fs::read_dir(dir)
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    };
    let snapshots_dir = env.store_dir.join("snapshots");
    let uploading: Vec<String> = on_disk(&snapshots_dir)
        .into_iter()
        .filter(|id| !ids.contains(id) && !on_disk(&snapshots_dir.join(id)).is_empty())
        .collect();
    assert_eq!(
        uploading.len(),
        1,
        "the blocked backup's folder: {uploading:?}"
    );
    let partial = on_disk(&snapshots_dir.join(&uploading[0]));
    assert!(
        partial.iter().any(|f| f.starts_with("dump.sql.gz.age#")),
        "the dump's multipart upload is in flight: {partial:?}"
    );
    assert_eq!(ids.len(), 2, "retention keeps the 2 newest: {ids:?}");
    let newest = ids.last().unwrap().clone();
    let summary: format::Summary = serde_json::from_slice(
        &env.store
            .store()
            .get_bytes(&format::snapshot_key(&newest, format::SUMMARY_OBJECT))
            .await
            .unwrap(),
    )
    .unwrap();

    let (code, body) = http_get(port, "/healthz").unwrap();
    assert_eq!(code, 200, "{body}");
    assert!(body.starts_with("ok: last successful backup"), "{body}");
    assert!(body.contains(&newest), "{body}");
    assert!(body.contains("a backup is running"), "{body}");
    let (code, m) = http_get(port, "/metrics").unwrap();
    assert_eq!(code, 200);
    assert_eq!(metric(&m, "immich_backup_up"), 1.0);
    assert_eq!(metric(&m, "immich_backup_running"), 1.0);
    assert_eq!(metric(&m, "immich_backup_snapshots"), 2.0);
    assert_eq!(metric(&m, "immich_backup_failures_total"), 0.0);
    assert!(metric(&m, "immich_backup_successes_total") >= 3.0);
    assert_eq!(
        metric(&m, "immich_backup_last_files"),
        env.sample.original_files as f64
    );
    assert_eq!(metric(&m, "immich_backup_last_files"), summary.files as f64);
    assert_eq!(metric(&m, "immich_backup_last_bytes"), summary.bytes as f64);
    let ts = metric(&m, "immich_backup_last_success_timestamp_seconds");
    assert!(
        (ts - summary.time.timestamp_millis() as f64 / 1000.0).abs() < 0.002,
        "{ts} vs {}",
        summary.time
    );
    assert!(metric(&m, "immich_backup_last_duration_seconds") > 0.0);
    assert_eq!(
        metric(&m, "immich_backup_store_bytes"),
        store_bytes(&env.store).await as f64
    );
    assert_eq!(http_get(port, "/nope").unwrap().0, 404);

    // Pings: start before each backup, success after.
    {
        let seen = pings.lock().unwrap();
        assert!(
            seen.iter().filter(|p| *p == "/check/start").count() >= 4,
            "{seen:?}"
        );
        assert!(
            seen.iter().filter(|p| *p == "/check").count() >= 3,
            "{seen:?}"
        );
        assert!(!seen.iter().any(|p| p == "/check/fail"), "{seen:?}");
    }

    // SIGTERM in the middle of that backup: exit 0, promptly, nothing partial visible, no lock left.
    let asked = Instant::now();
    // SAFETY: sending a signal to our own child process.
    assert_eq!(unsafe { libc::kill(agent.id() as i32, libc::SIGTERM) }, 0);
    let code = wait_timeout(&mut agent, Duration::from_secs(20));
    let took = asked.elapsed();
    eprintln!("the agent exited {took:?} after SIGTERM");
    drop(pg);
    assert_eq!(code, Some(0), "{}", show_log());
    assert!(took < Duration::from_secs(10), "took {took:?}");
    assert!(show_log().contains("abandoned"), "{}", show_log());
    assert_eq!(
        complete_ids(&env.store).await,
        ids,
        "no new (partial) snapshot is visible"
    );
    let left = on_disk(&snapshots_dir.join(&uploading[0]));
    assert!(
        !left.contains(format::MANIFEST_OBJECT) && !left.contains(format::DUMP_OBJECT),
        "the abandoned upload never became an object: {left:?}"
    );
    assert!(
        env.store
            .store()
            .list_keys(lock::LOCKS_DIR)
            .await
            .unwrap()
            .is_empty(),
        "lock left behind"
    );
    let (code, out, err) = run_bin(&config, &["--json", "snapshots"]);
    assert_eq!(code, 0, "{err}");
    let listed: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    assert_eq!(listed.len(), 2);

    // The next backup after the interruption works (and reuses what was stored).
    let after = env.backup().await;
    assert_eq!(after.files_new, 0);
    let ids: HashSet<String> = complete_ids(&env.store).await.into_iter().collect();
    assert!(ids.contains(&after.snapshot));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_reports_a_failed_backup() {
    // No database needed: it is not reachable, so the backup fails.
    let work = tempfile::tempdir().unwrap();
    let lib = work.path().join("lib");
    sample::create_sample_library(&lib).unwrap();
    let store_dir = work.path().join("store");
    std::fs::create_dir_all(&store_dir).unwrap();
    let key = crypto::generate_key();
    let port = free_port();
    let dead_pg = free_port();
    let (ping_port, pings) = ping_server();
    let config = work.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "[immich]\nupload_location = {:?}\n\n[database]\nhost = \"127.0.0.1\"\nport = {dead_pg}\nbin_dir = {:?}\n\n\
             [storage]\nurl = \"file://{}\"\n\n[encryption]\nrecipients = [{:?}]\n\n[backup]\ncache_dir = {:?}\n\n\
             [schedule]\ncron = \"@daily\"\nbackup_on_start = true\n\n\
             [agent]\nlisten = \"127.0.0.1:{port}\"\nping_url = \"http://127.0.0.1:{ping_port}/hc\"\n",
            lib.display().to_string(),
            sample::find_pg_bin_dir().unwrap().display().to_string(),
            store_dir.display(),
            key.recipient,
            work.path().join("cache").display().to_string(),
        ),
    )
    .unwrap();
    let mut agent = Command::new(BIN)
        .arg("--config")
        .arg(&config)
        .arg("run")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut last = (0, String::new());
    wait_for(
        Duration::from_secs(60),
        "the failure to show",
        || match http_get(port, "/metrics") {
            Some((_, m)) if metric(&m, "immich_backup_failures_total") >= 1.0 => {
                last = http_get(port, "/healthz").unwrap();
                true
            }
            _ => false,
        },
    );
    assert_eq!(last.0, 503, "{}", last.1);
    assert!(last.1.starts_with("last backup failed"), "{}", last.1);
    // The healthcheck command says unhealthy (1), with the agent's reason.
    let (code, out, err) = run_bin(&config, &["health"]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(out.starts_with("last backup failed"), "{out}");
    let (_, m) = http_get(port, "/metrics").unwrap();
    assert_eq!(metric(&m, "immich_backup_up"), 0.0);
    assert_eq!(
        metric(&m, "immich_backup_last_success_timestamp_seconds"),
        0.0
    );
    assert!(metric(&m, "immich_backup_next_run_timestamp_seconds") > 0.0);
    wait_for(Duration::from_secs(10), "the failure ping", || {
        pings.lock().unwrap().iter().any(|p| p == "/hc/fail")
    });
    assert!(pings.lock().unwrap().iter().any(|p| p == "/hc/start"));

    // Idle: SIGTERM exits 0 at once.
    // SAFETY: sending a signal to our own child process.
    assert_eq!(unsafe { libc::kill(agent.id() as i32, libc::SIGTERM) }, 0);
    assert_eq!(wait_timeout(&mut agent, Duration::from_secs(10)), Some(0));
}

/// `health` with nothing listening is unhealthy (1) and says what to check; without `[agent]
/// listen` it is a usage error naming the key; `--url` needs no config at all.
#[test]
fn health_names_an_agent_it_cannot_reach_and_a_missing_listen() {
    let work = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = work.path().join("c.toml");
    std::fs::write(
        &config,
        format!("[storage]\nurl = \"/tmp/x\"\n\n[agent]\nlisten = \":{port}\"\n"),
    )
    .unwrap();
    let (code, out, err) = run_bin(&config, &["health", "--timeout", "2"]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        err.contains(&format!(
            "cannot reach the agent at http://127.0.0.1:{port}/healthz"
        )) && err.contains("is `immich-backup run` running"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");

    std::fs::write(&config, "[storage]\nurl = \"/tmp/x\"\n").unwrap();
    let (code, _, err) = run_bin(&config, &["health"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("[agent] listen is not set"), "{err}");

    let out = Command::new(BIN)
        .args(["health", "--url"])
        .arg(format!("http://127.0.0.1:{port}/healthz"))
        .env_remove("IMMICH_BACKUP_CONFIG")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot reach the agent"));
}

/// The systemd units in examples/systemd are valid (as `systemd-analyze verify` reads them, with
/// this build's binary where the units expect the installed one).
#[test]
fn systemd_examples_verify() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/systemd");
    let work = tempfile::tempdir().unwrap();
    let mut units = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path)
            .unwrap()
            .replace("/usr/local/bin/immich-backup", BIN);
        let copy = work.path().join(path.file_name().unwrap());
        std::fs::write(&copy, text).unwrap();
        units.push(copy);
    }
    assert_eq!(units.len(), 3, "{units:?}");
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .args(&units)
        .output()
        .expect("systemd-analyze (Debian's systemd package; .ci/run installs it)");
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn config_example_shows_the_agent_defaults() {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("config.example.toml");
    let cfg = Config::load(Some(&example)).unwrap();
    let defaults = Config::default();
    assert_eq!(cfg.retention, defaults.retention);
    assert_eq!(cfg.schedule, defaults.schedule);
    assert_eq!(cfg.lock, defaults.lock);
    assert_eq!(cfg.agent, defaults.agent);
    assert_eq!(cfg.check, defaults.check);
    assert_eq!(cfg.notify, defaults.notify);
    assert_eq!(cfg.hooks, defaults.hooks);
    assert_eq!(
        (
            defaults.retention.keep_daily,
            defaults.retention.keep_weekly,
            defaults.retention.keep_monthly
        ),
        (7, 4, 6)
    );
    assert_eq!(defaults.schedule.cron, "@daily");
    assert!(
        defaults.agent.listen.is_empty(),
        "the endpoint is off by default"
    );
}

/// `[check]` in the agent: `check --identity` and read-data slices on their own crons (no backup
/// runs: the schedule is yearly); a flipped byte in a content object is found by the slice it is
/// in, makes `/healthz` 503 with the reason and pings `/fail`; once the object is whole again and
/// its slice reads clean, the agent is healthy again. The next slice survives a restart (cache).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_runs_scheduled_checks_and_reports_damage_until_it_is_gone() {
    let env = Env::new(40);
    env.backup().await;
    let port = free_port();
    let (ping_port, pings) = ping_server();
    let config = env.config_file(
        "agent.toml",
        &format!("[schedule]\ncron = \"@yearly\"\n\n[agent]\nlisten = \"127.0.0.1:{port}\"\n"),
    );
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str(&format!(
        "\n[check]\ncron = \"*/2 * * * * *\"\nread_data_cron = \"*/2 * * * * *\"\nread_data_slices = 2\n\
         identity_file = {:?}\nping_url = \"http://127.0.0.1:{ping_port}/chk\"\n",
        env.identity.display().to_string()
    ));
    std::fs::write(&config, text).unwrap();
    let log = env.work.path().join("agent-check.log");
    let mut agent = Command::new(BIN)
        .arg("--config")
        .arg(&config)
        .arg("run")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let show_log = || std::fs::read_to_string(&log).unwrap_or_default();
    let metrics = || {
        http_get(port, "/metrics")
            .map(|(_, m)| m)
            .unwrap_or_default()
    };
    let has = |m: &str, name: &str| m.lines().any(|l| l.starts_with(&format!("{name} ")));

    // Both kinds run; both slices are read; all is well.
    wait_for(Duration::from_secs(90), "checks of both kinds", || {
        let m = metrics();
        has(&m, "immich_backup_checks_total")
            && metric(&m, "immich_backup_checks_total") >= 4.0
            && metric(&m, "immich_backup_read_data_last_timestamp_seconds") > 0.0
            && metric(&m, "immich_backup_check_last_timestamp_seconds") > 0.0
    });
    let m = metrics();
    assert_eq!(
        metric(&m, "immich_backup_check_failures_total"),
        0.0,
        "{}",
        show_log()
    );
    assert!(metric(&m, "immich_backup_verified_bytes_total") > 0.0);
    let (code, body) = http_get(port, "/healthz").unwrap();
    assert_eq!(code, 200, "{body}");
    wait_for(Duration::from_secs(10), "the success ping", || {
        pings.lock().unwrap().iter().any(|p| p == "/chk")
    });
    let next = std::fs::read_to_string(env.cfg.cache_dir().join("check-next-slice")).unwrap();
    assert!(["1", "2"].contains(&next.trim()), "{next}");

    // A flipped byte: only reading it back can find it.
    let objects = content(&env.store).await;
    let victim = objects.iter().next().unwrap().key();
    let path = env.store_dir.join(&victim);
    let whole = std::fs::read(&path).unwrap();
    let mut bad = whole.clone();
    let mid = bad.len() / 2;
    bad[mid] ^= 0x20;
    std::fs::write(&path, &bad).unwrap();
    let mut reason = String::new();
    wait_for(
        Duration::from_secs(60),
        "the damage to show",
        || match http_get(port, "/healthz") {
            Some((503, body)) => {
                reason = body;
                true
            }
            _ => false,
        },
    );
    assert!(
        reason.contains("read-data") && reason.contains(&victim),
        "{reason}"
    );
    let m = metrics();
    assert_eq!(metric(&m, "immich_backup_read_data_damaged_slices"), 1.0);
    assert_eq!(metric(&m, "immich_backup_up"), 0.0);
    wait_for(Duration::from_secs(10), "the failure ping", || {
        pings.lock().unwrap().iter().any(|p| p == "/chk/fail")
    });

    // Whole again: once its slice has been read again, healthy.
    std::fs::write(&path, &whole).unwrap();
    wait_for(Duration::from_secs(60), "health to come back", || {
        matches!(http_get(port, "/healthz"), Some((200, _)))
    });
    assert_eq!(
        metric(&metrics(), "immich_backup_read_data_damaged_slices"),
        0.0
    );

    // SAFETY: sending a signal to our own child process.
    assert_eq!(unsafe { libc::kill(agent.id() as i32, libc::SIGTERM) }, 0);
    assert_eq!(
        wait_timeout(&mut agent, Duration::from_secs(30)),
        Some(0),
        "{}",
        show_log()
    );
}

/// `[check] read_data_cron` without an identity, a bad cron and zero slices are refused at load,
/// each naming its key.
#[test]
fn check_config_mistakes_name_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    for (section, wanted) in [
        (
            "read_data_cron = \"@daily\"\n",
            "[check] read_data_cron needs [check] identity_file",
        ),
        ("cron = \"61 * * * *\"\n", "[check] cron \"61 * * * *\""),
        (
            "read_data_slices = 0\n",
            "[check] read_data_slices must be at least 1",
        ),
        (
            "ping_url = \"ftp://x\"\n",
            "[check] ping_url must be an http",
        ),
    ] {
        std::fs::write(&path, format!("[check]\n{section}")).unwrap();
        let err = Config::load(Some(&path)).unwrap_err().to_string();
        assert!(err.contains(wanted), "{section}: {err}");
    }
}
