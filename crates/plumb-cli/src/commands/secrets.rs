//! `plumb secrets`, `plumb tokens`, `plumb audit`: on the store directly
//! (whoever can read the project's files is its administrator).

use std::io::{IsTerminal, Read};
use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use plumb_store::{ApiToken, SecretWrite, SecretWriteResult, Store};
use plumb_vault::{MasterKey, SecretValue};
use serde_json::json;
use zeroize::Zeroizing;

use crate::cli::{AuditCommand, Global, SecretsCommand, TokensCommand};
use crate::output::{Style, timestamp};
use crate::{Exit, UsageError};

async fn open(global: &Global) -> anyhow::Result<(std::path::PathBuf, Arc<dyn Store>)> {
    let root = global.project_dir();
    let config = super::load_config(&root)?;
    let store = super::open_store_for_command(&config, &root).await?;
    Ok((root, store))
}

/// Which secrets the project uses, and by whom (empty when the project
/// files cannot be read: the store's view still works).
fn secret_uses(root: &Path) -> std::collections::BTreeMap<String, Vec<String>> {
    match plumb_engine::project_dir::load_project(root) {
        Ok(p) => p.secret_uses(),
        Err(_) => super::load_config(root)
            .map(|c| c.secret_uses())
            .unwrap_or_default(),
    }
}

/// Reads a secret value from stdin, or from a prompt that does not echo
/// when stdin is a terminal. Never from the command line, where it would
/// land in the shell history and the process list.
fn read_value(name: &str) -> anyhow::Result<SecretValue> {
    let text = if std::io::stdin().is_terminal() {
        Zeroizing::new(
            rpassword::prompt_password(format!("value of secret {name} (not echoed): "))
                .context("reading the value")?,
        )
    } else {
        let mut text = Zeroizing::new(String::new());
        std::io::stdin()
            .read_to_string(&mut text)
            .context("reading the value from stdin")?;
        // A here-string or `echo` adds one newline that is not part of it.
        Zeroizing::new(
            text.strip_suffix("\r\n")
                .or_else(|| text.strip_suffix('\n'))
                .unwrap_or(&text)
                .to_owned(),
        )
    };
    if text.is_empty() {
        return Err(UsageError(
            "the value is empty; pipe it on stdin or type it at the prompt".into(),
        )
        .into());
    }
    if text.chars().count() < plumb_engine::secrets::MIN_SECRET_LEN {
        return Err(UsageError(format!(
            "the value is shorter than {} characters: it could not be redacted from logs and output",
            plumb_engine::secrets::MIN_SECRET_LEN
        ))
        .into());
    }
    Ok(SecretValue::new(text.to_string()))
}

/// The master key, creating the key file when this is the project's first
/// secret and no key exists anywhere yet.
async fn key_for_writing(root: &Path, store: &dyn Store) -> anyhow::Result<Arc<MasterKey>> {
    match super::load_master_key(root)? {
        Ok(k) => Ok(k),
        Err(why) => {
            if !store.list_secrets().await?.is_empty() {
                anyhow::bail!("{why}");
            }
            let file = super::master_key_file(root);
            let key = MasterKey::create_file(&file)?;
            eprintln!(
                "created the master key file {} (mode 0600). Back it up and keep it out of git: without it the secrets cannot be opened.",
                file.display()
            );
            Ok(Arc::new(key))
        }
    }
}

/// `plumb secrets …`.
pub async fn secrets(global: &Global, command: SecretsCommand) -> anyhow::Result<Exit> {
    let (root, store) = open(global).await?;
    let actor = super::cli_actor();
    let exit = match command {
        SecretsCommand::Set { name } | SecretsCommand::Rotate { name }
            if !plumb_core::load::is_identifier(&name) =>
        {
            return Err(UsageError(format!(
                "invalid secret name `{name}`: use letters, digits and `_`, starting with a letter or `_`"
            ))
            .into());
        }
        SecretsCommand::Set { name } => {
            write(
                global,
                &root,
                store.as_ref(),
                &name,
                SecretWrite::Create,
                &actor,
            )
            .await?
        }
        SecretsCommand::Rotate { name } => {
            write(
                global,
                &root,
                store.as_ref(),
                &name,
                SecretWrite::Rotate,
                &actor,
            )
            .await?
        }
        SecretsCommand::List => {
            let uses = secret_uses(&root);
            let list = store.list_secrets().await?;
            if global.json {
                let out: Vec<_> = list
                    .iter()
                    .map(|m| {
                        json!({
                            "name": m.name, "created_at": m.created_at, "rotated_at": m.rotated_at,
                            "key_id": m.key_id, "used_by": uses.get(&m.name).cloned().unwrap_or_default(),
                        })
                    })
                    .collect();
                println!("{}", serde_json::Value::Array(out));
            } else if list.is_empty() {
                println!(
                    "no secrets; add one with `plumb secrets set NAME` (the value is read from stdin or a prompt)"
                );
            } else {
                let s = Style::detect();
                println!(
                    "{}",
                    s.dim(
                        "NAME                 CREATED               ROTATED               USED BY"
                    )
                );
                for m in &list {
                    let used = uses
                        .get(&m.name)
                        .map(|u| u.join(", "))
                        .unwrap_or_else(|| "-".to_owned());
                    println!(
                        "{:<20} {:<21} {:<21} {used}",
                        m.name,
                        timestamp(m.created_at),
                        m.rotated_at
                            .map(timestamp)
                            .unwrap_or_else(|| "-".to_owned()),
                    );
                }
                let missing: Vec<&String> = uses
                    .keys()
                    .filter(|n| !list.iter().any(|m| &m.name == *n))
                    .collect();
                for n in missing {
                    println!(
                        "{} {n} is used ({}) but not set",
                        s.bad("missing:"),
                        uses[n].join(", ")
                    );
                }
            }
            Exit::Success
        }
        SecretsCommand::Delete { name, force } => {
            let users = secret_uses(&root).remove(&name).unwrap_or_default();
            if !users.is_empty() && !force {
                return Err(UsageError(format!(
                    "the secret `{name}` is used by {}; remove those uses first, or pass --force",
                    users.join(", ")
                ))
                .into());
            }
            if !store.delete_secret(&name, &actor).await? {
                return Err(UsageError(format!("no secret named `{name}`")).into());
            }
            if global.json {
                println!("{}", json!({ "name": name, "result": "deleted" }));
            } else {
                println!("deleted secret {name}");
            }
            Exit::Success
        }
        SecretsCommand::Rekey { new_key_file } => {
            rekey(
                global,
                &root,
                store.as_ref(),
                &actor,
                new_key_file.as_deref(),
            )
            .await?
        }
    };
    store.close().await;
    Ok(exit)
}

async fn write(
    global: &Global,
    root: &Path,
    store: &dyn Store,
    name: &str,
    mode: SecretWrite,
    actor: &str,
) -> anyhow::Result<Exit> {
    // The value first: the prompt may wait for a person, and the key is
    // checked against the stored secrets in the writing transaction.
    let value = read_value(name)?;
    let key = key_for_writing(root, store).await?;
    let sealed = plumb_engine::secrets::to_store(key.seal(name, &value));
    drop(value);
    let result = store.put_secret(name, &sealed, mode, actor).await?;
    let word = match result {
        SecretWriteResult::Created => "set",
        SecretWriteResult::Rotated => "rotated",
        SecretWriteResult::AlreadyExists => {
            return Err(UsageError(format!(
                "the secret `{name}` exists; replace its value with `plumb secrets rotate {name}`"
            ))
            .into());
        }
        SecretWriteResult::KeyMismatch { stored } => {
            return Err(plumb_engine::secrets::SecretsError::KeyRetired {
                current: key.fingerprint(),
                stored,
            }
            .into());
        }
        SecretWriteResult::NotFound => {
            return Err(UsageError(format!(
                "no secret named `{name}`; create it with `plumb secrets set {name}`"
            ))
            .into());
        }
    };
    if global.json {
        println!("{}", json!({ "name": name, "result": word }));
    } else {
        println!(
            "secret {name} {word} (sealed with key {}); a running `plumb serve` picks it up within seconds",
            key.fingerprint()
        );
    }
    Ok(Exit::Success)
}

/// Re-seals every secret under a new key. The new key is durably on disk
/// (fsynced, mode 0600) *before* the re-sealed secrets are committed, so no
/// crash, lost terminal or closed window can leave every secret sealed
/// under a key nobody has.
async fn rekey(
    global: &Global,
    root: &Path,
    store: &dyn Store,
    actor: &str,
    new_key_file: Option<&Path>,
) -> anyhow::Result<Exit> {
    let from_env = std::env::var(plumb_vault::MASTER_KEY_ENV).is_ok_and(|v| !v.trim().is_empty());
    if from_env && new_key_file.is_none() {
        return Err(UsageError(format!(
            "the master key comes from {}: give `--new-key-file FILE`; plumb writes the new key there (mode 0600) before re-sealing anything, then you set {} from it. Nothing was changed.",
            plumb_vault::MASTER_KEY_ENV,
            plumb_vault::MASTER_KEY_ENV
        ))
        .into());
    }
    let old = match super::load_master_key(root)? {
        Ok(k) => k,
        Err(why) => anyhow::bail!("{why}"),
    };
    let new = MasterKey::generate();
    // Read first: the rekey commits only if no secret changed since.
    let version = store.secrets_version().await?;
    let mut resealed = Vec::new();
    for meta in store.list_secrets().await? {
        let Some((sealed, _)) = store.secret(&meta.name).await? else {
            continue;
        };
        let value = old
            .open(&meta.name, &plumb_engine::secrets::from_store(sealed))
            .with_context(|| {
                format!(
                    "opening `{}` with the current key; nothing was changed",
                    meta.name
                )
            })?;
        resealed.push((
            meta.name.clone(),
            plumb_engine::secrets::to_store(new.seal(&meta.name, &value)),
        ));
    }
    let file = super::master_key_file(root);
    // The new key goes to disk first: beside the old key file (moved into
    // place after the commit), or where `--new-key-file` says.
    let staged = match new_key_file {
        Some(path) => path.to_owned(),
        None => file.with_extension("key.new"),
    };
    if new_key_file.is_none() {
        let _ = std::fs::remove_file(&staged);
    }
    write_key_file(&staged, &new)?;
    let committed = store.rekey_secrets(&resealed, &version, actor).await;
    plumb_engine::failpoint::hit("rekey.committed");
    if let Err(e) = committed {
        // Never delete the new key here: a store error can come after the
        // commit landed (the answer was lost), and then it is the only key
        // that opens the secrets.
        return Err(anyhow::Error::new(e).context(format!(
            "re-sealing the secrets failed; the new key {} stays in {} in case the change was committed after all: `plumb secrets list` shows which key the secrets are sealed with. Delete that file only if it is not the new key",
            new.fingerprint(),
            staged.display()
        )));
    }
    if from_env {
        if global.json {
            println!(
                "{}",
                json!({ "result": "rekeyed", "secrets": resealed.len(), "key_id": new.fingerprint(), "new_key_file": staged })
            );
        } else {
            println!(
                "rekeyed {} secret(s): the new key {} is in {} (mode 0600). Set {} to its contents before the next start, then delete the file; the old key {} is retired.",
                resealed.len(),
                new.fingerprint(),
                staged.display(),
                plumb_vault::MASTER_KEY_ENV,
                old.fingerprint()
            );
        }
    } else {
        std::fs::rename(&staged, &file).with_context(|| {
            format!(
                "moving the new key into place; it is in {}",
                staged.display()
            )
        })?;
        if global.json {
            println!(
                "{}",
                json!({ "result": "rekeyed", "secrets": resealed.len(), "key_id": new.fingerprint() })
            );
        } else {
            println!(
                "rekeyed {} secret(s): new key {} in {} (old key {} retired); restart or SIGHUP running servers",
                resealed.len(),
                new.fingerprint(),
                file.display(),
                old.fingerprint()
            );
        }
    }
    Ok(Exit::Success)
}

fn write_key_file(path: &Path, key: &MasterKey) -> anyhow::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut f = options
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    let mut text = key.to_base64();
    text.push('\n');
    std::io::Write::write_all(&mut f, text.as_bytes())?;
    f.sync_all()?;
    // The file's name must be durable too, not only its contents.
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
        && let Ok(d) = std::fs::File::open(dir)
    {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Creates an API token (only its hash is stored) and returns it, or
/// `None` when the name is taken.
pub async fn create_token(
    store: &dyn Store,
    name: &str,
    role: plumb_store::Role,
    actor: &str,
) -> anyhow::Result<Option<Zeroizing<String>>> {
    let token = plumb_vault::new_api_token();
    let record = ApiToken {
        id: plumb_vault::token_hash(&plumb_vault::new_api_token())[..32].to_owned(),
        name: name.to_owned(),
        role,
        created_at: plumb_store::now_ms(),
        revoked_at: None,
    };
    let created = store
        .create_token(&record, &plumb_vault::token_hash(&token), actor)
        .await?;
    Ok(created.then_some(token))
}

/// `plumb tokens …`.
pub async fn tokens(global: &Global, command: TokensCommand) -> anyhow::Result<Exit> {
    let (_, store) = open(global).await?;
    let actor = super::cli_actor();
    let exit = match command {
        TokensCommand::Create { name, role } => {
            let role: plumb_store::Role = role.into();
            let Some(token) = create_token(store.as_ref(), &name, role, &actor).await? else {
                return Err(UsageError(format!(
                    "a token named `{name}` exists; revoke it or choose another name"
                ))
                .into());
            };
            if global.json {
                println!(
                    "{}",
                    json!({ "name": name, "role": role, "token": token.as_str() })
                );
            } else {
                println!("{}", token.as_str());
                eprintln!(
                    "token `{name}` ({}) created. It is shown this once; only its hash is kept.",
                    role.as_str()
                );
            }
            Exit::Success
        }
        TokensCommand::List => {
            let list = store.list_tokens().await?;
            if global.json {
                println!("{}", serde_json::to_string(&list)?);
            } else if list.is_empty() {
                println!(
                    "no tokens; create one with `plumb tokens create --name NAME --role viewer|operator|admin`"
                );
            } else {
                for t in &list {
                    println!(
                        "{:<20} {:<9} created {}{}",
                        t.name,
                        t.role.as_str(),
                        timestamp(t.created_at),
                        t.revoked_at
                            .map(|r| format!(", revoked {}", timestamp(r)))
                            .unwrap_or_default()
                    );
                }
            }
            Exit::Success
        }
        TokensCommand::Revoke { name } => {
            if !store.revoke_token(&name, &actor).await? {
                return Err(UsageError(format!("no active token named `{name}`")).into());
            }
            if global.json {
                println!("{}", json!({ "name": name, "result": "revoked" }));
            } else {
                println!("token {name} revoked");
            }
            Exit::Success
        }
    };
    store.close().await;
    Ok(exit)
}

/// `plumb audit …`.
pub async fn audit(global: &Global, command: AuditCommand) -> anyhow::Result<Exit> {
    let (_, store) = open(global).await?;
    let exit = match command {
        AuditCommand::List { after, limit } => {
            let entries = store.audit_entries(after, limit).await?;
            if global.json {
                println!("{}", serde_json::to_string(&entries)?);
            } else if entries.is_empty() {
                println!("the audit log is empty");
            } else {
                for e in &entries {
                    println!(
                        "{:>5}  {}  {:<18} {:<20} {}  {}",
                        e.seq,
                        timestamp(e.at),
                        e.action,
                        e.subject,
                        e.actor,
                        plumb_store::audit::canonical_json(&e.details)
                    );
                }
            }
            Exit::Success
        }
        AuditCommand::Verify { anchors } => {
            let anchors = anchors
                .iter()
                .map(|a| plumb_engine::ops::parse_anchor(a))
                .collect::<Result<Vec<_>, _>>()
                .map_err(UsageError)?;
            match plumb_engine::ops::verify_audit(store.as_ref(), &anchors).await? {
                Ok(v) => {
                    if global.json {
                        println!(
                            "{}",
                            json!({ "ok": true, "entries": v.entries, "head": v.head, "anchor": format!("{}:{}", v.head_seq, v.head) })
                        );
                    } else {
                        println!(
                            "audit log intact: {} entries; keep this anchor outside the store and pass it to a later verify with --anchor:\n{}:{}",
                            v.entries, v.head_seq, v.head
                        );
                    }
                    Exit::Success
                }
                Err(problem) => {
                    if global.json {
                        println!(
                            "{}",
                            json!({ "ok": false, "problem": problem, "message": problem.to_string() })
                        );
                    } else {
                        eprintln!("audit log broken: {problem}");
                    }
                    Exit::Failure
                }
            }
        }
    };
    store.close().await;
    Ok(exit)
}
