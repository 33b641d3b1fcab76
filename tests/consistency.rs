//! Integration tests of issue 14, part 4: Immich's consistency, recorded at every backup, against a
//! real PostgreSQL cluster and the real binary. An asset whose original was deleted before the
//! backup is reported (exit 3, or 0 with `on_missing_original = "ignore"`); a file no asset names
//! is counted as an orphan; paths with COPY escapes match; an external library's asset is reported,
//! and once configured is backed up and restored to its host path (or to another one), refusing a
//! target that holds other files.

mod common;

use std::fs;
use std::path::{Path, PathBuf};

use common::*;
use immich_backup::demo::sample::{self, asset_original_path, PgCluster, ADMIN_ID};
use immich_backup::error::exit;
use immich_backup::format::{Summary, Verdict};

/// A SQL string literal (standard_conforming_strings: backslashes are plain).
fn literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// Add an asset row (owned by the admin) whose original is at the container path `path`.
fn add_asset(src: &Source, n: u32, path: &str) {
    let sql = format!(
        "INSERT INTO \"asset\" (\"id\", \"deviceAssetId\", \"ownerId\", \"deviceId\", \"type\", \"originalPath\", \
         \"originalFileName\", \"fileCreatedAt\", \"fileModifiedAt\", \"localDateTime\", \"checksum\") \
         VALUES (md5('extra-{n}')::uuid, 'extra-{n}', '{ADMIN_ID}', 'test', 'IMAGE', {}, 'x.jpg', now(), now(), now(), \
         decode(md5('extra-{n}'), 'hex'));",
        literal(path)
    );
    src.cluster.psql(DB, &sql).expect("insert an asset");
}

/// Newer Immich's `asset_file` table, with a sidecar row for asset 1 at each of `paths`.
fn add_sidecars(src: &Source, paths: &[&str]) {
    let mut sql = String::from(
        "CREATE TABLE \"asset_file\" (\"id\" uuid NOT NULL DEFAULT uuid_generate_v4() PRIMARY KEY, \
         \"assetId\" uuid NOT NULL, \"type\" character varying NOT NULL, \"path\" character varying NOT NULL);\n",
    );
    for p in paths {
        sql += &format!(
            "INSERT INTO \"asset_file\" (\"assetId\", \"type\", \"path\") VALUES (md5('asset-1')::uuid, 'sidecar', {});\n",
            literal(p)
        );
    }
    sql += "INSERT INTO \"asset_file\" (\"assetId\", \"type\", \"path\") VALUES (md5('asset-1')::uuid, 'preview', '/data/thumbs/x/never-backed-up.jpeg');\n";
    src.cluster.psql(DB, &sql).expect("asset_file");
}

/// An external library (Immich's `library` table) with `import_paths`.
fn add_library(src: &Source, import_paths: &str) {
    let sql = format!(
        "CREATE TABLE \"library\" (\"id\" uuid NOT NULL DEFAULT uuid_generate_v4() PRIMARY KEY, \
         \"name\" character varying NOT NULL, \"importPaths\" text[] NOT NULL);\n\
         INSERT INTO \"library\" (\"name\", \"importPaths\") VALUES ('Photos', {});",
        literal(import_paths)
    );
    src.cluster.psql(DB, &sql).expect("library");
}

/// The plaintext summary of snapshot `id`.
fn summary(src: &Source, id: &str) -> (Summary, String) {
    let text = fs::read_to_string(src.store.join(format!("snapshots/{id}/summary.json"))).unwrap();
    (serde_json::from_str(&text).unwrap(), text)
}

/// Restore the latest snapshot with `config` (through the binary); its JSON report.
fn restore_json(src: &Source, config: &Path, code: i32) -> (Run, serde_json::Value) {
    let run = cli(Some(config), &restore_args(&src.identity, &["latest"]), &[]);
    run.expect_code(code);
    let json = if code == exit::OK {
        run.json()
    } else {
        serde_json::Value::Null
    };
    (run, json)
}

fn backup_json(config: &Path, code: i32) -> serde_json::Value {
    let run = cli(Some(config), &["--json", "backup"], &[]);
    run.expect_code(code);
    run.json()
}

#[test]
fn a_deleted_original_is_reported_and_makes_the_backup_partial() {
    let src = Source::new(ASSETS);
    // Asset 20's file is deleted behind Immich's back; asset 1 has two sidecars, one missing.
    let gone = asset_original_path(20);
    fs::remove_file(src.upload.join(&gone)).unwrap();
    let sidecar = "library/admin/2024/IMG_0001.jpg.xmp";
    fs::write(src.upload.join(sidecar), b"<x:xmpmeta/>").unwrap();
    add_sidecars(
        &src,
        &[
            &format!("/data/{sidecar}"),
            "/data/upload/lost/IMG_0001.xmp",
        ],
    );
    let config = src.write_config("backup.toml");

    let rep = backup_json(&config, exit::PARTIAL);
    let c = &rep["consistency"];
    assert_eq!(rep["partial"], true, "{rep}");
    assert_eq!(c["verdict"], "missing", "{c}");
    assert_eq!(c["assets"], ASSETS as u64, "{c}");
    assert_eq!(c["sidecars"], 2, "{c}");
    assert_eq!(c["missing_originals"], 1, "{c}");
    assert_eq!(c["missing_sidecars"], 1, "{c}");
    assert_eq!(
        c["missing_examples"],
        serde_json::json!([gone, "upload/lost/IMG_0001.xmp"]),
        "{c}"
    );
    assert_eq!(c["external_assets"], 0, "{c}");
    let id = rep["snapshot"].as_str().unwrap().to_string();

    // The manifest (encrypted) has the paths; the plaintext summary has the counts and no path.
    let m = manifest(&src.store, &src.identity, &id);
    let mc = m.consistency.expect("the manifest records the check");
    assert_eq!(mc.missing_originals, 1);
    assert_eq!(mc.missing_examples[0], gone);
    let (s, text) = summary(&src, &id);
    let sc = s.consistency.expect("the summary records the counts");
    assert_eq!(
        (sc.verdict, sc.missing_originals, sc.missing_sidecars),
        (Verdict::Missing, 1, 1)
    );
    assert!(sc.missing_examples.is_empty() && sc.orphan_examples.is_empty());
    assert!(!text.contains("IMG_0020"), "no path in the summary: {text}");

    // The human output ends with the warning and the path; `snapshots` shows the verdict.
    let run = cli(Some(&config), &["backup"], &[]);
    run.expect_code(exit::PARTIAL);
    assert!(
        run.stdout.contains(
            "WARNING: 1 original(s) and 1 sidecar(s) the database names are NOT in this snapshot"
        ),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout.contains(&format!("    {gone}")),
        "{}",
        run.stdout
    );
    assert!(run.stderr.contains("WARN"), "{}", run.stderr);
    let list = cli(Some(&config), &["snapshots"], &[]);
    list.expect_code(exit::OK);
    assert!(list.stdout.contains("CONSISTENCY"), "{}", list.stdout);
    assert_eq!(
        list.stdout.matches("2 missing").count(),
        2,
        "{}",
        list.stdout
    );

    // Accepted: exit 0, still recorded, logged at INFO.
    let mut toml = src.toml();
    toml.backup_extra = "on_missing_original = \"ignore\"".into();
    let ignore = toml.write(&src.work.path().join("ignore.toml"));
    let run = cli(Some(&ignore), &["--json", "backup"], &[]);
    run.expect_code(exit::OK);
    let rep = run.json();
    assert_eq!(rep["partial"], false);
    assert_eq!(rep["consistency"]["missing_originals"], 1);
    assert!(
        run.stderr.contains("on_missing_original = \\\"ignore\\\"")
            || run.stderr.contains("on_missing_original = \"ignore\""),
        "{}",
        run.stderr
    );

    // An unknown value is a config error naming the key and the valid values.
    toml.backup_extra = "on_missing_original = \"maybe\"".into();
    let bad = toml.write(&src.work.path().join("bad.toml"));
    let run = cli(Some(&bad), &["backup"], &[]);
    run.expect_code(exit::USAGE);
    let err = run.error_lines().join("\n");
    assert!(err.contains("on_missing_original"), "{err}");
    assert!(err.contains("warn") && err.contains("ignore"), "{err}");
}

#[test]
fn orphans_are_counted_and_escaped_paths_match() {
    let src = Source::new(ASSETS);
    // Paths that the dump's COPY text escapes: a backslash, a tab, non-ASCII.
    let odd = [
        "library/admin/back\\slash.jpg",
        "library/admin/tab\there.jpg",
        "library/admin/Été 2024/café ☕.jpg",
    ];
    for (i, p) in odd.iter().enumerate() {
        if !src.upload.join(p).exists() {
            fs::write(src.upload.join(p), format!("odd {i}")).unwrap();
        }
        add_asset(&src, i as u32, &format!("/data/{p}"));
    }
    let config = src.write_config("backup.toml");
    let first = backup_json(&config, exit::OK);
    let c = &first["consistency"];
    assert_eq!(c["verdict"], "ok", "{c}");
    assert_eq!(c["assets"], ASSETS as u64 + 3, "{c}");
    assert_eq!(c["missing_originals"], 0, "{c}");
    let orphans = c["orphans"].as_u64().unwrap();
    let examples: Vec<&str> = c["orphan_examples"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(
        examples.contains(&"library/admin/2023/PANO_0001.jpg"),
        "{c}"
    );
    assert!(!examples.iter().any(|e| odd.contains(e)), "{c}");
    assert!(!examples.iter().any(|e| e.ends_with(".immich")), "{c}");
    assert!(!examples.iter().any(|e| e.starts_with("profile/")), "{c}");

    // A file no asset names is one more orphan; the backup is not partial for it.
    let stray = "upload/stray/not-imported.jpg";
    sample::add_photo(&src.upload, stray, 1000, 77).unwrap();
    let second = backup_json(&config, exit::OK);
    let c = &second["consistency"];
    assert_eq!(c["orphans"], orphans + 1, "{c}");
    assert!(
        c["orphan_examples"]
            .as_array()
            .unwrap()
            .iter()
            .any(|v| v == stray),
        "{c}"
    );
}

#[test]
fn an_external_library_is_reported_then_backed_up_and_restored() {
    let src = Source::new(ASSETS);
    add_library(&src, "{/mnt/photos,\"/mnt/other place\"}");
    add_asset(&src, 1, "/mnt/photos/2020/beach.jpg");
    add_asset(&src, 2, "/mnt/photos/2021/sub dir/snow.jpg");
    let host = src.work.path().join("photos on the host");
    let beach = sample::add_photo(&host, "2020/beach.jpg", 30_000, 1).unwrap();
    sample::add_photo(&host, "2021/sub dir/snow.jpg", 20_000, 2).unwrap();
    sample::add_photo(&host, "notes/not-an-asset.jpg", 500, 3).unwrap();

    // Not configured: reported (exit 0), not in the snapshot.
    let config = src.write_config("unconfigured.toml");
    let run = cli(Some(&config), &["--json", "backup"], &[]);
    run.expect_code(exit::OK);
    let rep = run.json();
    let c = &rep["consistency"];
    assert_eq!(c["verdict"], "external", "{c}");
    assert_eq!(c["external_assets"], 2, "{c}");
    assert_eq!(
        c["external_import_paths"],
        serde_json::json!(["/mnt/other place", "/mnt/photos"]),
        "{c}"
    );
    assert_eq!(
        c["external_examples"][0], "/mnt/photos/2020/beach.jpg",
        "{c}"
    );
    assert!(run.stderr.contains("external_libraries"), "{}", run.stderr);
    let run = cli(Some(&config), &["backup"], &[]);
    assert!(
        run.stdout
            .contains("WARNING: 2 asset(s) are outside UPLOAD_LOCATION")
            && run.stdout.contains("/mnt/photos"),
        "{}",
        run.stdout
    );

    // Configured: backed up under external/mnt/photos, and nothing is left outside.
    let mut toml = src.toml();
    toml.extra = format!(
        "[[immich.external_libraries]]\ncontainer_path = \"/mnt/photos\"\nhost_path = {:?}\n",
        host.display().to_string()
    );
    let config = toml.write(&src.work.path().join("configured.toml"));
    let rep = backup_json(&config, exit::OK);
    let c = &rep["consistency"];
    assert_eq!(c["verdict"], "ok", "{c}");
    assert_eq!(c["external_assets"], 0, "{c}");
    let id = rep["snapshot"].as_str().unwrap().to_string();
    let m = manifest(&src.store, &src.identity, &id);
    assert_eq!(m.external_libraries.len(), 1);
    assert_eq!(m.external_libraries[0].folder, "external/mnt/photos");
    assert_eq!(
        m.external_libraries[0].host_path,
        host.display().to_string()
    );
    let listed: Vec<String> = file_list(&src.store, &src.identity, &id)
        .into_iter()
        .map(|e| e.path)
        .collect();
    for p in [
        "external/mnt/photos",
        "external/mnt/photos/2020/beach.jpg",
        "external/mnt/photos/2021/sub dir/snow.jpg",
        "external/mnt/photos/notes/not-an-asset.jpg",
    ] {
        assert!(listed.iter().any(|l| l == p), "{p} not in {listed:?}");
    }

    // A restore refuses a host path that holds a different file…
    let original = fs::read(&beach).unwrap();
    fs::write(&beach, b"changed on the new machine").unwrap();
    let fresh = PgCluster::start(None).expect("fresh cluster");
    let target = src.work.path().join("restored");
    let rconfig = src.write_restore_config("restore.toml", &fresh, &target);
    let (run, _) = restore_json(&src, &rconfig, exit::NOT_FRESH);
    assert!(
        run.stderr.contains("beach.jpg") && run.stderr.contains("external library"),
        "{}",
        run.stderr
    );
    assert!(!target.join("library").exists(), "nothing was written");

    // …and puts the library back where the restoring config says (here: a new folder).
    fs::write(&beach, &original).unwrap();
    let moved = src.work.path().join("photos on the new machine");
    let mut rtoml = src.toml();
    rtoml.port = fresh.port;
    rtoml.upload_location = target.clone();
    rtoml.cache = src.work.path().join("restore-cache");
    rtoml.extra = format!(
        "[[immich.external_libraries]]\ncontainer_path = \"/mnt/photos\"\nhost_path = {:?}\n",
        moved.display().to_string()
    );
    let rconfig = rtoml.write(&src.work.path().join("restore-moved.toml"));
    let (_, r) = restore_json(&src, &rconfig, exit::OK);
    assert_eq!(
        r["external_targets"][0]["target"],
        moved.display().to_string(),
        "{r}"
    );
    for rel in [
        "2020/beach.jpg",
        "2021/sub dir/snow.jpg",
        "notes/not-an-asset.jpg",
    ] {
        assert_eq!(
            fs::read(moved.join(rel)).unwrap(),
            fs::read(host.join(rel)).unwrap(),
            "{rel}"
        );
    }
    assert!(
        !target.join("external").exists(),
        "external files stay out of UPLOAD_LOCATION"
    );
    assert_same_originals(&src.upload, &target);

    // Without a target in the config, a library goes back to the recorded host path: identical
    // files there are kept.
    let fresh2 = PgCluster::start(None).expect("fresh cluster");
    let target2 = src.work.path().join("restored-2");
    let rconfig = src.write_restore_config("restore-2.toml", &fresh2, &target2);
    let (_, r) = restore_json(&src, &rconfig, exit::OK);
    assert_eq!(
        r["external_targets"][0]["target"],
        host.display().to_string(),
        "{r}"
    );
    assert!(r["files_already_present"].as_u64().unwrap() >= 3, "{r}");
}

/// `config` with `[immich] exclude = patterns` (and `backup_extra` in `[backup]`), written as `name`.
fn with_excludes(src: &Source, name: &str, patterns: &[&str], backup_extra: &str) -> PathBuf {
    let mut toml = src.toml();
    toml.backup_extra = backup_extra.into();
    let list: Vec<String> = patterns.iter().map(|p| format!("{p:?}")).collect();
    let text = toml.text().replacen(
        "[immich]\n",
        &format!("[immich]\nexclude = [{}]\n", list.join(", ")),
        1,
    );
    let path = src.work.path().join(name);
    fs::write(&path, text).unwrap();
    path
}

#[test]
fn excluded_paths_are_not_stored_and_an_excluded_original_is_reported_apart() {
    let src = Source::new(ASSETS);
    fs::write(src.upload.join("library/admin/2024/scratch.tmp"), b"tmp").unwrap();
    fs::create_dir_all(src.upload.join("upload/cache-dir/x")).unwrap();
    fs::write(src.upload.join("upload/cache-dir/x/a.bin"), b"cache").unwrap();
    let excluded_asset = asset_original_path(20);
    let patterns = ["**/*.tmp", "upload/cache-dir", excluded_asset.as_str()];
    let config = with_excludes(&src, "exclude.toml", &patterns, "");
    // Without the patterns: nothing missing, the two extra files are orphans.
    let plain = backup_json(&src.write_config("plain.toml"), exit::OK);
    let orphans = plain["consistency"]["orphans"].as_u64().unwrap();

    // Partial: a restore would lack the excluded asset's original; told apart from missing.
    let rep = backup_json(&config, exit::PARTIAL);
    assert_eq!(rep["partial"], true, "{rep}");
    assert_eq!(rep["excluded"], 3, "{rep}");
    let c = &rep["consistency"];
    assert_eq!(c["excluded"], 1, "{c}");
    assert_eq!(
        c["excluded_examples"],
        serde_json::json!([excluded_asset]),
        "{c}"
    );
    assert_eq!(c["missing_originals"], 0, "{c}");
    assert_eq!(c["orphans"], orphans - 2, "{c}");
    assert_eq!(c["verdict"], "missing", "{c}");
    let id = rep["snapshot"].as_str().unwrap();
    let list = file_list(&src.store, &src.identity, id);
    for p in [
        "library/admin/2024/scratch.tmp",
        "upload/cache-dir",
        "upload/cache-dir/x/a.bin",
        excluded_asset.as_str(),
    ] {
        assert!(list.iter().all(|e| e.path != p), "{p} is in the file list");
    }
    let (s, _) = summary(&src, id);
    assert_eq!(s.consistency.unwrap().excluded, 1);
    let snaps = cli(Some(&config), &["snapshots"], &[]);
    assert!(snaps.stdout.contains("1 excluded"), "{}", snaps.stdout);

    // The human report and the log say so.
    let run = cli(Some(&config), &["backup"], &[]);
    run.expect_code(exit::PARTIAL);
    assert!(
        run.stdout
            .contains("1 file(s) the database names are left out by [immich] exclude"),
        "{}",
        run.stdout
    );
    assert!(run.stdout.contains("excluded: 3 path(s)"), "{}", run.stdout);
    assert!(run.stderr.contains("WARN"), "{}", run.stderr);

    // Accepted with on_missing_original = "ignore": exit 0, still counted.
    let ignore = with_excludes(
        &src,
        "ignore.toml",
        &patterns,
        "on_missing_original = \"ignore\"",
    );
    let rep = backup_json(&ignore, exit::OK);
    assert_eq!(rep["consistency"]["excluded"], 1, "{rep}");

    // A bad pattern: one line naming the key and the pattern.
    let bad = with_excludes(&src, "bad.toml", &["library/[abc"], "");
    let run = cli(Some(&bad), &["backup"], &[]);
    run.expect_code(exit::USAGE);
    let err = run.error_lines().join("\n");
    assert!(
        err.contains("[immich] exclude") && err.contains("library/[abc"),
        "{err}"
    );
}
