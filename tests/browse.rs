//! `ls`, `find`, `diff`, `stats` and `dump` of the real binary, on real backups of the sample Immich
//! (a Postgres cluster, the sample library with its unicode and odd names) in a folder store and on
//! an S3 server: each command's text and `--json` output against what the library and database
//! hold; two snapshots with an added, a removed, a modified file and fewer rows in a table for
//! `diff`, `find` and `stats`; a flipped byte in a content object makes `dump` name the file and exit
//! 13, leaving no wrong byte in the output file or the pipe (nor, through the library, in a pipe fed
//! from a temporary file); the shared lock.

mod common;

use std::collections::BTreeSet;
use std::fs;
use std::io::Write;
use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};

use common::*;
use immich_backup::browse::dump;
use immich_backup::crypto::Identities;
use immich_backup::demo::sample;
use immich_backup::error::{exit, Error};
use immich_backup::repo::Repository;

const ASSETS: usize = 24;
const CAFE: &str = "library/admin/Été 2024/café ☕.jpg";
const NEW: &str = "library/admin/2024/新しい 写真 #1.jpg";
const GONE: &str = "library/admin/2023/VID_0002.mp4";
const CHANGED: &str = "library/admin/2023/PANO_0001.jpg";

/// The JSON objects of NDJSON output.
fn ndjson(run: &Run) -> Vec<serde_json::Value> {
    run.stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// `dump` with stdout redirected to `out` (opened for appending when `append`).
fn dump_to_file(config: &Path, args: &[&str], out: &Path, append: bool) -> Run {
    let file = fs::OpenOptions::new()
        .create(true)
        .write(true)
        .append(append)
        .truncate(!append)
        .open(out)
        .unwrap();
    let mut cmd = command(Some(config), args);
    cmd.stdout(Stdio::from(file));
    run_to_end(cmd)
}

/// `dump` into a pipe: its exit code and the exact bytes the pipe received.
fn dump_to_pipe(config: &Path, args: &[&str]) -> (i32, Vec<u8>, String) {
    let out = command(Some(config), args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        out.stdout,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn names_in(dir: &Path) -> BTreeSet<String> {
    fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect()
}

#[test]
fn ls_find_diff_stats_and_dump_on_a_folder_store() {
    let src = Source::new(ASSETS);
    let mut toml = src.toml();
    toml.extra = "[lock]\nwait_secs = 1\n".into();
    let config = toml.write(&src.work.path().join("browse.toml"));
    let first = src.backup_lib().snapshot;
    let id_arg = ["--identity", path_arg(&src.identity)];
    let with_id = |args: &[&str]| {
        let mut v: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        v.extend(id_arg.iter().map(|s| s.to_string()));
        v
    };
    let run = |args: &[&str]| {
        let v = with_id(args);
        let v: Vec<&str> = v.iter().map(String::as_str).collect();
        cli(Some(&config), &v, &[])
    };

    // ls of a folder: its direct children, as the library holds them.
    let r = run(&["ls", "latest", "library/admin"]);
    r.expect_code(exit::OK);
    let mut lines = r.stdout.lines();
    assert!(
        lines
            .next()
            .unwrap()
            .starts_with(&format!("snapshot {first} of ")),
        "{}",
        r.stdout
    );
    let listed: BTreeSet<String> = lines.map(str::to_string).collect();
    let expected: BTreeSet<String> = names_in(&src.upload.join("library/admin"))
        .into_iter()
        .map(|n| format!("library/admin/{n}"))
        .collect();
    assert_eq!(listed, expected);
    assert!(listed.contains("library/admin/Été 2024"), "{listed:?}");

    // --long: mode, size, local time, path; a symlink with its target.
    let r = run(&["ls", "--long", &first[..12], "library/admin/Été 2024"]);
    r.expect_code(exit::OK);
    let line = r.stdout.lines().nth(1).unwrap();
    assert!(line.starts_with("-rw-r--r--        40960 "), "{line}");
    assert!(line.ends_with(&format!(" {CAFE}")), "{line}");
    let r = run(&["ls", "-l", "latest", "library/admin/2024/latest.jpg"]);
    assert!(
        r.stdout
            .contains("library/admin/2024/latest.jpg -> IMG_0001.jpg"),
        "{}",
        r.stdout
    );

    // --json --recursive: one object a line, the snapshot first, every file below with its facts.
    let r = run(&["--json", "ls", "latest", "library", "--recursive"]);
    r.expect_code(exit::OK);
    let objects = ndjson(&r);
    assert_eq!(objects[0]["message_type"], "snapshot");
    assert_eq!(objects[0]["id"], first.as_str());
    let cafe = objects.iter().find(|o| o["path"] == CAFE).expect("café");
    let meta = fs::metadata(src.upload.join(CAFE)).unwrap();
    assert_eq!(cafe["name"], "café ☕.jpg");
    assert_eq!(cafe["type"], "file");
    assert_eq!(cafe["size"], 40960);
    assert_eq!(cafe["mode"], 0o644);
    assert_eq!(cafe["permissions"], "-rw-r--r--");
    let mtime: chrono::DateTime<chrono::Utc> = meta.modified().unwrap().into();
    assert_eq!(cafe["mtime"], serde_json::to_value(mtime).unwrap());
    let files_below = walk_files(&src.upload.join("library"));
    let listed_files = objects.iter().filter(|o| o["type"] == "file").count();
    assert_eq!(listed_files, files_below, "every file below library/");
    // A path the snapshot does not hold: a usage error naming it.
    let r = run(&["ls", "latest", "library/nobody"]);
    r.expect_code(exit::USAGE);
    assert!(r.stderr.contains("library/nobody"), "{}", r.stderr);

    // dump of a file: into a regular file and into a pipe, the original's bytes exactly.
    let want = fs::read(src.upload.join(CAFE)).unwrap();
    let out = src.work.path().join("café.jpg");
    let args = with_id(&["dump", "latest", CAFE]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    dump_to_file(&config, &args, &out, false).expect_code(exit::OK);
    assert_eq!(fs::read(&out).unwrap(), want);
    let (code, piped, err) = dump_to_pipe(&config, &args);
    assert_eq!(code, exit::OK, "{err}");
    assert_eq!(piped, want);
    let big = "library/admin/2022/VID_0003.mov";
    let args_big = with_id(&["dump", "latest", big]);
    let args_big: Vec<&str> = args_big.iter().map(String::as_str).collect();
    let (code, piped, err) = dump_to_pipe(&config, &args_big);
    assert_eq!(code, exit::OK, "{err}");
    assert_eq!(piped, fs::read(src.upload.join(big)).unwrap());
    // A folder, or nothing at that path: usage errors.
    run(&["dump", "latest", "library/admin"]).expect_code(exit::USAGE);
    run(&["dump", "latest", "library/admin/none.jpg"]).expect_code(exit::USAGE);

    // dump --database: pg_dumpall's plain SQL, with the sample's rows.
    let args_db = with_id(&["dump", "latest", "--database"]);
    let args_db: Vec<&str> = args_db.iter().map(String::as_str).collect();
    let (code, sql, err) = dump_to_pipe(&config, &args_db);
    assert_eq!(code, exit::OK, "{err}");
    let sql = String::from_utf8(sql).unwrap();
    assert!(
        sql.starts_with("--\n-- PostgreSQL database cluster dump\n--"),
        "{}",
        &sql[..200.min(sql.len())]
    );
    assert!(sql.contains("COPY public.asset "), "no asset rows");
    assert!(
        sql.contains(&format!("/data/{}", sample::asset_original_path(ASSETS))),
        "the last asset's row"
    );

    // A second snapshot: one file added (odd name), one removed, one rewritten; rows deleted.
    sample::add_photo(&src.upload, NEW, 12_345, 77).unwrap();
    fs::remove_file(src.upload.join(GONE)).unwrap();
    let size = fs::metadata(src.upload.join(CHANGED)).unwrap().len() as usize;
    sample::add_photo(&src.upload, CHANGED, size, 4711).unwrap();
    let before: u64 = src
        .cluster
        .psql(DB, "SELECT count(*) FROM album_asset")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(before >= 2, "{before}");
    src.cluster
        .psql(
            DB,
            "DELETE FROM album_asset WHERE ctid IN (SELECT ctid FROM album_asset LIMIT 2)",
        )
        .unwrap();
    wait_until_settled();
    let second = src.backup_lib().snapshot;

    // diff: exactly the three files, then the totals and the table.
    let r = run(&["diff", &first, &second]);
    r.expect_code(exit::OK);
    let changes: BTreeSet<&str> = r
        .stdout
        .lines()
        .filter(|l| l.len() > 5 && l.as_bytes()[1..5] == *b"    ")
        .collect();
    let expected: BTreeSet<String> = [
        format!("+    {NEW}"),
        format!("-    {GONE}"),
        format!("M    {CHANGED}"),
    ]
    .into_iter()
    .collect();
    assert_eq!(
        changes,
        expected.iter().map(String::as_str).collect(),
        "{}",
        r.stdout
    );
    assert!(
        r.stdout
            .contains("Files:         1 new,      1 removed,      1 changed"),
        "{}",
        r.stdout
    );
    assert!(r.stdout.contains("public.album_asset"), "{}", r.stdout);
    let r = run(&["--json", "diff", &first, &second]);
    r.expect_code(exit::OK);
    let lines = ndjson(&r);
    let stats = lines.last().unwrap();
    assert_eq!(stats["message_type"], "statistics");
    assert_eq!(stats["added"]["files"], 1);
    assert_eq!(stats["added"]["bytes"], 12_345);
    assert_eq!(stats["removed"]["files"], 1);
    assert_eq!(stats["removed"]["bytes"], 1_363_149);
    assert_eq!(stats["modified"], 1);
    let tables = stats["tables"].as_array().unwrap();
    assert_eq!(tables.len(), 1, "{tables:?}");
    assert_eq!(tables[0]["table"], "public.album_asset");
    assert_eq!(tables[0]["before"], before);
    assert_eq!(tables[0]["after"], before - 2);
    let change = lines.iter().find(|l| l["path"] == NEW).unwrap();
    assert_eq!(change["modifier"], "+");
    assert_eq!(change["message_type"], "change");
    // --metadata adds the folders whose time changed (U), no other kind of line.
    let r = run(&["diff", "--metadata", &first, &second]);
    assert!(
        r.stdout.contains("U    library/admin/2024/"),
        "{}",
        r.stdout
    );

    // find: across both snapshots by default, by name or whole path; --newest, --snapshot.
    let r = run(&["find", "café*"]);
    r.expect_code(exit::OK);
    let found = r.stdout.matches(CAFE).count();
    assert_eq!(found, 2, "{}", r.stdout);
    assert!(r
        .stdout
        .contains(&format!("Found matching entries in snapshot {first} from")));
    let r = run(&["--json", "find", "library/*/2024/新しい*", "VID_0002*"]);
    r.expect_code(exit::OK);
    let lines = ndjson(&r);
    let matches: Vec<(String, String)> = lines
        .iter()
        .filter(|l| l["message_type"] == "match")
        .map(|l| {
            (
                l["snapshot"].as_str().unwrap().to_string(),
                l["path"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        matches,
        [
            (first.clone(), GONE.to_string()),
            (second.clone(), NEW.to_string())
        ]
    );
    assert_eq!(lines.last().unwrap()["matches"], 2);
    let r = run(&["--json", "find", "--newest", "1", "*.mp4"]);
    let snaps: BTreeSet<String> = ndjson(&r)
        .iter()
        .filter_map(|l| l["snapshot"].as_str().map(str::to_string))
        .collect();
    assert_eq!(snaps, BTreeSet::from([second.clone()]));
    let r = run(&[
        "--json",
        "find",
        "--snapshot",
        &first,
        "--ignore-case",
        "CAFÉ*",
    ]);
    assert_eq!(ndjson(&r).last().unwrap()["matches"], 1, "{}", r.stdout);
    run(&["find", "a["]).expect_code(exit::USAGE);

    // stats without any identity configured: from summaries, refs and the listing.
    let mut toml = src.toml();
    toml.identity = None;
    let bare = toml.write(&src.work.path().join("bare.toml"));
    let r = cli(Some(&bare), &["--json", "stats"], &[]);
    r.expect_code(exit::OK);
    let s = r.json();
    assert_eq!(s["with_identity"], false);
    let objects = data_objects(&src.store);
    assert_eq!(s["totals"]["content_objects"], objects.len() as u64);
    assert_eq!(s["totals"]["content_bytes"], objects.values().sum::<u64>());
    let snaps = s["snapshots"].as_array().unwrap();
    assert_eq!(snaps.len(), 2);
    // The removed file and the old content of the rewritten one are the first's alone; the new
    // file and the new content the second's.
    assert_eq!(snaps[0]["unique_objects"], 2, "{s}");
    assert_eq!(snaps[1]["unique_objects"], 2, "{s}");
    for sn in snaps {
        let (c, u, sh) = (
            sn["content_objects"].as_u64().unwrap(),
            sn["unique_objects"].as_u64().unwrap(),
            sn["shared_objects"].as_u64().unwrap(),
        );
        assert_eq!(c, u + sh);
        assert!(sn["manifest"].is_null());
    }
    let unique = snaps[0]["unique_stored_bytes"].as_u64().unwrap();
    assert!(unique > 1_363_149 + 200 * 1024, "{s}");
    let r = cli(Some(&bare), &["stats", &second], &[]);
    r.expect_code(exit::OK);
    assert!(r.stdout.contains(&second), "{}", r.stdout);
    assert!(!r.stdout.contains(&first), "{}", r.stdout);
    // With the identity: the manifests' tables and rows.
    let r = run(&["--json", "stats", "latest"]);
    let s = r.json();
    assert_eq!(s["with_identity"], true);
    assert!(
        s["snapshots"][0]["manifest"]["tables"].as_u64().unwrap() > 3,
        "{s}"
    );

    // The shared lock: an exclusive one held refuses ls; --no-lock reads anyway.
    let (lock_rt, lock) = hold_exclusive_lock(&src.config());
    run(&["ls", "latest", "library"]).expect_code(exit::LOCKED);
    run(&["ls", "--no-lock", "latest", "library"]).expect_code(exit::OK);
    lock_rt.block_on(lock.release());

    // Into a pipe, a file bigger than the memory buffer goes through a temporary file first.
    let lib_dump = |buffer: u64| {
        let sink = Shared::default();
        let repo = Repository::open(&src.config().storage).unwrap();
        let ids = Arc::new(Identities::load(&src.identity).unwrap());
        let reader = rt().block_on(repo.unlock(ids)).unwrap();
        let m = manifest(&src.store, &src.identity, &second);
        let out = dump::Output::Stream {
            to: Box::new(sink.clone()),
            buffer,
        };
        let r = rt().block_on(dump::file(&reader, &m, CAFE, out));
        let written = sink.0.lock().unwrap().clone();
        (r, written)
    };
    let (r, written) = lib_dump(1024);
    assert_eq!(r.unwrap().bytes, want.len() as u64);
    assert_eq!(written, want);

    // A flipped byte in café's content object: dump names the file and exits 13; the redirected
    // file is cut back (empty after `>`, as it was after `>>`), the pipe receives nothing.
    let entry = file_list(&src.store, &src.identity, &second)
        .into_iter()
        .find(|e| e.path == CAFE)
        .unwrap();
    flip_middle_byte(&src.store.join(entry.content.unwrap().key()));
    let r = dump_to_file(&config, &args, &out, false);
    r.expect_code(exit::INTEGRITY);
    assert!(r.stderr.contains(CAFE), "{}", r.stderr);
    assert_eq!(
        fs::metadata(&out).unwrap().len(),
        0,
        "nothing unverified left"
    );
    fs::write(&out, b"kept").unwrap();
    dump_to_file(&config, &args, &out, true).expect_code(exit::INTEGRITY);
    assert_eq!(fs::read(&out).unwrap(), b"kept");
    let (code, piped, err) = dump_to_pipe(&config, &args);
    assert_eq!(code, exit::INTEGRITY, "{err}");
    assert!(piped.is_empty(), "{} bytes reached the pipe", piped.len());
    assert!(err.contains(CAFE), "{err}");
    for buffer in [1024, dump::BUFFER] {
        let (r, written) = lib_dump(buffer);
        assert!(matches!(r, Err(Error::Corrupt { .. })), "{r:?}");
        assert!(written.is_empty(), "{} bytes written", written.len());
    }
}

/// A writer whose bytes the test reads afterwards.
#[derive(Clone, Default)]
struct Shared(Arc<Mutex<Vec<u8>>>);

impl Write for Shared {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Regular files below `dir`.
fn walk_files(dir: &Path) -> usize {
    walkdir::WalkDir::new(dir)
        .into_iter()
        .filter(|e| e.as_ref().unwrap().file_type().is_file())
        .count()
}

/// The same commands on an S3 server, and without an identity where none is needed.
#[test]
fn ls_dump_find_and_stats_on_s3() {
    let server = s3::S3Server::start(&["photos"]);
    let src = Source::new(ASSETS);
    let storage = s3_storage(&server, "photos", "immich");
    let config = src.write_config_with(&storage, "browse-s3.toml");
    let env = [("IMMICH_BACKUP__STORAGE__SECRET_ACCESS_KEY", s3::SECRET_KEY)];
    cli(Some(&config), &["backup"], &env).expect_code(exit::OK);

    let r = cli(
        Some(&config),
        &["--json", "ls", "latest", "upload", "-r"],
        &env,
    );
    r.expect_code(exit::OK);
    let hidden = ndjson(&r)
        .into_iter()
        .find(|o| o["name"] == ".hidden notes.txt")
        .expect("the hidden file");
    let path = hidden["path"].as_str().unwrap().to_string();
    let mut cmd = command(Some(&config), &["dump", "latest", &path]);
    cmd.env(env[0].0, env[0].1);
    let out = cmd.output().unwrap();
    assert_eq!(out.status.code(), Some(exit::OK));
    assert_eq!(out.stdout, "メモ: 休暇\n".as_bytes());

    let r = cli(Some(&config), &["find", "*休暇*", "*.txt"], &env);
    r.expect_code(exit::OK);
    assert!(r.stdout.contains(&path), "{}", r.stdout);

    let r = cli(Some(&config), &["--json", "stats", "--no-identity"], &env);
    r.expect_code(exit::OK);
    let s = r.json();
    let keys = server.keys("photos", "immich/data");
    assert_eq!(s["totals"]["content_objects"], keys.len() as u64, "{s}");
    assert_eq!(
        s["snapshots"][0]["unique_objects"],
        keys.len() as u64,
        "{s}"
    );
    assert_eq!(s["snapshots"][0]["shared_objects"], 0, "{s}");
}
