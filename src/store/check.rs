//! `immich-backup init`: check a store before the first backup, then create the repository marker.
//!
//! Like restic's `init`, but it also proves the store works for us: the credentials are accepted
//! and the bucket exists, an object can be written, read back, listed and deleted, and a second
//! create-only write of the same object is refused (the format relies on create-only writes so that
//! nothing stored is ever overwritten). Each check gives one line, and a remedy when it fails.

use bytes::Bytes;
use serde::Serialize;

use crate::error::Error;
use crate::format;
use crate::store::cloud::Backend;
use crate::store::Store;

/// How a check went.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    /// Works, with a caveat.
    Warn,
    Fail,
    /// Not run because an earlier check failed.
    Skipped,
}

/// One check's result.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub check: &'static str,
    pub status: Status,
    pub detail: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub remedy: Option<String>,
}

/// What `init` found.
#[derive(Debug, Clone, Serialize)]
pub struct InitReport {
    pub store: String,
    pub checks: Vec<Check>,
    /// The repository id, when the marker was read or created.
    pub repository: Option<String>,
    pub format: Option<u32>,
    /// True when this run created the repository.
    pub created: bool,
    pub ok: bool,
}

impl InitReport {
    /// The checks that failed, by name.
    pub fn failed(&self) -> Vec<&'static str> {
        self.checks
            .iter()
            .filter(|c| c.status == Status::Fail)
            .map(|c| c.check)
            .collect()
    }
}

/// A failed check: what happened and what to do.
pub struct Failure {
    pub(crate) detail: String,
    pub(crate) remedy: String,
}

fn remedy_for(store: &Store, err: &Error) -> String {
    let text = err.to_string();
    let what = store.backend().bucket_word();
    if text.contains("does not exist (") {
        return match store.backend() {
            Backend::S3 => format!("create the {what} (provider console, or `aws s3 mb s3://{}`), or correct [storage] url", store.bucket()),
            Backend::Gcs => format!("create the {what} (`gcloud storage buckets create gs://{}`), or correct [storage] url", store.bucket()),
            Backend::Azure => format!("create the {what} (`az storage container create --name {}`), or correct [storage] url", store.bucket()),
            Backend::Local | Backend::WebDav | Backend::Sftp => "create the folder, or correct [storage] url".into(),
        };
    }
    if text.contains("host key") {
        return "check the server's key fingerprint with its provider, then add it to known_hosts (`ssh-keyscan -p PORT HOST >> ~/.ssh/known_hosts`) or set [storage] ssh_host_key".into();
    }
    if text.contains("denied") {
        return store.backend().credentials_hint().to_string();
    }
    let lower = text.to_ascii_lowercase();
    if lower.contains("redirect") || lower.contains("region") {
        return "set [storage] region to the bucket's region".into();
    }
    if store.backend() == Backend::Sftp && lower.contains("connect") {
        return "check the host and port in [storage] url (a Hetzner Storage Box uses port 23) and that the server is reachable".into();
    }
    if lower.contains("error sending request")
        || lower.contains("connect")
        || lower.contains("dns")
        || lower.contains("timed out")
    {
        return "check that the endpoint is reachable: [storage] endpoint (scheme, host, port), allow_http for a plain http:// endpoint, and the network".into();
    }
    if lower.contains("no space") {
        return "the store is full: free space there".into();
    }
    "see the message; `-vv` logs more".into()
}

pub(crate) fn fail(store: &Store, err: Error) -> Failure {
    Failure {
        remedy: remedy_for(store, &err),
        detail: err.to_string(),
    }
}

pub(crate) type Outcome = std::result::Result<(Status, String), Failure>;

/// Add a check's line; true when it passed (possibly with a warning).
pub(crate) fn record(checks: &mut Vec<Check>, check: &'static str, r: Outcome) -> bool {
    let ok = matches!(r, Ok((Status::Ok | Status::Warn, _)));
    checks.push(match r {
        Ok((status, detail)) => Check {
            check,
            status,
            detail,
            remedy: None,
        },
        Err(f) => Check {
            check,
            status: Status::Fail,
            detail: f.detail,
            remedy: Some(f.remedy),
        },
    });
    ok
}

/// Run every check against `store` (the repository marker is [`crate::repo::init`]'s).
pub async fn run(store: &Store) -> InitReport {
    let probe = format!(
        "immich-backup-init-check-{}",
        hex::encode(rand::random::<[u8; 8]>())
    );
    let body = Bytes::from(format!(
        "written by `immich-backup init` to check the store; safe to delete ({probe})\n"
    ));
    let mut checks = Vec::new();
    // 1. Reach the store: credentials accepted, bucket exists (a listing needs both).
    let access = async {
        let listed = store.list_keys(format::SNAPSHOTS_DIR).await;
        match listed {
            Ok(items) => Ok((
                Status::Ok,
                format!(
                    "{} {:?} reachable{} ({} object(s) under snapshots/)",
                    store.backend().bucket_word(),
                    store.bucket(),
                    if store.backend() == Backend::Local {
                        ""
                    } else {
                        ", credentials accepted"
                    },
                    items.len()
                ),
            )),
            Err(e) => Err(fail(store, e)),
        }
    }
    .await;
    let reachable = record(&mut checks, "access", access);

    // 2. Write a small object, create-only.
    let wrote = if reachable {
        let r = match store.put_new(&probe, body.clone()).await {
            Ok(true) => Ok((Status::Ok, format!("created {probe}"))),
            Ok(false) => Ok((
                Status::Warn,
                format!("{probe} already existed (a leftover of an earlier check?)"),
            )),
            Err(e) => Err(fail(store, e)),
        };
        record(&mut checks, "write", r)
    } else {
        false
    };

    // 3. Read it back.
    if wrote {
        let r = match store.get_bytes(&probe).await {
            Ok(b) if b == body => Ok((Status::Ok, format!("read {} bytes back intact", b.len()))),
            Ok(b) => Err(Failure {
                detail: format!(
                    "read {} bytes back, expected the {} written",
                    b.len(),
                    body.len()
                ),
                remedy: "the store changes what it stores (a proxy or gateway rewriting content?)"
                    .into(),
            }),
            Err(e) => Err(fail(store, e)),
        };
        record(&mut checks, "read", r);

        // 4. List it.
        let r = match store.list_top().await {
            Ok(items) if items.contains(&probe) => {
                Ok((Status::Ok, "the new object is listed".to_string()))
            }
            Ok(_) => Err(Failure {
                detail: "the object just written is not listed".into(),
                remedy: "the store's listing is not consistent with its writes; backups would upload everything again".into(),
            }),
            Err(e) => Err(fail(store, e)),
        };
        record(&mut checks, "list", r);

        // 5. A second create-only write of the same key must be refused.
        let r = if !store.conditional_create() {
            Ok((
                Status::Warn,
                "not checked: [storage] conditional_create = false (objects are checked, then written)".to_string(),
            ))
        } else {
            match store.put_new(&probe, Bytes::from_static(b"overwritten\n")).await {
                Ok(false) if store.backend() == Backend::WebDav => Ok((
                    Status::Ok,
                    "a second create-only write of the same object was refused (MOVE with Overwrite: F answered 412). WebDAV guarantees: uploads go to a temporary NAME.immich-backup-partial-… and are moved into place, so a partial upload is never visible under its key; not guaranteed: the server checks, then renames, so two writers of one key at the same instant are not told apart".to_string(),
                )),
                Ok(false) if store.backend() == Backend::Sftp => Ok((
                    Status::Ok,
                    "a second create-only write of the same object was refused (SFTP rename does not replace an existing file). SFTP guarantees: uploads go to a temporary NAME.immich-backup-partial-… (created exclusively, synced when the server offers fsync@openssh.com) and are renamed into place, so a partial upload is never visible under its key; OpenSSH renames by link-then-unlink, which refuses an existing key atomically; not guaranteed: on a file system without hard links OpenSSH checks, then renames, so two writers of one key at the same instant are not told apart".to_string(),
                )),
                Ok(false) => Ok((
                    Status::Ok,
                    "a second create-only write of the same object was refused".to_string(),
                )),
                Ok(true) if store.backend() == Backend::Sftp => Ok((
                    Status::Warn,
                    "NOT honoured: the SFTP server's rename replaced an existing object; backups work (content objects are named by their content, snapshot ids are random) but two runs at once are not detected".to_string(),
                )),
                Ok(true) if store.backend() == Backend::WebDav => Ok((
                    Status::Warn,
                    "NOT honoured: the WebDAV server replaced an object on a MOVE with Overwrite: F; backups work (content objects are named by their content, snapshot ids are random) but two runs at once are not detected".to_string(),
                )),
                Ok(true) => Ok((
                    Status::Warn,
                    "NOT honoured: the store overwrote an object on a create-only write; backups work (content objects are named by their content, snapshot ids are random) but two runs at once are not detected".to_string(),
                )),
                Err(e) => Err(Failure {
                    detail: e.to_string(),
                    remedy: "the store rejects conditional writes (If-None-Match); set [storage] conditional_create = false".into(),
                }),
            }
        };
        record(&mut checks, "conditional-create", r);

        // 6. Delete it, and make sure it is gone.
        let r = match store.delete(&probe).await {
            Ok(()) => match store.size(&probe).await {
                Ok(None) => Ok((Status::Ok, format!("deleted {probe}"))),
                Ok(Some(_)) => Err(Failure {
                    detail: format!("{probe} is still there after a delete"),
                    remedy: "the store ignores deletes (object lock or versioning without delete markers?); pruning old snapshots will not free space".into(),
                }),
                Err(e) => Err(fail(store, e)),
            },
            Err(e) => Err(Failure {
                remedy: format!(
                    "allow deletes for these credentials (pruning needs them), then delete {probe} by hand"
                ),
                detail: e.to_string(),
            }),
        };
        record(&mut checks, "delete", r);
    }
    // Checks that did not run, in their place.
    for name in ["write", "read", "list", "conditional-create", "delete"] {
        if !checks.iter().any(|c| c.check == name) {
            checks.push(Check {
                check: name,
                status: Status::Skipped,
                detail: "skipped: an earlier check failed".into(),
                remedy: None,
            });
        }
    }

    InitReport {
        store: store.url().to_string(),
        ok: !checks.iter().any(|c| c.status == Status::Fail),
        checks,
        repository: None,
        format: None,
        created: false,
    }
}

/// The error `init` ends with when a check failed.
pub fn failure_error(report: &InitReport) -> Error {
    Error::Storage {
        url: report.store.clone(),
        message: format!(
            "failed check(s): {}; fix what the lines above say and run `immich-backup init` again",
            report.failed().join(", ")
        ),
    }
}

/// Human output: one line per check.
pub fn print(report: &InitReport) {
    println!("Checking {}", report.store);
    for c in &report.checks {
        let tag = match c.status {
            Status::Ok => "ok  ",
            Status::Warn => "WARN",
            Status::Fail => "FAIL",
            Status::Skipped => "skip",
        };
        match &c.remedy {
            Some(r) => println!("  {tag} {:<19} {} → {r}", c.check, c.detail),
            None => println!("  {tag} {:<19} {}", c.check, c.detail),
        }
    }
    if report.ok {
        println!(
            "Store {} ready (repository {}, format {}).",
            report.store,
            report.repository.as_deref().unwrap_or("?"),
            report.format.unwrap_or(format::FORMAT_VERSION)
        );
    }
}
