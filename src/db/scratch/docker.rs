//! The drill's throwaway server in Docker mode: a container `immich-backup-drill-…` from the
//! snapshot's Postgres image, next to (never instead of) `immich_postgres`.
//!
//! The image is the one the snapshot recorded (by id, else by name); when this host has neither,
//! the image of `[database] container`. The container copies from `[database] container` (when it
//! runs that same image) what makes Postgres run there: its user, environment (without the
//! `POSTGRES_*`/`PG*` variables), the `-c` settings of its command (`shared_preload_libraries` of
//! the vector extension, `config_file`), its read-only mounts and its tmpfs mounts; never a
//! writable mount, so the real data cannot be reached. It has no network; its data live in an
//! anonymous volume that is removed with it. Its main process only sleeps: `initdb` and
//! `pg_ctl start` run as execs, so each step's error comes back with its output, and psql connects
//! over the socket in the data folder (`PGHOST` in the container's environment).
//!
//! Every drill container carries the labels of its [`Owner`], by which the next drill finds and
//! removes those whose drill was killed.

use std::collections::HashMap;

use bollard::models::{ContainerCreateBody, ContainerInspectResponse, HostConfig};
use bollard::query_parameters::{
    CreateContainerOptions, ListContainersOptions, RemoveContainerOptions, StartContainerOptions,
};
use bollard::Docker;

use super::{preload, shell_word, Guard, Owner, Scratch, Wanted};
use crate::config::DatabaseConfig;
use crate::db::docker::{engine_error, DockerDatabase};
use crate::db::Database;
use crate::error::{Error, Result};

/// Where the throwaway server keeps its data and socket (an anonymous volume).
const DIR: &str = "/var/lib/immich-backup-drill";
/// The label every drill container has (its value: the run id), and those naming its owner.
pub const LABEL: &str = "immich-backup.drill";
const LABEL_HOST: &str = "immich-backup.drill.host";
const LABEL_PID: &str = "immich-backup.drill.pid";
const LABEL_STARTED: &str = "immich-backup.drill.started";
/// Settings of the real server's command that must not reach the throwaway one.
const NOT_COPIED: [&str; 8] = [
    // The image's entrypoint may write it at start-up, and the drill does not run the entrypoint.
    "config_file",
    "data_directory",
    "listen_addresses",
    "port",
    "unix_socket_directories",
    "hba_file",
    "ident_file",
    "external_pid_file",
];

/// Removes a drill container (force, with its anonymous volume).
pub(super) struct Removal {
    docker: Docker,
    host: String,
    name: String,
}

impl Removal {
    pub(super) async fn run(self) -> Result<()> {
        remove(&self.docker, &self.host, &self.name).await
    }
}

async fn remove(docker: &Docker, host: &str, name: &str) -> Result<()> {
    let opts = RemoveContainerOptions {
        force: true,
        v: true,
        ..Default::default()
    };
    match docker.remove_container(name, Some(opts)).await {
        Ok(()) => Ok(()),
        Err(bollard::errors::Error::DockerResponseServerError {
            status_code: 404, ..
        }) => Ok(()),
        Err(e) => Err(engine_error(
            host,
            &format!("removing container {name}"),
            &e,
        )),
    }
}

/// What the throwaway container is made from.
struct Model {
    /// The image to run (an id or a name), and how it was chosen.
    image: String,
    chosen: String,
    /// `[database] container`, when it exists.
    real: Option<ContainerInspectResponse>,
    /// Whether `real` runs `image` (then its user, environment and settings are copied).
    same_image: bool,
    /// The image's own command and entrypoint (for the bin folder and settings otherwise).
    image_cmd: Vec<String>,
}

/// Create and start the throwaway container, initdb and start Postgres in it; the container is
/// removed from the moment it exists.
pub(super) async fn start(cfg: &DatabaseConfig, wanted: &Wanted, owner: &Owner) -> Result<Scratch> {
    let real = DockerDatabase::new(cfg.clone());
    let docker = real.docker().await?.clone();
    let model = model(&real, &docker, cfg, wanted).await?;
    let name = owner.name();
    let body = create_body(&model, owner, &name);
    let opts = CreateContainerOptions {
        name: Some(name.clone()),
        ..Default::default()
    };
    docker
        .create_container(Some(opts), body)
        .await
        .map_err(|e| {
            engine_error(
                real.host(),
                &format!("creating the drill container from image {}", model.image),
                &e,
            )
        })?;
    let removal = Removal {
        docker: docker.clone(),
        host: real.host().to_string(),
        name: name.clone(),
    };
    let guard = Guard::new(super::Removal::Docker(removal), owner);
    let scratch = DockerDatabase::new(DatabaseConfig {
        container: name.clone(),
        username: wanted.username.clone(),
        database: wanted.database.clone(),
        server_container: String::new(),
        password: String::new(),
        ..cfg.clone()
    });
    if let Err(e) = run_postgres(&docker, &scratch, &model, &name, wanted).await {
        let _ = guard.remove().await;
        return Err(e);
    }
    Ok(Scratch {
        db: Box::new(scratch),
        what: format!("container {name} from {}", model.chosen),
        guard,
    })
}

/// Start the container, make the cluster and start Postgres in it.
async fn run_postgres(
    docker: &Docker,
    scratch: &DockerDatabase,
    model: &Model,
    name: &str,
    wanted: &Wanted,
) -> Result<()> {
    docker
        .start_container(name, None::<StartContainerOptions>)
        .await
        .map_err(|e| engine_error(scratch.host(), &format!("starting container {name}"), &e))?;
    let chmod = vec!["chmod".into(), "1777".into(), DIR.into()];
    step(scratch, "0", chmod).await?;
    let (user, cmd) = (server_user(model), model_cmd(model));
    let bin = bin_prefix(&cmd);
    step(scratch, &user, initdb_cmd(&bin, &wanted.username)).await?;
    let options = server_options(&cmd, &wanted.extensions);
    match step(scratch, &user, pg_ctl_start_cmd(&bin, options)).await {
        Ok(()) => scratch.wait_ready().await,
        Err(Error::Database(failed)) => {
            let log = scratch
                .run_as(&user, vec!["cat".into(), format!("{DIR}/postgres.log")])
                .await
                .map(|o| last_lines(&o.stdout, 3))
                .unwrap_or_default();
            Err(Error::Database(format!(
                "{failed}; the server's log says: {log}. The image cannot run the drill's Postgres as it is configured here"
            )))
        }
        Err(e) => Err(e),
    }
}

/// `initdb` of the data folder, with the snapshot's role as superuser.
fn initdb_cmd(bin: &str, superuser: &str) -> Vec<String> {
    vec![
        format!("{bin}initdb"),
        format!("--pgdata={DIR}/data"),
        format!("--username={superuser}"),
        "--auth=trust".into(),
        "--encoding=UTF8".into(),
        "--locale=C".into(),
        "--no-sync".into(),
    ]
}

/// `pg_ctl start` of the data folder with the server `options`, waiting until it serves.
fn pg_ctl_start_cmd(bin: &str, options: String) -> Vec<String> {
    vec![
        format!("{bin}pg_ctl"),
        "start".into(),
        "-w".into(),
        "-t".into(),
        "120".into(),
        "-s".into(),
        format!("--pgdata={DIR}/data"),
        format!("--log={DIR}/postgres.log"),
        "-o".into(),
        options,
    ]
}

/// Run one step of the set-up in the container; a failure names the step and what it printed.
async fn step(scratch: &DockerDatabase, user: &str, cmd: Vec<String>) -> Result<()> {
    let shown = cmd.join(" ");
    let out = scratch.run_as(user, cmd).await?;
    if out.code == 0 {
        return Ok(());
    }
    let said = if out.stderr.trim().is_empty() {
        &out.stdout
    } else {
        &out.stderr
    };
    Err(Error::Database(format!(
        "the drill's throwaway Postgres could not be set up: `{shown}` as user {user} in {} exited with code {}: {}",
        scratch.describe(),
        out.code,
        last_lines(said, 3)
    )))
}

fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(n)..].join(" | ")
}

/// Choose the image and read what the container is made from.
async fn model(
    real: &DockerDatabase,
    docker: &Docker,
    cfg: &DatabaseConfig,
    wanted: &Wanted,
) -> Result<Model> {
    let container = real.inspect(&cfg.container).await?;
    let real_image = container.as_ref().and_then(|c| c.image.clone());
    let (image, chosen) = choose_image(docker, wanted.image.as_deref(), container.as_ref(), cfg)
        .await
        .ok_or_else(|| no_image(wanted.image.as_deref(), cfg))?;
    let inspected = docker
        .inspect_image(&image)
        .await
        .map_err(|e| engine_error(real.host(), &format!("inspecting image {image}"), &e))?;
    let same_image = real_image.is_some() && real_image == inspected.id;
    let config = inspected.config.unwrap_or_default();
    let image_cmd = [config.entrypoint, config.cmd]
        .into_iter()
        .flatten()
        .flatten()
        .collect();
    tracing::info!(image = %image, "the drill's Postgres runs {chosen}");
    Ok(Model {
        image,
        chosen,
        real: container,
        same_image,
        image_cmd,
    })
}

/// The snapshot's image (by id, else by name) when this host has it, else the image of
/// `[database] container`; with how it was chosen.
async fn choose_image(
    docker: &Docker,
    recorded: Option<&str>,
    real: Option<&ContainerInspectResponse>,
    cfg: &DatabaseConfig,
) -> Option<(String, String)> {
    if let Some(recorded) = recorded {
        let (name, id) = split_recorded(recorded);
        for candidate in [id, Some(name)].into_iter().flatten() {
            if docker.inspect_image(candidate).await.is_ok() {
                let how = if Some(candidate) == id {
                    "the snapshot's image"
                } else {
                    "the snapshot's image name (its recorded id is not on this host)"
                };
                return Some((candidate.to_string(), format!("{how} {recorded}")));
            }
        }
    }
    let real = real?;
    let id = real.image.clone()?;
    let name = real.config.as_ref().and_then(|c| c.image.clone());
    let shown = name
        .map(|n| format!("{n} ({id})"))
        .unwrap_or_else(|| id.clone());
    let why = match recorded {
        Some(r) => format!("the snapshot's image {r} is not on this host"),
        None => "the snapshot recorded no image".to_string(),
    };
    Some((
        id,
        format!("the image of container {}, {shown} ({why})", cfg.container),
    ))
}

/// `name (id)` as [`crate::db::Database::image`] records it → (name, id).
fn split_recorded(recorded: &str) -> (&str, Option<&str>) {
    match recorded.strip_suffix(')').and_then(|r| r.rsplit_once(" (")) {
        Some((name, id)) => (name, Some(id)),
        None => (recorded, None),
    }
}

fn no_image(recorded: Option<&str>, cfg: &DatabaseConfig) -> Error {
    let pull = match recorded {
        Some(r) => format!(
            "the snapshot's image {r} is not on this host: pull it (`docker pull {}`), or ",
            split_recorded(r).0
        ),
        None => "the snapshot recorded no image: ".to_string(),
    };
    Error::Docker(format!(
        "no Postgres image to run the drill with: {pull}create Immich's containers (`docker compose create`) so that container {} names one",
        cfg.container
    ))
}

/// The container's configuration: sleeping main process, labels, copied user, environment and
/// mounts, the data volume, no network.
fn create_body(model: &Model, owner: &Owner, name: &str) -> ContainerCreateBody {
    let real_config = model.real.as_ref().and_then(|c| c.config.clone());
    let copied = real_config.filter(|_| model.same_image).unwrap_or_default();
    let mut env: Vec<String> = copied
        .env
        .unwrap_or_default()
        .into_iter()
        .filter(|v| !v.starts_with("PG") && !v.starts_with("POSTGRES_"))
        .collect();
    env.push(format!("PGHOST={DIR}"));
    let labels = HashMap::from([
        (LABEL.to_string(), owner.run.clone()),
        (LABEL_HOST.to_string(), owner.host.clone()),
        (LABEL_PID.to_string(), owner.pid.to_string()),
        (LABEL_STARTED.to_string(), owner.started.to_rfc3339()),
    ]);
    ContainerCreateBody {
        image: Some(model.image.clone()),
        hostname: Some(name.chars().take(63).collect()),
        user: copied.user.filter(|u| !u.is_empty()),
        env: Some(env),
        entrypoint: Some(vec!["sleep".into()]),
        cmd: Some(vec!["2147483647".into()]),
        labels: Some(labels),
        volumes: Some(vec![DIR.to_string()]),
        host_config: Some(host_config(model.real.as_ref())),
        ..Default::default()
    }
}

/// No network; the real container's read-only mounts and tmpfs mounts, nothing writable of it.
fn host_config(real: Option<&ContainerInspectResponse>) -> HostConfig {
    let binds = real
        .and_then(|c| c.mounts.clone())
        .unwrap_or_default()
        .into_iter()
        .filter(|m| m.rw == Some(false))
        .filter_map(|m| {
            let source = match m.typ.as_deref() {
                Some("bind") => m.source?,
                Some("volume") => m.name?,
                _ => return None,
            };
            Some(format!("{source}:{}:ro", m.destination?))
        })
        .collect();
    let tmpfs = real
        .and_then(|c| c.host_config.as_ref())
        .and_then(|h| h.tmpfs.clone());
    HostConfig {
        binds: Some(binds),
        tmpfs,
        network_mode: Some("none".into()),
        ..Default::default()
    }
}

/// The command Postgres runs with: the real container's (same image), else the image's.
fn model_cmd(model: &Model) -> Vec<String> {
    let real = model.real.as_ref().filter(|_| model.same_image);
    match real.and_then(|c| c.config.as_ref()) {
        Some(c) => [c.entrypoint.clone(), c.cmd.clone()]
            .into_iter()
            .flatten()
            .flatten()
            .collect(),
        None => model.image_cmd.clone(),
    }
}

/// The OS user Postgres runs as: the real container's (unless root), else `postgres`.
fn server_user(model: &Model) -> String {
    let real = model.real.as_ref().filter(|_| model.same_image);
    real.and_then(|c| c.config.as_ref())
        .and_then(|c| c.user.clone())
        .filter(|u| !u.is_empty() && u != "root" && !u.starts_with("0:") && u != "0")
        .unwrap_or_else(|| "postgres".into())
}

/// The folder of the `postgres` the command runs, with a slash, when it names one by path; else
/// empty (the tools are on the image's PATH).
fn bin_prefix(cmd: &[String]) -> String {
    cmd.iter()
        .find_map(|a| {
            a.strip_suffix("/postgres")
                .filter(|d| a.starts_with('/') && !d.is_empty())
        })
        .map(|dir| format!("{dir}/"))
        .unwrap_or_default()
}

/// The `postgres` options for `pg_ctl -o`: the `-c` settings of `cmd` but those in
/// [`NOT_COPIED`], the libraries the snapshot's `extensions` need preloaded, then socket only, in
/// [`DIR`]; each quoted for the shell pg_ctl runs.
fn server_options(cmd: &[String], extensions: &[String]) -> String {
    let mut configured_preload = None;
    let mut options = Vec::new();
    for (key, value) in settings(cmd) {
        if key == "shared_preload_libraries" {
            configured_preload = Some(value);
        } else if !NOT_COPIED.contains(&key.as_str()) {
            options.push(format!("-c {}", shell_word(&format!("{key}={value}"))));
        }
    }
    if let Some(libs) = preload(extensions, configured_preload.as_deref()) {
        options.push(format!(
            "-c {}",
            shell_word(&format!("shared_preload_libraries={libs}"))
        ));
    }
    options.push(format!("-k {DIR} -c listen_addresses=''"));
    options.join(" ")
}

/// The `-c key=value` (and `--key=value`) settings of the `postgres` in `cmd`, keys with `_`.
fn settings(cmd: &[String]) -> Vec<(String, String)> {
    let mut found = Vec::new();
    let mut args = cmd.iter().skip_while(|a| !a.ends_with("postgres"));
    while let Some(arg) = args.next() {
        let setting = match arg.as_str() {
            "-c" => args.next().cloned(),
            a => a
                .strip_prefix("-c")
                .or_else(|| a.strip_prefix("--"))
                .map(str::to_string),
        };
        if let Some((key, value)) = setting.as_deref().and_then(|s| s.split_once('=')) {
            found.push((key.replace('-', "_"), value.to_string()));
        }
    }
    found
}

/// Remove the drill containers whose drill is gone; what was removed.
pub(super) async fn remove_leftovers(cfg: &DatabaseConfig) -> Result<Vec<String>> {
    let real = DockerDatabase::new(cfg.clone());
    let docker = real.docker().await?;
    let opts = ListContainersOptions {
        all: true,
        filters: Some(HashMap::from([(
            "label".to_string(),
            vec![LABEL.to_string()],
        )])),
        ..Default::default()
    };
    let found = docker
        .list_containers(Some(opts))
        .await
        .map_err(|e| engine_error(real.host(), "listing the drill containers", &e))?;
    let mut removed = Vec::new();
    for c in found {
        let labels = c.labels.unwrap_or_default();
        let name = c
            .names
            .and_then(|n| n.first().cloned())
            .unwrap_or_else(|| c.id.clone().unwrap_or_default());
        let name = name.trim_start_matches('/').to_string();
        let Some(owner) = owner_of(&labels) else {
            continue;
        };
        match owner.fate() {
            super::Fate::Gone => {
                remove(docker, real.host(), &name).await?;
                removed.push(format!("container {name} ({})", owner.describe()));
            }
            super::Fate::Elsewhere => tracing::warn!(
                "drill container {name} was made by a drill on another host ({}); once that drill is over, remove it with `docker rm -f -v {name}`",
                owner.describe()
            ),
            super::Fate::Live => {}
        }
    }
    Ok(removed)
}

/// The owner its labels name.
fn owner_of(labels: &HashMap<String, String>) -> Option<Owner> {
    Some(Owner {
        run: labels.get(LABEL)?.clone(),
        host: labels.get(LABEL_HOST)?.clone(),
        pid: labels.get(LABEL_PID)?.parse().ok()?,
        started: labels
            .get(LABEL_STARTED)
            .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
            .map(|t| t.with_timezone(&chrono::Utc))
            .unwrap_or_default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn the_real_servers_settings_are_kept_but_where_it_listens_and_keeps_data() {
        let cmd = words(
            "docker-entrypoint.sh postgres -c shared_preload_libraries=vectors.so -c max_wal_size=2GB -c listen_addresses=* --port=5433 -cconfig_file=/etc/postgresql/postgresql.conf -D /x",
        );
        assert_eq!(
            server_options(&cmd, &["vchord".into(), "cube".into()]),
            format!("-c 'max_wal_size=2GB' -c 'shared_preload_libraries=vectors.so,vchord.so' -k {DIR} -c listen_addresses=''")
        );
        let cmd = words("/usr/lib/postgresql/15/bin/postgres -D /pgd/data -c listen_addresses= -c search_path=\"$user\",public,vectors");
        assert_eq!(
            server_options(&cmd, &[]),
            format!("-c 'search_path=\"$user\",public,vectors' -k {DIR} -c listen_addresses=''")
        );
    }

    #[test]
    fn the_bin_folder_comes_from_a_postgres_named_by_path() {
        assert_eq!(
            bin_prefix(&words("/usr/lib/postgresql/15/bin/postgres -D /d")),
            "/usr/lib/postgresql/15/bin/"
        );
        assert_eq!(bin_prefix(&words("docker-entrypoint.sh postgres")), "");
    }

    #[test]
    fn a_recorded_image_splits_into_name_and_id() {
        assert_eq!(
            split_recorded("ghcr.io/immich-app/postgres:14 (sha256:abc)"),
            ("ghcr.io/immich-app/postgres:14", Some("sha256:abc"))
        );
        assert_eq!(split_recorded("sha256:abc"), ("sha256:abc", None));
    }

    #[test]
    fn labels_name_the_owner() {
        let owner = Owner::new();
        owner.forget();
        let body = create_body(
            &Model {
                image: "img".into(),
                chosen: String::new(),
                real: None,
                same_image: false,
                image_cmd: Vec::new(),
            },
            &owner,
            &owner.name(),
        );
        let back = owner_of(&body.labels.unwrap()).unwrap();
        assert_eq!((back.run, back.pid), (owner.run, owner.pid));
        assert_eq!(
            body.host_config.unwrap().network_mode.as_deref(),
            Some("none")
        );
        assert!(body.env.unwrap().contains(&format!("PGHOST={DIR}")));
    }
}
