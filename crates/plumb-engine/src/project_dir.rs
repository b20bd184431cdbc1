//! Reading a project from disk: `plumb.yaml`, `workflows/*.yaml` and the
//! data contracts in `schemas/` (`*.json`, in subfolders too).

use std::path::{Path, PathBuf};

use plumb_core::{Diagnostic, Diagnostics, Project, ProjectConfig, SourceFile};
use plumb_store::Synchronous;

/// Why a project could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// There is no `plumb.yaml`.
    #[error("no plumb.yaml in {dir}; run `plumb init` to create a project, or pass --project DIR")]
    NoProject {
        /// The directory searched.
        dir: PathBuf,
    },
    /// The files hold problems.
    #[error("{0}")]
    Invalid(Diagnostics),
}

/// The project's file name.
pub const PROJECT_FILE: &str = "plumb.yaml";

/// The workflows folder.
pub const WORKFLOWS_DIR: &str = "workflows";

/// The data contracts folder.
pub const SCHEMAS_DIR: &str = "schemas";

/// How deep `schemas/` is searched: a link loop or a deep tree is not read
/// forever.
const MAX_SCHEMA_DEPTH: usize = 8;

/// Every project file as text.
#[derive(Clone, Debug)]
pub struct Sources {
    /// `plumb.yaml`.
    pub project: SourceFile,
    /// `workflows/*.yaml`, by file name.
    pub workflows: Vec<SourceFile>,
    /// `schemas/**/*.json`, by path.
    pub schemas: Vec<SourceFile>,
}

/// Reads every project file as text. Unreadable files become diagnostics so
/// `plumb check` still reports everything else.
///
/// # Errors
///
/// [`LoadError::NoProject`] when `plumb.yaml` is missing, or
/// [`LoadError::Invalid`] when a file cannot be read.
pub fn read_sources(root: &Path) -> Result<Sources, LoadError> {
    let project_path = root.join(PROJECT_FILE);
    if !project_path.is_file() {
        return Err(LoadError::NoProject {
            dir: root.to_owned(),
        });
    }
    let mut diags = Diagnostics::default();
    let project = read_one(&project_path, PROJECT_FILE, &mut diags);
    let mut workflows = Vec::new();
    let dir = root.join(WORKFLOWS_DIR);
    if dir.is_dir() {
        match std::fs::read_dir(&dir) {
            Ok(entries) => {
                let mut paths: Vec<PathBuf> = entries
                    .filter_map(Result::ok)
                    .map(|e| e.path())
                    .filter(|p| {
                        p.is_file()
                            && matches!(
                                p.extension().and_then(|e| e.to_str()),
                                Some("yaml" | "yml")
                            )
                    })
                    .collect();
                paths.sort();
                for path in paths {
                    let name = path
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default();
                    let display = format!("{WORKFLOWS_DIR}/{name}");
                    if let Some(file) = read_one(&path, &display, &mut diags) {
                        workflows.push(file);
                    }
                }
            }
            Err(e) => diags.push(Diagnostic::file(
                WORKFLOWS_DIR,
                format!("cannot list the workflows folder: {e}"),
            )),
        }
    }
    let mut schemas = Vec::new();
    read_schemas(root, Path::new(SCHEMAS_DIR), 0, &mut schemas, &mut diags);
    schemas.sort_by(|a, b| a.path.cmp(&b.path));
    match project {
        Some(project) if diags.is_empty() => Ok(Sources {
            project,
            workflows,
            schemas,
        }),
        _ => Err(LoadError::Invalid(diags)),
    }
}

/// Reads the `.json` files below `root/relative` into `out`, as paths
/// relative to the project with `/` separators.
fn read_schemas(
    root: &Path,
    relative: &Path,
    depth: usize,
    out: &mut Vec<SourceFile>,
    diags: &mut Diagnostics,
) {
    let dir = root.join(relative);
    if depth > MAX_SCHEMA_DEPTH || !dir.is_dir() {
        return;
    }
    let display_dir = relative.to_string_lossy().replace('\\', "/");
    let entries = match std::fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(e) => {
            diags.push(Diagnostic::file(
                &display_dir,
                format!("cannot list the schemas folder: {e}"),
            ));
            return;
        }
    };
    for entry in entries.filter_map(Result::ok) {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        let inner = relative.join(&name);
        let display = format!("{display_dir}/{name}");
        // Links are not followed: a link loop would read the tree again
        // and again.
        if entry.file_type().is_ok_and(|t| t.is_symlink()) {
            diags.push(
                Diagnostic::file(&display, "a symbolic link in schemas/ is not followed")
                    .help("copy the schema into the project's schemas/ folder"),
            );
            continue;
        }
        if path.is_dir() {
            read_schemas(root, &inner, depth + 1, out, diags);
        } else if path.extension().and_then(|e| e.to_str()) == Some("json") {
            // A schema is small: a huge file is refused before it is read.
            let too_big = std::fs::metadata(&path)
                .is_ok_and(|m| m.len() > plumb_core::contract::MAX_SCHEMA_BYTES as u64);
            if too_big {
                diags.push(
                    Diagnostic::file(
                        &display,
                        format!(
                            "the schema is larger than {} bytes",
                            plumb_core::contract::MAX_SCHEMA_BYTES
                        ),
                    )
                    .help(
                        "a data contract describes a payload's shape; split it or remove examples",
                    ),
                );
            } else if let Some(file) = read_one(&path, &display, diags) {
                out.push(file);
            }
        }
    }
}

fn read_one(path: &Path, display: &str, diags: &mut Diagnostics) -> Option<SourceFile> {
    match std::fs::read(path) {
        Ok(bytes) => match String::from_utf8(bytes) {
            Ok(text) => Some(SourceFile {
                path: display.to_owned(),
                text,
            }),
            Err(_) => {
                diags.push(
                    Diagnostic::file(display, "the file is not valid UTF-8 text")
                        .help("save it as UTF-8"),
                );
                None
            }
        },
        Err(e) => {
            diags.push(Diagnostic::file(
                display,
                format!("cannot read the file: {e}"),
            ));
            None
        }
    }
}

/// Loads and validates the whole project.
///
/// # Errors
///
/// As [`read_sources`], plus every validation problem.
pub fn load_project(root: &Path) -> Result<Project, LoadError> {
    let sources = read_sources(root)?;
    let mut project = plumb_core::load_project_checking_secrets(
        &sources.project,
        &sources.workflows,
        &sources.schemas,
        None,
    )
    .map_err(LoadError::Invalid)?;
    anchor_files(&mut project.config, root);
    Ok(project)
}

/// Makes the files of SQLite connections, written relative to the project,
/// absolute: a step finds the same database whatever the process's
/// working directory.
fn anchor_files(config: &mut std::sync::Arc<ProjectConfig>, root: &Path) {
    use plumb_core::model::{Connection, SqlUrl};
    let relative = |c: &Connection| matches!(c, Connection::Sql(s) if matches!(&s.url, SqlUrl::File(f) if f.is_relative()));
    if !config.connections.values().any(relative) {
        return;
    }
    let config = std::sync::Arc::make_mut(config);
    for connection in config.connections.values_mut() {
        if let Connection::Sql(sql) = connection
            && let SqlUrl::File(file) = &mut sql.url
            && file.is_relative()
        {
            *file = root.join(&*file);
        }
    }
}

/// Like [`load_project`], and also reports every secret the files name
/// that is not among `known_secrets`.
///
/// # Errors
///
/// As [`load_project`].
pub fn load_project_checking_secrets(
    root: &Path,
    known_secrets: &std::collections::BTreeSet<String>,
) -> Result<Project, LoadError> {
    let sources = read_sources(root)?;
    let mut project = plumb_core::load_project_checking_secrets(
        &sources.project,
        &sources.workflows,
        &sources.schemas,
        Some(known_secrets),
    )
    .map_err(LoadError::Invalid)?;
    anchor_files(&mut project.config, root);
    Ok(project)
}

/// Loads what can be loaded of the project (see
/// [`plumb_core::PartialProject`]): one broken workflow file does not stop
/// a command that needs another one.
///
/// # Errors
///
/// [`LoadError::NoProject`] when there is no `plumb.yaml`, or
/// [`LoadError::Invalid`] when a file cannot be read at all.
pub fn load_project_partial(root: &Path) -> Result<plumb_core::PartialProject, LoadError> {
    let sources = read_sources(root)?;
    let mut partial = plumb_core::load_project_partial(
        &sources.project,
        &sources.workflows,
        &sources.schemas,
        None,
    );
    if let Some(config) = &mut partial.config {
        anchor_files(config, root);
    }
    Ok(partial)
}

/// Where the project's store is, resolved from its `store:` URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreLocation {
    /// A SQLite file (relative paths taken from the project directory) and
    /// its durability mode: `?synchronous=normal` trades the last commits
    /// on power loss for speed; the default is `full`.
    Sqlite {
        /// The database file.
        path: PathBuf,
        /// Its durability mode.
        synchronous: Synchronous,
    },
    /// A PostgreSQL database: the URL as written, without a password.
    Postgres {
        /// The URL, without plumb's own options.
        url: String,
        /// plumb's own options (`pool`, `notify`).
        options: plumb_core::store_url::PostgresOptions,
    },
}

impl StoreLocation {
    /// What names this store to a person, and what a server hashes into
    /// its store id: the canonical file path, or the URL (it holds no
    /// password).
    #[must_use]
    pub fn display_name(&self) -> String {
        match self {
            Self::Sqlite { path, .. } => std::fs::canonicalize(path)
                .unwrap_or_else(|_| path.clone())
                .display()
                .to_string(),
            Self::Postgres { url, .. } => url.clone(),
        }
    }
}

/// Resolves the project's `store:` URL.
///
/// # Errors
///
/// Returns a message when the URL is not one plumb can use (see
/// [`plumb_core::store_url::parse_store_url`]).
pub fn store_location(config: &ProjectConfig, root: &Path) -> Result<StoreLocation, String> {
    match plumb_core::store_url::parse_store_url(&config.store)? {
        plumb_core::store_url::StoreUrl::Sqlite {
            file,
            synchronous_full,
        } => {
            let path = Path::new(&file);
            Ok(StoreLocation::Sqlite {
                path: if path.is_absolute() {
                    path.to_owned()
                } else {
                    root.join(path)
                },
                synchronous: if synchronous_full {
                    Synchronous::Full
                } else {
                    Synchronous::Normal
                },
            })
        }
        plumb_core::store_url::StoreUrl::Postgres { url, options } => {
            Ok(StoreLocation::Postgres { url, options })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(store: &str) -> ProjectConfig {
        ProjectConfig {
            schemas: std::collections::BTreeMap::new(),
            store: store.to_owned(),
            listen: String::new(),
            connections: std::collections::BTreeMap::new(),
            defaults: plumb_core::model::Defaults {
                retry: plumb_core::model::DEFAULT_RETRY,
                timeout: plumb_core::model::DEFAULT_TIMEOUT,
                retention: plumb_core::model::DEFAULT_RETENTION,
            },
            alerts: std::collections::BTreeMap::new(),
            serve: plumb_core::model::ServeConfig::default(),
            version: String::new(),
            connection_versions: std::collections::BTreeMap::new(),
            lint_allow: Vec::new(),
        }
    }

    #[test]
    fn store_urls_resolve_relative_to_the_project() {
        let root = Path::new("/p");
        assert_eq!(
            store_location(&config("sqlite://plumb.db"), root),
            Ok(StoreLocation::Sqlite {
                path: PathBuf::from("/p/plumb.db"),
                synchronous: Synchronous::Full
            })
        );
        assert_eq!(
            store_location(
                &config("sqlite:///var/lib/plumb.db?synchronous=normal"),
                root
            ),
            Ok(StoreLocation::Sqlite {
                path: PathBuf::from("/var/lib/plumb.db"),
                synchronous: Synchronous::Normal
            })
        );
        assert!(store_location(&config("sqlite://x.db?mode=fast"), root).is_err());
        assert_eq!(
            store_location(&config("postgres://plumb@db/plumb"), root),
            Ok(StoreLocation::Postgres {
                url: "postgres://plumb@db/plumb".into(),
                options: plumb_core::store_url::PostgresOptions::default(),
            })
        );
    }
}
