//! Repository keys (format 2): adding and removing recipients without uploading the library
//! again, rotating, migrating a format-1 store, and stores whose key folders were tampered with.
//! Real PostgreSQL clusters, the real CLI, the folder store, and the `age` command.

mod common;

use std::fs;
use std::path::{Path, PathBuf};

use common::*;
use immich_backup::crypto::sign::SigningKey;
use immich_backup::crypto::{self, repokey};
use immich_backup::demo::{self, sample, sample::PgCluster};
use immich_backup::error::exit;

/// A second person's identity, written beside the source's work folder.
fn person(src: &Source, name: &str) -> (PathBuf, String) {
    let key = crypto::generate_key();
    let path = src.work.path().join(format!("{name}.txt"));
    crypto::write_identity_file(&path, &key).unwrap();
    (path, key.recipient)
}

/// The backup machine's verification key (a restore with another person's identity trusts the
/// snapshots through it).
fn verify_key(src: &Source) -> String {
    SigningKey::parse(&src.signing_key)
        .unwrap()
        .verify_key()
        .to_string()
}

fn backup(config: &Path) -> serde_json::Value {
    cli(Some(config), &["--json", "backup"], &[])
        .expect_code(exit::OK)
        .json()
}

/// The key folders that hold any file, oldest first.
fn key_folders(src: &Source) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(src.store.join("keys"))
        .map(|rd| {
            rd.flatten()
                .filter(|e| fs::read_dir(e.path()).is_ok_and(|mut d| d.next().is_some()))
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Whether `identity` opens any file in key folder `folder` (with the `age` command).
fn opens_any(src: &Source, folder: &str, identity: &Path) -> bool {
    fs::read_dir(src.store.join("keys").join(folder))
        .unwrap()
        .flatten()
        .any(|e| {
            std::process::Command::new("age")
                .arg("-d")
                .arg("-i")
                .arg(identity)
                .arg(e.path())
                .output()
                .unwrap()
                .status
                .success()
        })
}

/// Restore snapshot `id` with `identity` (and `extra` flags) into a fresh cluster and folder;
/// the restored library must be `want`'s originals.
fn restore_into_fresh(src: &Source, id: &str, identity: &Path, extra: &[&str], want: &Path) {
    let fresh = PgCluster::start(None).unwrap();
    let target = src.work.path().join(format!("target-{id}"));
    let rconfig = src.write_restore_config(&format!("restore-{id}.toml"), &fresh, &target);
    let mut args = vec![id];
    args.extend_from_slice(extra);
    let run = cli(Some(&rconfig), &restore_args(identity, &args), &[]);
    run.expect_code(exit::OK);
    let diff = demo::compare_trees(want, &target, &original_folders()).unwrap();
    assert!(diff.differences.is_empty(), "{:?}", diff.differences);
}

/// `cp -a`: modes, times and symlinks as they are.
fn copy_tree(from: &Path, to: &Path) {
    let ok = std::process::Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .unwrap();
    assert!(ok.success());
}

#[test]
fn adding_a_recipient_uploads_nothing_again_and_it_restores_old_and_new_snapshots() {
    let src = Source::new(ASSETS);
    let config = src.write_config("config.toml");
    let init = cli(Some(&config), &["--json", "init"], &[]);
    let folder = init.expect_code(exit::OK).json()["repository_key"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(key_folders(&src), vec![folder.clone()]);
    let first = backup(&config)["snapshot"].as_str().unwrap().to_string();
    let before = data_objects(&src.store);
    let old_library = src.work.path().join("library-then");
    copy_tree(&src.upload, &old_library);

    let (b_identity, b_recipient) = person(&src, "bob");
    let a = path_arg(&src.identity);
    let run = cli(
        Some(&config),
        &["--json", "key", "add", &b_recipient, "-i", a],
        &[],
    );
    let r = run.expect_code(exit::OK).json();
    assert_eq!(r["added"], serde_json::json!([folder]), "{r}");
    // Twice is nothing new.
    let again = cli(
        Some(&config),
        &["--json", "key", "add", &b_recipient, "-i", a],
        &[],
    );
    assert_eq!(again.expect_code(exit::OK).json()["present"][0], folder);

    // The next backup uploads only what changed: one new photo.
    sample::add_photo(&src.upload, "library/admin/2025/IMG_9001.jpg", 40_000, 9001).unwrap();
    let r = backup(&config);
    let second = r["snapshot"].as_str().unwrap().to_string();
    assert_eq!(r["files_new"], 1, "{r}");
    let after = data_objects(&src.store);
    assert_eq!(after.len(), before.len() + 1);
    assert!(before.keys().all(|k| after.contains_key(k)));

    // `key list` names both: A from the config, B with B's identity.
    let list = |extra: &[&str]| {
        let mut args = vec!["--json", "key", "list"];
        args.extend_from_slice(extra);
        cli(Some(&config), &args, &[]).expect_code(exit::OK).json()
    };
    let l = list(&[]);
    assert_eq!(l[0]["key"], folder);
    assert_eq!(l[0]["current"], true);
    assert_eq!(l[0]["snapshots"], 2);
    assert_eq!(l[0]["machines"], 1);
    let named: Vec<&str> = l[0]["recipients"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r["recipient"].as_str())
        .collect();
    assert_eq!(named, vec![src.recipient.as_str()], "{l}");
    let l = list(&["-i", path_arg(&b_identity)]);
    assert!(l.to_string().contains(&b_recipient), "{l}");

    // B restores both snapshots (trusting the backup machine's signatures by its verify key).
    let verify = verify_key(&src);
    let b = ["--verify-key", verify.as_str()];
    restore_into_fresh(&src, &first, &b_identity, &b, &old_library);
    restore_into_fresh(&src, &second, &b_identity, &b, &src.upload);
    // Without the verify key, B's identity does not make the snapshots trusted.
    let fresh = PgCluster::start(None).unwrap();
    let rconfig = src.write_restore_config("r.toml", &fresh, &src.work.path().join("t"));
    let run = cli(Some(&rconfig), &restore_args(&b_identity, &[]), &[]);
    assert_ne!(run.code, exit::OK);
    assert!(run.stderr.contains("verify"), "{}", run.stderr);

    // docs/FORMAT.md's restore-by-hand steps, as written there, with B's identity and the `age`
    // command: the key file first, then the manifest and the dump.
    by_hand(&src, &b_identity, &second);
}

/// Run docs/FORMAT.md's "Restoring by hand" script up to the manifest, then decrypt the dump, in
/// the store folder with `identity` as `identity.txt`.
fn by_hand(src: &Source, identity: &Path, id: &str) {
    let doc = fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/FORMAT.md")).unwrap();
    let section = &doc[doc.find("## Restoring by hand").unwrap()..];
    let block = &section[section.find("```sh\n").unwrap() + 6..];
    let end = block.find("\n# 1. the database").unwrap();
    let script = format!(
        "set -e\n{}\n[ \"$ID\" = {id} ]\nage -d -i \"$K\" \"snapshots/$ID/dump.sql.gz.age\" | gunzip | head -c 300\n",
        &block[..end]
    );
    fs::copy(identity, src.store.join("identity.txt")).unwrap();
    let out = std::process::Command::new("bash")
        .arg("-c")
        .arg(&script)
        .env("STORE", &src.store)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("PostgreSQL database cluster dump"),
        "{script}\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let manifest: serde_json::Value =
        serde_json::from_slice(&fs::read(src.store.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["id"], id);
    assert!(fs::read_to_string(src.store.join("repository-key.txt"))
        .unwrap()
        .contains("AGE-SECRET-KEY-1"));
}

#[test]
fn removing_and_rotating_shut_a_recipient_out_and_prune_drops_unused_keys() {
    let src = Source::new(ASSETS);
    let config = src.write_config("config.toml");
    let first = backup(&config)["snapshot"].as_str().unwrap().to_string();
    let old = key_folders(&src)[0].clone();
    let (b_identity, b_recipient) = person(&src, "bob");
    let a = path_arg(&src.identity);
    cli(Some(&config), &["key", "add", &b_recipient, "-i", a], &[]).expect_code(exit::OK);
    assert!(opens_any(&src, &old, &b_identity));

    // Someone who holds no key file cannot add or remove one.
    let (c_identity, c_recipient) = person(&src, "carol");
    let c = path_arg(&c_identity);
    let run = cli(Some(&config), &["key", "add", &c_recipient, "-i", c], &[]);
    run.expect_code(exit::WRONG_KEY);
    assert!(run.stderr.contains("key file"), "{}", run.stderr);

    // Removing B deletes its key file; the last recipient of a key cannot be removed.
    let run = cli(
        Some(&config),
        &["--json", "key", "remove", &b_recipient, "-i", a],
        &[],
    );
    assert_eq!(run.expect_code(exit::OK).json()["removed"][0], old);
    assert!(!opens_any(&src, &old, &b_identity));
    let run = cli(
        Some(&config),
        &["key", "remove", &src.recipient, "-i", a],
        &[],
    );
    run.expect_code(exit::USAGE);
    assert!(run.stderr.contains("only recipient"), "{}", run.stderr);
    assert!(opens_any(&src, &old, &src.identity));

    // Rotating is refused while the current key has a recipient the config does not name.
    cli(Some(&config), &["key", "add", &c_recipient, "-i", a], &[]).expect_code(exit::OK);
    let run = cli(Some(&config), &["key", "rotate"], &[]);
    run.expect_code(exit::USAGE);
    assert!(run.stderr.contains("--force"), "{}", run.stderr);
    assert_eq!(key_folders(&src).len(), 1);
    let run = cli(Some(&config), &["--json", "key", "rotate", "--force"], &[]);
    let new = run.expect_code(exit::OK).json()["key"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(key_folders(&src), vec![old.clone(), new.clone()]);
    // Neither removed recipient opens the new key's files.
    assert!(!opens_any(&src, &new, &b_identity));
    assert!(!opens_any(&src, &new, &c_identity));
    assert!(opens_any(&src, &new, &src.identity));

    // The next backup seals to the new key (so it uploads the library once more).
    let r = backup(&config);
    let second = r["snapshot"].as_str().unwrap().to_string();
    let summary: serde_json::Value = serde_json::from_slice(
        &fs::read(src.store.join(format!("snapshots/{second}/summary.json"))).unwrap(),
    )
    .unwrap();
    assert_eq!(summary["repository_key"], new);
    // The old key's snapshot stays readable; prune keeps its key while it exists.
    let ls = cli(
        Some(&config),
        &["--json", "ls", &first, "library", "-i", a],
        &[],
    );
    ls.expect_code(exit::OK);
    let p = cli(Some(&config), &["--json", "prune"], &[]);
    assert!(p.expect_code(exit::OK).json()["keys_removed"].is_null());
    assert_eq!(key_folders(&src).len(), 2);
    // Once the old snapshot is forgotten, prune removes the old key too.
    let f = cli(
        Some(&config),
        &["--json", "forget", "--keep-last", "1", "--prune"],
        &[],
    );
    let f = f.expect_code(exit::OK).json();
    assert!(f.to_string().contains(&old), "{f}");
    assert_eq!(key_folders(&src), vec![new.clone()]);
    restore_into_fresh(&src, &second, &src.identity, &[], &src.upload);
}

#[test]
fn a_format_1_store_restores_and_migrates_to_a_repository_key() {
    let src = Source::new(ASSETS);
    let config = src.write_config("config.toml");
    fs::create_dir_all(&src.store).unwrap();
    fs::write(
        src.store.join("immich-backup.json"),
        r#"{"format": 1, "id": "0123456789abcdef0123456789abcdef", "created": "2026-01-01T00:00:00Z", "tool": "immich-backup 0.1.0"}"#,
    )
    .unwrap();
    let r = backup(&config);
    let first = r["snapshot"].as_str().unwrap().to_string();
    let all = r["files_new"].as_u64().unwrap();
    assert!(!src.store.join("keys").exists());
    let old_objects = data_objects(&src.store);
    let a = path_arg(&src.identity);
    let (_, b_recipient) = person(&src, "bob");
    let run = cli(Some(&config), &["key", "add", &b_recipient, "-i", a], &[]);
    run.expect_code(exit::USAGE);
    assert!(run.stderr.contains("key migrate"), "{}", run.stderr);
    let l = cli(Some(&config), &["key", "list"], &[]);
    assert!(l.expect_code(exit::OK).stdout.contains("format 1"));

    let run = cli(Some(&config), &["--json", "key", "migrate"], &[]);
    let folder = run.expect_code(exit::OK).json()["key"]
        .as_str()
        .unwrap()
        .to_string();
    cli(Some(&config), &["key", "migrate"], &[]).expect_code(exit::USAGE);
    let r = backup(&config);
    let second = r["snapshot"].as_str().unwrap().to_string();
    // Content names change with the key: the library is uploaded once more.
    assert_eq!(r["files_new"].as_u64().unwrap(), all, "{r}");
    let summary: serde_json::Value = serde_json::from_slice(
        &fs::read(src.store.join(format!("snapshots/{second}/summary.json"))).unwrap(),
    )
    .unwrap();
    assert_eq!(summary["repository_key"], folder);
    // The format-1 snapshot's objects still open with the identity alone (age command).
    let any = old_objects.keys().next().unwrap();
    let o = std::process::Command::new("age")
        .arg("-d")
        .arg("-i")
        .arg(&src.identity)
        .arg(src.store.join(any))
        .output()
        .unwrap();
    assert!(o.status.success());
    restore_into_fresh(&src, &first, &src.identity, &[], &src.upload);
    // Forgetting it and pruning removes the format-1 content; the new snapshot restores.
    cli(
        Some(&config),
        &["--json", "forget", "--keep-last", "1", "--prune"],
        &[],
    )
    .expect_code(exit::OK);
    let now = data_objects(&src.store);
    assert!(old_objects.keys().all(|k| !now.contains_key(k)));
    restore_into_fresh(&src, &second, &src.identity, &[], &src.upload);
}

#[test]
fn a_tampered_key_folder_never_makes_a_backup_seal_to_another_key() {
    let src = Source::new(ASSETS);
    let config = src.write_config("config.toml");
    backup(&config);
    let folder = key_folders(&src)[0].clone();
    let dir = src.store.join("keys").join(&folder);
    let machine = fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("machine-")
        })
        .unwrap();
    let snapshots_before = manifests(&src.store);
    let genuine = fs::read(&machine).unwrap();

    // The machine file replaced by one naming an attacker's key: the backup stops, before any
    // snapshot, and the store is left as it was.
    let attacker = crypto::generate_key();
    let forged = serde_json::json!({
        "repository": "0123456789abcdef0123456789abcdef",
        "key": folder,
        "public_key": attacker.recipient,
        "created": "2026-12-05T00:00:00Z",
        "mac": "00",
    });
    fs::remove_file(&machine).unwrap();
    seal_with_age(&attacker.recipient, &machine, &forged.to_string());
    let run = cli(Some(&config), &["backup"], &[("IMMICH_BACKUP_LOG", "off")]);
    run.expect_code(exit::INTEGRITY);
    assert!(run.stderr.contains("does not verify"), "{}", run.stderr);
    assert_eq!(manifests(&src.store), snapshots_before);

    // A newer key folder someone else made (a key file for our recipient, no machine file it
    // could have made): the backup refuses rather than seal to it or to an older key.
    fs::write(&machine, &genuine).unwrap();
    let theirs = repokey::RepositoryKey::parse(
        crypto::generate_key()
            .file_text
            .expose_secret_text()
            .lines()
            .last()
            .unwrap(),
    )
    .unwrap();
    let newer = src
        .store
        .join("keys")
        .join(format!("29991231T000000Z-{}", theirs.id()));
    fs::create_dir_all(&newer).unwrap();
    let mine = repokey::recipient_id(&src.recipient);
    seal_with_age(
        &src.recipient,
        &newer.join(format!("{mine}.age")),
        theirs
            .key_file_text("x", &src.recipient)
            .expose_secret_text(),
    );
    let run = cli(Some(&config), &["backup"], &[("IMMICH_BACKUP_LOG", "off")]);
    run.expect_code(exit::USAGE);
    assert!(run.stderr.contains("key rotate"), "{}", run.stderr);
    assert_eq!(manifests(&src.store), snapshots_before);

    // A key file whose key is not its folder's is ignored by a restore (with a warning), which
    // still reads the real snapshots; the backup goes on with the real key.
    fs::remove_dir_all(&newer).unwrap();
    let older = src
        .store
        .join("keys")
        .join("20000101T000000Z-0000000000000000");
    fs::create_dir_all(&older).unwrap();
    seal_with_age(
        &src.recipient,
        &older.join(format!("{mine}.age")),
        theirs
            .key_file_text("x", &src.recipient)
            .expose_secret_text(),
    );
    backup(&config);

    // A newer key deleted from the store after this machine used it: the backup stops rather than
    // go back to the older key (which a rotation may have meant to retire).
    let run = cli(Some(&config), &["--json", "key", "rotate"], &[]);
    let newest = run.expect_code(exit::OK).json()["key"]
        .as_str()
        .unwrap()
        .to_string();
    backup(&config);
    fs::rename(
        src.store.join("keys").join(&newest),
        src.work.path().join("moved-key"),
    )
    .unwrap();
    let before = manifests(&src.store);
    let run = cli(Some(&config), &["backup"], &[("IMMICH_BACKUP_LOG", "off")]);
    run.expect_code(exit::INTEGRITY);
    assert!(run.stderr.contains("was deleted"), "{}", run.stderr);
    assert_eq!(manifests(&src.store), before);
    fs::rename(
        src.work.path().join("moved-key"),
        src.store.join("keys").join(&newest),
    )
    .unwrap();
    let run = cli(
        Some(&config),
        &["ls", "latest", "library", "-i", path_arg(&src.identity)],
        &[],
    );
    run.expect_code(exit::OK);
    assert!(run.stderr.contains("ignored"), "{}", run.stderr);
}

/// `age -r recipient -o out` of `text`, with the `age` command.
fn seal_with_age(recipient: &str, out: &Path, text: &str) {
    use std::io::Write;
    let mut c = std::process::Command::new("age")
        .arg("-r")
        .arg(recipient)
        .arg("-o")
        .arg(out)
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    c.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    assert!(c.wait().unwrap().success());
}

/// `expose_secret` for a `SecretString`, without importing the trait in every test.
trait ExposeText {
    fn expose_secret_text(&self) -> &str;
}

impl ExposeText for age::secrecy::SecretString {
    fn expose_secret_text(&self) -> &str {
        use age::secrecy::ExposeSecret;
        self.expose_secret()
    }
}
