//! `immich-backup check` (the structure, no identity) against a real backup of the sample Immich in
//! a folder store: a clean store passes; a deleted, a cut-off content object and a removed refs file
//! are each named with the snapshot that needs them; leftovers are counted, not problems; the check
//! takes the shared lock.

mod common;

use std::fs;

use common::*;
use immich_backup::error::exit;

const ASSETS: usize = 24;

/// The problems of a `check --json` run, as (object, problem) pairs.
fn problems(run: &Run) -> Vec<(String, String, Vec<String>)> {
    run.json()["problems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["object"].as_str().unwrap().to_string(),
                p["problem"].as_str().unwrap().to_string(),
                p["snapshots"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|s| s.as_str().unwrap().to_string())
                    .collect(),
            )
        })
        .collect()
}

#[test]
fn check_names_each_missing_or_cut_off_object_with_its_snapshot_and_counts_leftovers() {
    let src = Source::new(ASSETS);
    let first = src.backup_lib();
    let config = src.write_config("check.toml");

    // A clean store passes, human and --json.
    let run = cli(Some(&config), &["check"], &[]);
    run.expect_code(exit::OK);
    assert!(run.stdout.contains("no problems"), "{}", run.stdout);
    let run = cli(Some(&config), &["--json", "check"], &[]);
    run.expect_code(exit::OK);
    let report = run.json();
    assert_eq!(report["ok"], true);
    assert_eq!(report["snapshots"], 1);
    let objects = data_objects(&src.store);
    assert_eq!(report["content_stored"], objects.len() as u64);
    assert_eq!(report["content_referenced"], objects.len() as u64);

    // Leftovers: an interrupted backup's folder and a stray file in data/ are named, not problems.
    let partial = src.store.join("snapshots/20200101T000000Z-0badc0de");
    fs::create_dir_all(&partial).unwrap();
    fs::write(partial.join("dump.sql.gz.age"), b"partial").unwrap();
    fs::write(src.store.join("data/README"), b"not ours").unwrap();
    let run = cli(Some(&config), &["--json", "check"], &[]);
    run.expect_code(exit::OK);
    let l = &run.json()["leftovers"];
    assert_eq!(l["incomplete_snapshots"][0], "20200101T000000Z-0badc0de");
    assert_eq!(l["stray_objects"][0], "data/README");

    // A deleted object and one cut to a few bytes: each named, with the snapshot, exit 4.
    let mut keys = objects.keys();
    let (gone, cut) = (keys.next().unwrap(), keys.next().unwrap());
    fs::remove_file(src.store.join(gone)).unwrap();
    fs::write(src.store.join(cut), b"age-encryption.org/v1\n").unwrap();
    let run = cli(Some(&config), &["--json", "check"], &[]);
    run.expect_code(exit::DAMAGED);
    let found = problems(&run);
    assert_eq!(found.len(), 2, "{found:?}");
    let by_object = |k: &str| found.iter().find(|(o, _, _)| o == k).cloned().unwrap();
    let (_, why, snaps) = by_object(gone);
    assert!(why.contains("missing"), "{why}");
    assert_eq!(snaps, std::slice::from_ref(&first.snapshot));
    let (_, why, snaps) = by_object(cut);
    assert!(why.contains("truncated"), "{why}");
    assert_eq!(snaps, std::slice::from_ref(&first.snapshot));
    // The human form names them too.
    let run = cli(Some(&config), &["check"], &[]);
    run.expect_code(exit::DAMAGED);
    assert!(
        run.stdout.contains(&format!("PROBLEM {gone}")),
        "{}",
        run.stdout
    );

    // A second snapshot of the same files shares the cut-off object: both snapshots are named
    // (the missing one was stored again by that backup, from the file still on disk).
    let second = src.backup_lib();
    let run = cli(Some(&config), &["--json", "check"], &[]);
    run.expect_code(exit::DAMAGED);
    let found = problems(&run);
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0].0, *cut);
    assert_eq!(
        found[0].2,
        [first.snapshot.clone(), second.snapshot.clone()]
    );

    // Without its refs, a snapshot's content is unknown: that is a problem of that snapshot.
    fs::remove_file(
        src.store
            .join(format!("snapshots/{}/refs.txt.gz", second.snapshot)),
    )
    .unwrap();
    let run = cli(Some(&config), &["--json", "check"], &[]);
    run.expect_code(exit::DAMAGED);
    let found = problems(&run);
    assert!(
        found.iter().any(|(o, w, s)| o.ends_with("refs.txt.gz")
            && w.contains("missing")
            && *s == [second.snapshot.clone()]),
        "{found:?}"
    );
}

#[test]
fn check_takes_the_shared_lock_unless_told_not_to() {
    let src = Source::new(ASSETS);
    src.backup_lib();
    let mut toml = src.toml();
    toml.extra = "[lock]\nwait_secs = 1\n".into();
    let config = toml.write(&src.work.path().join("check.toml"));
    // A prune holds the exclusive lock: check waits, then gives up with the lock's exit code.
    let (rt, lock) = hold_exclusive_lock(&src.config());
    cli(Some(&config), &["check"], &[("IMMICH_BACKUP_LOG", "off")]).expect_code(exit::LOCKED);
    let run = cli(Some(&config), &["check", "--no-lock"], &[]);
    run.expect_code(exit::OK);
    assert!(run.stderr.contains("--no-lock"), "{}", run.stderr);
    rt.block_on(lock.release());
    // With the lock gone, check takes its own and leaves none behind.
    cli(Some(&config), &["check"], &[]).expect_code(exit::OK);
    assert_eq!(fs::read_dir(src.store.join("locks")).unwrap().count(), 0);
}
