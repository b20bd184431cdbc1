//! The store itself: `plumb store copy --to URL` moves a project's store to
//! PostgreSQL; `plumb workers` lists the processes sharing it.

use anyhow::Context;
use plumb_core::store_url::{StoreUrl, parse_store_url};
use plumb_engine::project_dir::StoreLocation;
use plumb_store::copy::CopyTarget;
use plumb_store::{AuditStore, NewAuditEntry, PgStore, SqliteStore, Store};

use crate::cli::{Global, StoreCommand};
use crate::client::ApiClient;
use crate::{Exit, UsageError};

/// Runs a `plumb store` subcommand.
pub async fn run(global: &Global, command: StoreCommand) -> anyhow::Result<Exit> {
    match command {
        StoreCommand::Copy { to } => copy(global, &to).await,
    }
}

async fn copy(global: &Global, to: &str) -> anyhow::Result<Exit> {
    let root = global.project_dir();
    let config = super::load_config(&root)?;
    let location = super::store_location(&config, &root)?;
    let StoreLocation::Sqlite { path, synchronous } = &location else {
        return Err(UsageError(
            "this project's store is already on PostgreSQL; `plumb store copy` copies a SQLite store"
                .into(),
        )
        .into());
    };
    if !path.is_file() {
        return Err(UsageError(format!(
            "there is no store at {} (plumb.yaml's `store`): nothing to copy",
            path.display()
        ))
        .into());
    }
    let target = match parse_store_url(to) {
        Ok(StoreUrl::Postgres { url, options }) => (url, options),
        Ok(StoreUrl::Sqlite { .. }) => {
            return Err(UsageError(
                "copy to a PostgreSQL store: --to postgres://user@host:5432/database".into(),
            )
            .into());
        }
        Err(e) => return Err(UsageError(format!("--to: {e}")).into()),
    };
    let source = SqliteStore::open(path, *synchronous)
        .await
        .with_context(|| format!("opening the store {}", path.display()))?;
    // A copy of a store that is still being written would miss what comes
    // after: a server of this project that answers is asked to stop first.
    let instance = source.instance_secret().await?;
    if let Some(base) =
        ApiClient::probe(&config.listen, &super::store_id_of(&location), &instance).await
    {
        source.close().await;
        return Err(UsageError(format!(
            "this project's server is running at {base}; stop it and every `plumb worker` before copying its store"
        ))
        .into());
    }
    let (target, options) = target;
    let target_store = PgStore::connect(&target, super::store_password()?, options)
        .await
        .with_context(|| format!("opening the target store {target}"))?;
    let copied = target_store
        .copy_from(&source)
        .await
        .context("copying the store (nothing was written to the target)")?;
    let details = serde_json::json!({
        "from": path.display().to_string(),
        "rows": copied.iter().map(|c| (c.table, c.rows)).collect::<std::collections::BTreeMap<_, _>>(),
    });
    target_store
        .append_audit(&NewAuditEntry::new(
            &super::cli_actor(),
            "store.copied",
            &target,
            details.clone(),
        ))
        .await
        .context("recording the copy in the target's audit log")?;
    source.close().await;
    target_store.close().await;
    if global.json {
        println!(
            "{}",
            serde_json::json!({ "to": target, "from": details["from"], "rows": details["rows"] })
        );
    } else {
        println!("copied {} to {target}", path.display());
        for c in &copied {
            println!("  {:<18} {:>10} rows", c.table, c.rows);
        }
        println!(
            "next: set `store: {to}` in plumb.yaml, and PLUMB_STORE_PASSWORD where plumb runs"
        );
    }
    Ok(Exit::Success)
}

/// `plumb workers`: the processes that recorded a heartbeat in the last
/// 30 s.
pub async fn workers(global: &Global) -> anyhow::Result<Exit> {
    let root = global.project_dir();
    let config = super::load_config(&root)?;
    let store = super::open_store_for_command(&config, &root).await?;
    let listed = plumb_engine::status::live_processes(store.as_ref()).await;
    store.close().await;
    let (now, live) = listed?;
    if global.json {
        println!("{}", serde_json::json!({ "now": now, "workers": live }));
        return Ok(Exit::Success);
    }
    if live.is_empty() {
        println!("no plumb process has recorded a heartbeat in this store in the last 30 s");
        return Ok(Exit::Success);
    }
    println!(
        "{:<7} {:<24} {:>8}  {:<8} {:>9}  {:>9}  STARTED",
        "ROLE", "HOST", "PID", "VERSION", "RUNS", "LAST BEAT"
    );
    for p in &live {
        println!(
            "{:<7} {:<24} {:>8}  {:<8} {:>9}  {:>9}  {}",
            p.role,
            p.host,
            p.pid,
            p.version,
            format!("{}/{}", p.runs, p.capacity),
            format!("{} s ago", (now - p.beat_at).max(0) / 1000),
            crate::output::timestamp(p.started_at),
        );
    }
    let runs: u32 = live.iter().map(|p| p.runs).sum();
    println!(
        "{} live process{}, {runs} run{} in hand",
        live.len(),
        if live.len() == 1 { "" } else { "es" },
        if runs == 1 { "" } else { "s" }
    );
    Ok(Exit::Success)
}
