//! `immich-backup check` against real backups of the sample Immich, in a folder store and on an S3
//! server. Without the identity: a clean store passes; a deleted, a cut-off content object and a
//! removed refs file are each named with the snapshot that needs them; leftovers are counted, not
//! problems; the check takes the shared lock. With the identity: a truncation any size, a damaged
//! dump and refs that lack an address are found without reading the data; `--read-data` finds a
//! flipped byte; each damaged object is named with its paths; `n/m` slices read every object once;
//! a wrong identity, or none, is told as such.

mod common;

use std::collections::BTreeSet;
use std::fs;

use common::*;
use immich_backup::error::exit;
use immich_backup::format::Entry;

const ASSETS: usize = 24;

/// The problems of a `check --json` run, as (object, problem) pairs.
fn problems(run: &Run) -> Vec<(String, String, Vec<String>)> {
    problems_with_paths(run)
        .into_iter()
        .map(|(o, w, s, _)| (o, w, s))
        .collect()
}

/// The problems of a `check --json` run, with the paths each names.
fn problems_with_paths(run: &Run) -> Vec<(String, String, Vec<String>, Vec<String>)> {
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
                p["paths"]
                    .as_array()
                    .map(|a| a.iter().map(|s| s.as_str().unwrap().to_string()).collect())
                    .unwrap_or_default(),
            )
        })
        .collect()
}

/// Files of the snapshot with content of their own (no other file shares it), larger than 2 KiB.
fn distinct_files(src: &Source, snapshot: &str) -> Vec<Entry> {
    let entries = file_list(&src.store, &src.identity, snapshot);
    let mut seen = std::collections::HashMap::new();
    for e in entries.iter().filter_map(|e| e.content) {
        *seen.entry(e).or_insert(0) += 1;
    }
    entries
        .into_iter()
        .filter(|e| e.size > 2048 && e.content.is_some_and(|c| seen[&c] == 1))
        .collect()
}

#[test]
fn check_names_each_missing_or_cut_off_object_with_its_snapshot_and_counts_leftovers() {
    let src = Source::new(ASSETS);
    let first = src.backup_lib();
    let config = src.write_config("check.toml");

    // A clean store passes, human and --json.
    let run = cli(Some(&config), &["check", "--no-identity"], &[]);
    run.expect_code(exit::OK);
    assert!(run.stdout.contains("no problems"), "{}", run.stdout);
    let run = cli(Some(&config), &["--json", "check", "--no-identity"], &[]);
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
    let run = cli(Some(&config), &["--json", "check", "--no-identity"], &[]);
    run.expect_code(exit::OK);
    let l = &run.json()["leftovers"];
    assert_eq!(l["incomplete_snapshots"][0], "20200101T000000Z-0badc0de");
    assert_eq!(l["stray_objects"][0], "data/README");

    // A deleted object and one cut to a few bytes: each named, with the snapshot, exit 4.
    let mut keys = objects.keys();
    let (gone, cut) = (keys.next().unwrap(), keys.next().unwrap());
    fs::remove_file(src.store.join(gone)).unwrap();
    fs::write(src.store.join(cut), b"age-encryption.org/v1\n").unwrap();
    let run = cli(Some(&config), &["--json", "check", "--no-identity"], &[]);
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
    let run = cli(Some(&config), &["check", "--no-identity"], &[]);
    run.expect_code(exit::DAMAGED);
    assert!(
        run.stdout.contains(&format!("PROBLEM {gone}")),
        "{}",
        run.stdout
    );

    // A second snapshot of the same files shares the cut-off object: both snapshots are named
    // (the missing one was stored again by that backup, from the file still on disk).
    let second = src.backup_lib();
    let run = cli(Some(&config), &["--json", "check", "--no-identity"], &[]);
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
    let run = cli(Some(&config), &["--json", "check", "--no-identity"], &[]);
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

/// With the identity, the sizes are exact: a file cut by one byte is found from the listing (the
/// structural check cannot see it); a flipped byte needs the data read back; each is named with the
/// path of the file it holds. A damaged dump and refs that lack an address are problems too.
#[test]
fn check_with_the_identity_finds_any_truncation_and_read_data_any_damage_with_the_paths() {
    let src = Source::new(ASSETS);
    let snap = src.backup_lib().snapshot;
    let config = src.write_config("check.toml");

    // Clean: every list, dump and (read back) object verifies.
    let run = cli(Some(&config), &["--json", "check", "--read-data"], &[]);
    run.expect_code(exit::OK);
    let r = run.json();
    assert_eq!(r["with_identity"], true);
    assert_eq!(r["file_lists_verified"], 1);
    assert_eq!(r["dumps_verified"], 1);
    assert_eq!(r["read_data"]["objects"], r["content_referenced"]);
    assert_eq!(r["read_data"]["damaged"], 0);
    assert!(r["read_data"]["bytes"].as_u64().unwrap() > 0);

    let files = distinct_files(&src, &snap);
    let [flipped, cut, gone] = [&files[0], &files[1], &files[2]];
    let object = |e: &Entry| e.content.unwrap().key();
    flip_middle_byte(&src.store.join(object(flipped)));
    let path = src.store.join(object(cut));
    let bytes = fs::read(&path).unwrap();
    fs::write(&path, &bytes[..bytes.len() - 1]).unwrap();
    fs::remove_file(src.store.join(object(gone))).unwrap();

    // Without the identity only the missing object shows.
    let run = cli(Some(&config), &["--json", "check", "--no-identity"], &[]);
    run.expect_code(exit::DAMAGED);
    let found: Vec<String> = problems(&run).into_iter().map(|p| p.0).collect();
    assert_eq!(found, [object(gone)]);

    // With it, the cut one too, each with its path; the flipped one keeps its size.
    let run = cli(Some(&config), &["--json", "check"], &[]);
    run.expect_code(exit::DAMAGED);
    let found = problems_with_paths(&run);
    assert_eq!(found.len(), 2, "{found:?}");
    for (e, what) in [(cut, "truncated"), (gone, "missing")] {
        let p = found.iter().find(|p| p.0 == object(e)).expect("named");
        assert!(p.1.contains(what), "{p:?}");
        assert_eq!(p.2, std::slice::from_ref(&snap));
        assert_eq!(p.3, std::slice::from_ref(&e.path));
    }

    // Reading the data back finds the flipped byte; the human form lists the path under it.
    let run = cli(Some(&config), &["--json", "check", "--read-data"], &[]);
    run.expect_code(exit::DAMAGED);
    let found = problems_with_paths(&run);
    assert_eq!(found.len(), 3, "{found:?}");
    let p = found
        .iter()
        .find(|p| p.0 == object(flipped))
        .expect("named");
    assert!(p.1.contains("read back"), "{p:?}");
    assert_eq!(p.3, std::slice::from_ref(&flipped.path));
    assert_eq!(run.json()["read_data"]["damaged"], 1);
    let run = cli(Some(&config), &["check", "--read-data"], &[]);
    run.expect_code(exit::DAMAGED);
    assert!(
        run.stdout.contains(&format!("PROBLEM {}", object(flipped)))
            && run.stdout.contains(&format!("      {}", flipped.path)),
        "{}",
        run.stdout
    );

    // A new backup stores the missing and cut-off content again; a damaged dump and refs that
    // lack an address (what prune trusts) are problems of that snapshot.
    let second = src.backup_lib().snapshot;
    flip_middle_byte(
        &src.store
            .join(format!("snapshots/{second}/dump.sql.gz.age")),
    );
    let refs = src.store.join(format!("snapshots/{second}/refs.txt.gz"));
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(
        &mut gz,
        format!("{}\n", object(cut).rsplit('/').next().unwrap()).as_bytes(),
    )
    .unwrap();
    fs::write(&refs, gz.finish().unwrap()).unwrap();
    let run = cli(Some(&config), &["--json", "check"], &[]);
    run.expect_code(exit::DAMAGED);
    let found = problems(&run);
    let of = |suffix: &str| {
        found
            .iter()
            .find(|p| p.0 == format!("snapshots/{second}/{suffix}"))
            .unwrap_or_else(|| panic!("{suffix} in {found:?}"))
            .clone()
    };
    assert!(of("dump.sql.gz.age").1.contains("damaged"), "{found:?}");
    assert!(
        of("refs.txt.gz").1.contains("prune would delete"),
        "{found:?}"
    );
    assert_eq!(run.json()["dumps_verified"], 1);
}

/// `--read-data-subset n/m`: the m slices together read every referenced object (and every dump)
/// exactly once; a damaged object is found by the one slice it falls in. On an S3 server.
#[test]
fn read_data_subset_slices_cover_every_object_once_on_s3() {
    let server = s3::S3Server::start(&["photos"]);
    let src = Source::new(ASSETS);
    let storage = s3_storage(&server, "photos", "immich");
    let config = src.write_config_with(&storage, "check-s3.toml");
    let env = [("IMMICH_BACKUP__STORAGE__SECRET_ACCESS_KEY", s3::SECRET_KEY)];
    cli(Some(&config), &["backup"], &env).expect_code(exit::OK);
    let run = cli(Some(&config), &["--json", "check", "--read-data"], &env);
    run.expect_code(exit::OK);
    let total = run.json()["content_referenced"].as_u64().unwrap();
    assert!(total > 10, "{total}");

    // Damage one object in the bucket.
    let keys = server.keys("photos", "immich/data");
    let victim = keys[keys.len() / 2].clone();
    flip_middle_byte(&server.object_path("photos", &victim));
    let victim = victim.strip_prefix("immich/").unwrap().to_string();

    let mut read = 0;
    let mut dumps = 0;
    let mut found_in = Vec::new();
    for n in 1..=3 {
        let slice = format!("{n}/3");
        let run = cli(
            Some(&config),
            &["--json", "check", "--read-data-subset", &slice],
            &env,
        );
        let r = run.json();
        assert_eq!(r["read_data"]["subset"], slice);
        read += r["read_data"]["objects"].as_u64().unwrap();
        dumps += r["dumps_verified"].as_u64().unwrap();
        if problems(&run).iter().any(|p| p.0 == victim) {
            run.expect_code(exit::DAMAGED);
            found_in.push(n);
        } else {
            run.expect_code(exit::OK);
        }
    }
    assert_eq!(read, total, "the slices cover every object once");
    assert_eq!(dumps, 1, "and the dump once");
    assert_eq!(found_in.len(), 1, "{found_in:?}");

    // A random 100 % sample is everything; a size reads at least that much.
    let run = cli(
        Some(&config),
        &["--json", "check", "--read-data-subset", "100%"],
        &env,
    );
    assert_eq!(run.json()["read_data"]["objects"], total);
    let run = cli(
        Some(&config),
        &["--json", "check", "--read-data-subset", "1K"],
        &env,
    );
    let r = run.json();
    assert!(r["read_data"]["bytes"].as_u64().unwrap() >= 1024, "{r}");
    assert!(r["read_data"]["objects"].as_u64().unwrap() < total, "{r}");
}

/// A wrong identity is told as such (exit 12); reading data back without any identity, or a bad
/// subset, is a usage error naming the fix (exit 2); the structural check needs none.
#[test]
fn check_without_the_right_identity_says_what_to_do() {
    let src = Source::new(ASSETS);
    src.backup_lib();
    let other = src.work.path().join("other.txt");
    immich_backup::crypto::write_identity_file(&other, &immich_backup::crypto::generate_key())
        .unwrap();
    let config = src.write_config("check.toml");
    let run = cli(
        Some(&config),
        &["check", "--identity", path_arg(&other)],
        &[],
    );
    run.expect_code(exit::WRONG_KEY);
    assert!(run.stderr.contains("wrong identity"), "{}", run.stderr);

    let mut toml = src.toml();
    toml.identity = None;
    let bare = toml.write(&src.work.path().join("bare.toml"));
    let run = cli(Some(&bare), &["check", "--read-data"], &[]);
    run.expect_code(exit::USAGE);
    assert!(run.stderr.contains("--identity FILE"), "{}", run.stderr);
    let run = cli(Some(&config), &["check", "--read-data-subset", "4/3"], &[]);
    run.expect_code(exit::USAGE);
    assert!(run.stderr.contains("1 ≤ n ≤ m"), "{}", run.stderr);
    let run = cli(Some(&bare), &["--json", "check"], &[]);
    run.expect_code(exit::OK);
    assert_eq!(run.json()["with_identity"], false);
    let objects: BTreeSet<String> = data_objects(&src.store).into_keys().collect();
    assert_eq!(run.json()["content_stored"], objects.len() as u64);
}

/// A snapshot copied under a newer id (what someone with write access to the store could plant)
/// is not authentic, and a removed summary is one problem (the listing and the signature check
/// both find it), with the identity; the structural check counts the copy as complete.
#[test]
fn check_with_the_identity_names_planted_snapshots_and_missing_summaries() {
    let src = Source::new(ASSETS);
    let snap = src.backup_lib().snapshot;
    let config = src.write_config("check.toml");
    let planted = format!("2999{}", &snap[4..]);
    let from = src.store.join("snapshots").join(&snap);
    let to = src.store.join("snapshots").join(&planted);
    fs::create_dir_all(&to).unwrap();
    for f in fs::read_dir(&from).unwrap() {
        let f = f.unwrap();
        fs::copy(f.path(), to.join(f.file_name())).unwrap();
    }
    let run = cli(Some(&config), &["--json", "check", "--no-identity"], &[]);
    run.expect_code(exit::OK);
    assert_eq!(run.json()["snapshots"], 2);

    let run = cli(Some(&config), &["--json", "check"], &[]);
    run.expect_code(exit::DAMAGED);
    let found = problems(&run);
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0].0, format!("snapshots/{planted}/manifest.json.age"));
    assert!(found[0].1.contains("not authentic"), "{found:?}");
    assert_eq!(found[0].2, std::slice::from_ref(&planted));
    assert_eq!(run.json()["file_lists_verified"], 1);

    fs::remove_dir_all(&to).unwrap();
    fs::remove_file(from.join("summary.json")).unwrap();
    let run = cli(Some(&config), &["--json", "check"], &[]);
    run.expect_code(exit::DAMAGED);
    let found = problems(&run);
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0].0, format!("snapshots/{snap}/summary.json"));
}
