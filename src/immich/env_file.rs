//! Immich's `.env` (the file `docker compose` reads beside Immich's `docker-compose.yml`): where
//! UPLOAD_LOCATION is and how to reach the database, so `[immich] env_file` can stand for those
//! keys instead of copying them.
//!
//! Parsed with `dotenvy` (compose's syntax: `KEY=value`, `#` comments, single and double quotes,
//! `export KEY=value`, `${OTHER}` references), without touching this process's environment. A
//! relative UPLOAD_LOCATION (Immich's default is `./library`) is read from the `.env`'s folder, as
//! compose reads it from the project folder the `.env` sits in. The password is never shown: a line
//! that cannot be parsed is named by its number only.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// What Immich's `.env` says that this program uses.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct ImmichEnv {
    /// UPLOAD_LOCATION, absolute (a relative one is joined to the `.env`'s folder).
    pub upload_location: Option<PathBuf>,
    /// DB_USERNAME.
    pub username: Option<String>,
    /// DB_PASSWORD.
    pub password: Option<String>,
    /// DB_DATABASE_NAME.
    pub database: Option<String>,
}

impl std::fmt::Debug for ImmichEnv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImmichEnv")
            .field("upload_location", &self.upload_location)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("database", &self.database)
            .finish()
    }
}

/// The key that names the file, for messages.
const KEY: &str = "[immich] env_file";

/// Read Immich's `.env` at `path` (absolute, or relative to the current folder).
pub fn read(path: &Path) -> Result<ImmichEnv> {
    let shown = path.display();
    let text = std::fs::read(path).map_err(|e| {
        let why = match e.kind() {
            std::io::ErrorKind::NotFound => {
                "no such file; give the path of the .env beside Immich's docker-compose.yml".into()
            }
            std::io::ErrorKind::PermissionDenied => {
                "permission denied; run as a user that may read it".into()
            }
            _ => e.to_string(),
        };
        Error::Config(format!("{KEY} = {:?}: {why}", shown.to_string()))
    })?;
    let folder = std::path::absolute(path)
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
        .unwrap_or_default();
    let mut env = ImmichEnv::default();
    for item in dotenvy::from_read_iter(&text[..]) {
        let (key, value) = item.map_err(|e| parse_error(path, &text, e))?;
        match key.as_str() {
            "UPLOAD_LOCATION" if !value.is_empty() => {
                // `./library` → `<folder>/library`; an absolute path stays as it is.
                let plain: PathBuf = Path::new(&value)
                    .components()
                    .filter(|c| !matches!(c, std::path::Component::CurDir))
                    .collect();
                env.upload_location = Some(folder.join(plain));
            }
            "DB_USERNAME" => env.username = Some(value),
            "DB_PASSWORD" => env.password = Some(value),
            "DB_DATABASE_NAME" => env.database = Some(value),
            _ => {}
        }
    }
    Ok(env)
}

/// The error for a line dotenvy cannot parse, by line number (the line may hold the password).
fn parse_error(path: &Path, text: &[u8], e: dotenvy::Error) -> Error {
    let why = match e {
        dotenvy::Error::LineParse(line, at) => {
            let text = String::from_utf8_lossy(text);
            let first = line.lines().next().unwrap_or_default();
            let number = text
                .lines()
                .position(|l| !first.is_empty() && l.contains(first))
                .map(|n| format!("line {}", n + 1))
                .unwrap_or_else(|| "a line".into());
            format!(
                "{number} cannot be parsed (at character {}); write it as KEY=value, quoting a value with spaces or special characters",
                at + 1
            )
        }
        dotenvy::Error::Io(e) => e.to_string(),
        other => other.to_string(),
    };
    Error::Config(format!("{KEY} = {:?}: {why}", path.display().to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shape of Immich's docker/example.env.
    const EXAMPLE: &str = "\
# You can find documentation for all the supported env variables at https://immich.app/docs/install/environment-variables

# The location where your uploaded files are stored
UPLOAD_LOCATION=./library

# The location where your database files are stored. Network shares are not supported for the database
DB_DATA_LOCATION=./postgres

# To set a timezone, uncomment the next line and change Etc/UTC to a TZ identifier from this list: https://en.wikipedia.org/wiki/List_of_tz_database_time_zones#List
# TZ=Etc/UTC

# The Immich version to use. You can pin this to a specific version like \"v1.71.0\"
IMMICH_VERSION=release

# Connection secret for postgres. You should change it to a random password
# Please use only the characters `A-Za-z0-9`, without special characters or spaces
DB_PASSWORD=postgres

# The values below this line do not need to be changed
###################################################################################
DB_USERNAME=postgres
DB_DATABASE_NAME=immich
";

    #[test]
    fn immichs_example_env_gives_its_values_with_upload_location_from_its_folder() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(".env");
        std::fs::write(&path, EXAMPLE).unwrap();
        let env = read(&path).unwrap();
        assert_eq!(env.upload_location, Some(dir.path().join("library")));
        assert_eq!(env.username.as_deref(), Some("postgres"));
        assert_eq!(env.password.as_deref(), Some("postgres"));
        assert_eq!(env.database.as_deref(), Some("immich"));
        assert!(format!("{env:?}").contains("password: Some(\"<redacted>\")"));
        // Quotes, export, an absolute path, and nothing leaks into our environment.
        std::fs::write(
            &path,
            "export UPLOAD_LOCATION=\"/mnt/photos lib\"\nDB_PASSWORD='s3cr#t'\n",
        )
        .unwrap();
        let env = read(&path).unwrap();
        assert_eq!(env.upload_location, Some(PathBuf::from("/mnt/photos lib")));
        assert_eq!(env.password.as_deref(), Some("s3cr#t"));
        assert_eq!(env.username, None);
        assert!(std::env::var_os("DB_PASSWORD").is_none());
    }

    #[test]
    fn a_bad_line_is_named_by_number_without_its_text() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(".env");
        std::fs::write(&path, "UPLOAD_LOCATION=./library\nDB PASSWORD=hunter2\n").unwrap();
        let err = read(&path).unwrap_err().to_string();
        assert!(err.contains("[immich] env_file = "), "{err}");
        assert!(err.contains("line 2 cannot be parsed"), "{err}");
        assert!(!err.contains("hunter2"), "{err}");
        let err = read(&dir.path().join("missing.env"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("[immich] env_file") && err.contains("no such file"),
            "{err}"
        );
    }
}
