//! One module per subcommand, plus what they share: finding the project and
//! opening its store.

pub mod check;
pub mod cursor;
pub mod demo;
pub mod init;
pub mod mock;
pub mod ops;
pub mod run;
pub mod runs;
pub mod secrets;
pub mod serve;
pub mod store;
pub mod trace;

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use plumb_core::{Diagnostics, ProjectConfig};
use plumb_engine::project_dir::StoreLocation;
use plumb_engine::project_dir::{self, LoadError, PROJECT_FILE};
use plumb_store::{PgStore, SqliteStore, Store};

/// Prints diagnostics to stderr in the format `plumb check` uses.
pub fn print_diagnostics(diags: &Diagnostics) {
    let style = crate::output::Style::detect();
    for d in &diags.0 {
        let mut text = d.to_string();
        if let Some((head, rest)) = text.split_once(": ") {
            text = format!("{head}: {} {rest}", style.bad("error:"));
        }
        eprintln!("{text}\n");
    }
}

/// Loads `plumb.yaml` for a command that only needs the store and the
/// server's address (history, status, dead letters, secrets, tokens,
/// audit): a broken workflow file does not matter to it, and a
/// `plumb.yaml` with problems still names its store — which is how one
/// fixes the problem (`plumb secrets set` the secret it names).
pub fn load_config(root: &Path) -> anyhow::Result<ProjectConfig> {
    let project_file = match project_dir::read_sources(root) {
        Ok(sources) => sources.project,
        // A workflow file that cannot be read is not this command's
        // business; plumb.yaml must be readable.
        Err(LoadError::Invalid(_)) => {
            let path = root.join(PROJECT_FILE);
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("reading {}", path.display()))?;
            plumb_core::SourceFile {
                path: PROJECT_FILE.to_owned(),
                text,
            }
        }
        Err(e) => return Err(e.into()),
    };
    match plumb_core::load_config_lenient(&project_file) {
        Ok((config, problems)) => {
            if !problems.is_empty() {
                eprintln!(
                    "warning: {PROJECT_FILE} has {} problem(s) (`plumb check` lists them); using the store it names, {}",
                    problems.0.len(),
                    config.store
                );
            }
            Ok(config)
        }
        Err(d) => {
            print_diagnostics(&d);
            anyhow::bail!(
                "{PROJECT_FILE} has problems, and the store it names cannot be read from it; fix them (`plumb check` lists them)"
            )
        }
    }
}

/// The full id of the run `given` names: the id itself, or a prefix of
/// exactly one run's id (like git's abbreviated commits).
pub async fn resolve_run_id(store: &dyn plumb_store::Store, given: &str) -> anyhow::Result<String> {
    let given = given.trim();
    let found = store.run_ids_with_prefix(given, 6).await?;
    match found.as_slice() {
        [] => Err(crate::UsageError(format!(
            "no run with id `{given}`; `plumb runs list` shows the runs"
        ))
        .into()),
        [one] => Ok(one.clone()),
        many => Err(crate::UsageError(format!(
            "`{given}` starts the ids of more than one run ({}{}); give more of the id",
            many.iter().take(5).cloned().collect::<Vec<_>>().join(", "),
            if many.len() > 5 { ", …" } else { "" }
        ))
        .into()),
    }
}

/// The id a server of this project reports in `/healthz` (see
/// `plumb_server::store_id`), from the store's canonical path.
pub fn store_id_of(location: &StoreLocation) -> String {
    plumb_server::store_id(&location.display_name())
}

/// Who the audit log says did something from this command line.
pub fn cli_actor() -> String {
    let user = std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .ok()
        .filter(|u| !u.is_empty())
        // Without a login name (containers, cron), the real uid still
        // says who it was.
        .or_else(|| {
            std::fs::read_to_string("/proc/self/status")
                .ok()?
                .lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|ids| ids.split_whitespace().next())
                .map(|uid| format!("uid {uid}"))
        })
        .unwrap_or_else(|| "unknown".to_owned());
    format!("cli:{user}")
}

/// The master key file of a project: `$PLUMB_MASTER_KEY_FILE`, else
/// `.plumb/master.key` in the project directory (outside the store, and
/// ignored by git).
pub fn master_key_file(root: &Path) -> std::path::PathBuf {
    std::env::var_os("PLUMB_MASTER_KEY_FILE").map_or_else(
        || root.join(".plumb").join("master.key"),
        // An explicitly named file may be reached through links (a mounted
        // secret volume): resolve them here; the file itself must not be
        // one.
        |named| {
            let named = std::path::PathBuf::from(named);
            std::fs::canonicalize(&named).unwrap_or(named)
        },
    )
}

/// The master key from `$PLUMB_MASTER_KEY` or the key file, or why there is
/// none (an exposed key file is an error, not an absence).
pub fn load_master_key(root: &Path) -> anyhow::Result<Result<Arc<plumb_vault::MasterKey>, String>> {
    let env = std::env::var(plumb_vault::MASTER_KEY_ENV).ok();
    match plumb_vault::MasterKey::load(env.as_deref(), &master_key_file(root)) {
        Ok(k) => Ok(Ok(Arc::new(k))),
        Err(e @ plumb_vault::VaultError::NoKey { .. }) => Ok(Err(e.to_string())),
        Err(e) => Err(e.into()),
    }
}

/// Gives the engine the master key and opens the secrets the project uses.
pub async fn load_secrets(engine: &plumb_engine::Engine, root: &Path) -> anyhow::Result<()> {
    engine.set_master_key(load_master_key(root)?);
    engine.load_secrets().await?;
    Ok(())
}

/// Where the store `plumb.yaml` names is.
pub fn store_location(config: &ProjectConfig, root: &Path) -> anyhow::Result<StoreLocation> {
    project_dir::store_location(config, root).map_err(anyhow::Error::msg)
}

/// Opens the store `plumb.yaml` names: a SQLite file, or a PostgreSQL
/// database whose password comes from `PLUMB_STORE_PASSWORD` or the file
/// `PLUMB_STORE_PASSWORD_FILE` names (never from `plumb.yaml`).
pub async fn open_store(config: &ProjectConfig, root: &Path) -> anyhow::Result<Arc<dyn Store>> {
    open_store_as(config, root, false).await
}

/// Opens the store for a one-shot command that claims no work (`status`,
/// `dlq`, `runs`, `secrets`, …): on PostgreSQL without a listening
/// connection and with at most two connections (see
/// [`plumb_core::store_url::PostgresOptions::for_command`]).
pub async fn open_store_for_command(
    config: &ProjectConfig,
    root: &Path,
) -> anyhow::Result<Arc<dyn Store>> {
    open_store_as(config, root, true).await
}

async fn open_store_as(
    config: &ProjectConfig,
    root: &Path,
    command: bool,
) -> anyhow::Result<Arc<dyn Store>> {
    match store_location(config, root)? {
        StoreLocation::Sqlite { path, synchronous } => {
            let store = SqliteStore::open(&path, synchronous)
                .await
                .with_context(|| format!("opening the store {}", path.display()))?;
            Ok(Arc::new(store))
        }
        StoreLocation::Postgres { url, options } => {
            let options = if command {
                options.for_command()
            } else {
                options
            };
            let store = PgStore::connect(&url, store_password()?, options)
                .await
                .with_context(|| format!("opening the store {url}"))?;
            Ok(Arc::new(store))
        }
    }
}

/// The PostgreSQL store's password, if one is given.
pub fn store_password() -> anyhow::Result<Option<String>> {
    if let Ok(password) = std::env::var("PLUMB_STORE_PASSWORD") {
        return Ok(Some(password));
    }
    match std::env::var_os("PLUMB_STORE_PASSWORD_FILE") {
        None => Ok(None),
        Some(file) => {
            let text = std::fs::read_to_string(&file).with_context(|| {
                format!(
                    "reading the store password from {} (PLUMB_STORE_PASSWORD_FILE)",
                    Path::new(&file).display()
                )
            })?;
            // A file written by `echo` ends with a newline that is not part
            // of the password.
            Ok(Some(text.trim_end_matches(['\n', '\r']).to_owned()))
        }
    }
}
