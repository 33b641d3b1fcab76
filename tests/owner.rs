//! File owners (issue 16): a backup records each file's, folder's and symlink's uid and gid; a
//! restore run as root gives them back (and `--no-owner` does not); an owner-only change is
//! recorded by the next backup without uploading the content again. Real clusters, the real
//! binary; CI runs as root, so the chowns are real (the test says so and stops when not root).

mod common;

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use common::*;
use immich_backup::demo::sample::{PgCluster, GENERATED_FOLDERS, MARKER_FILE};
use immich_backup::error::exit;

const OWNER: (u32, u32) = (1234, 5678);
const PHOTO: &str = "library/admin/2024/IMG_0001.jpg";
const OTHER: &str = "library/admin/2024/IMG_0002.jpg";
const LINK: &str = "library/admin/2024/latest.jpg";
const DIR: &str = "library/admin/2024";

fn lchown(p: &Path, (uid, gid): (u32, u32)) {
    std::os::unix::fs::lchown(p, Some(uid), Some(gid)).unwrap();
}

fn owner(p: &Path) -> (u32, u32) {
    let m = fs::symlink_metadata(p).unwrap();
    (m.uid(), m.gid())
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

#[test]
fn owners_are_recorded_restored_as_root_and_left_alone_with_no_owner() {
    if !is_root() {
        eprintln!("skipped: chown needs root (CI runs as root)");
        return;
    }
    let src = Source::new(ASSETS);
    for p in ["library", DIR, PHOTO, LINK] {
        lchown(&src.upload.join(p), OWNER);
    }
    // The photo is setuid: chown clears that bit, so the mode must be set after the owner.
    fs::set_permissions(
        src.upload.join(PHOTO),
        std::os::unix::fs::PermissionsExt::from_mode(0o4750),
    )
    .unwrap();
    let config = src.write_config("config.toml");
    wait_until_settled();
    let first = cli(Some(&config), &["--json", "backup"], &[]);
    let first = first.expect_code(exit::OK).json();
    let id = first["snapshot"].as_str().unwrap();

    // Recorded for files, folders and symlinks; ours (root) elsewhere.
    let list = file_list(&src.store, &src.identity, id);
    let recorded = |p: &str| {
        let e = list.iter().find(|e| e.path == p).unwrap();
        (e.uid.unwrap(), e.gid.unwrap())
    };
    for p in ["library", DIR, PHOTO, LINK] {
        assert_eq!(recorded(p), OWNER, "{p}");
    }
    assert_eq!(recorded(OTHER), (0, 0));

    // Restore as root: every owner back, the setuid bit kept with --keep-special-modes. One
    // file is already in place (root-owned), as an interrupted restore leaves it: its owner is
    // fixed too.
    let fresh = PgCluster::start(None).unwrap();
    let target = src.work.path().join("restored");
    fs::create_dir_all(target.join(DIR)).unwrap();
    fs::copy(src.upload.join(PHOTO), target.join(PHOTO)).unwrap();
    assert_eq!(owner(&target.join(PHOTO)), (0, 0));
    let rconfig = src.write_restore_config("restore.toml", &fresh, &target);
    let run = cli(
        Some(&rconfig),
        &restore_args(&src.identity, &["latest", "--keep-special-modes"]),
        &[],
    );
    let r = run.expect_code(exit::OK).json();
    assert_eq!(r["files_already_present"], 1, "{r}");
    for p in ["library", DIR, PHOTO, LINK] {
        assert_eq!(owner(&target.join(p)), OWNER, "{p}");
    }
    assert_eq!(owner(&target.join(OTHER)), (0, 0));
    let mode = fs::metadata(target.join(PHOTO)).unwrap().mode() & 0o7777;
    assert_eq!(mode, 0o4750, "mode set after the owner");
    // Folders restore makes (not in the snapshot) and their markers: the originals' owner.
    for g in GENERATED_FOLDERS {
        assert_eq!(owner(&target.join(g)), OWNER, "{g}");
        assert_eq!(owner(&target.join(g).join(MARKER_FILE)), OWNER, "{g}");
    }

    // --no-owner: everything ours.
    let fresh2 = PgCluster::start(None).unwrap();
    let target2 = src.work.path().join("restored-no-owner");
    let rconfig2 = src.write_restore_config("restore2.toml", &fresh2, &target2);
    let run = cli(
        Some(&rconfig2),
        &restore_args(
            &src.identity,
            &["latest", "--no-owner", "--keep-special-modes"],
        ),
        &[],
    );
    run.expect_code(exit::OK);
    for p in ["library", DIR, PHOTO, LINK, "thumbs", "thumbs/.immich"] {
        assert_eq!(owner(&target2.join(p)), (0, 0), "{p}");
    }
    assert_same_originals(&src.upload, &target2);

    // An owner-only change: in the next snapshot, and no content uploaded again.
    let before = data_objects(&src.store);
    lchown(&src.upload.join(OTHER), (4321, 8765));
    let second = cli(Some(&config), &["--json", "backup"], &[]);
    let second = second.expect_code(exit::OK).json();
    assert_eq!(second["files_new"], 0, "{second}");
    assert_eq!(second["bytes_stored"], 0, "{second}");
    assert_eq!(data_objects(&src.store), before);
    let list = file_list(
        &src.store,
        &src.identity,
        second["snapshot"].as_str().unwrap(),
    );
    let e = list.iter().find(|e| e.path == OTHER).unwrap();
    assert_eq!((e.uid, e.gid), (Some(4321), Some(8765)));
}
