//! `plumb init`: scaffold a project that passes `plumb check` and runs
//! offline.

use std::path::Path;

use anyhow::Context;
use serde_json::json;

use crate::cli::Global;
use crate::{Exit, UsageError};

const PLUMB_YAML: &str = r#"# plumb project settings. See the README for every field.
store: sqlite://plumb.db          # runs and their journals live here
listen: 127.0.0.1:8080            # where `plumb serve` listens

# Each connection is the only host its steps may call, for example:
#   orders:
#     http:
#       base_url: https://api.example.com/v1
#       headers: { Accept: application/json }
#       auth: { bearer: { secret: orders_token } }   # plumb secrets set orders_token
#       timeout: 10s
connections: {}

defaults:
  retry: { attempts: 3, backoff: exponential, initial: 1s, max: 1m, jitter: true }
  timeout: 30s
"#;

const HELLO_YAML: &str = r#"name: hello
owner: you@example.com
description: |
  A first workflow: picks names from its input, checks there is at least one,
  greets each of them, waits a moment (durably), then reports.
  Run it with: plumb run hello --input input.json
trigger: manual
steps:
  - id: names
    jq: '.trigger.body.names // ["world"]'

  - id: check
    assert:
      condition: "${{ .steps.names | length > 0 }}"
      message: "no names to greet: pass {\"names\": [\"ada\"]} as input"

  - id: greet
    for_each: "${{ .steps.names }}"
    concurrency: 4
    jq: '"hello, \(.item)!"'

  - id: pause
    sleep: 1s

  - id: many
    if: "${{ (.steps.greet | length) > 1 }}"
    then:
      - id: report_many
        jq: '"greeted \(.steps.greet | length) names"'
    else:
      - id: report_one
        jq: '.steps.greet[0]'
"#;

const INPUT_JSON: &str = "{\"names\": [\"ada\", \"grace\", \"linus\"]}\n";

// `.plumb/` holds the master key: it must never be committed.
const GITIGNORE: &str = "plumb.db\nplumb.db-wal\nplumb.db-shm\n.plumb/\n";

/// Creates the project files; refuses to overwrite an existing project.
pub fn run(global: &Global, dir: Option<&Path>) -> anyhow::Result<Exit> {
    let root = match dir {
        Some(d) => d.to_owned(),
        None => global.project_dir(),
    };
    if root.join("plumb.yaml").exists() {
        return Err(UsageError(format!(
            "{} already holds a plumb.yaml; init only creates new projects",
            root.display()
        ))
        .into());
    }
    std::fs::create_dir_all(root.join("workflows"))
        .with_context(|| format!("creating {}", root.join("workflows").display()))?;
    let files = [
        ("plumb.yaml", PLUMB_YAML),
        ("workflows/hello.yaml", HELLO_YAML),
        ("input.json", INPUT_JSON),
        (".gitignore", GITIGNORE),
    ];
    let mut created = Vec::new();
    for (name, text) in files {
        let path = root.join(name);
        if path.exists() {
            continue;
        }
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        created.push(name.to_owned());
    }
    // The key that seals secrets, outside the store and readable by the
    // owner only; not when the key comes from the environment.
    let key_file = super::master_key_file(&root);
    if std::env::var_os(plumb_vault::MASTER_KEY_ENV).is_none() && !key_file.exists() {
        plumb_vault::MasterKey::create_file(&key_file)?;
        created.push(
            key_file
                .strip_prefix(&root)
                .unwrap_or(&key_file)
                .display()
                .to_string(),
        );
    }
    if global.json {
        println!(
            "{}",
            json!({ "project": root.display().to_string(), "created": created })
        );
    } else {
        println!("created a plumb project in {}:", root.display());
        for name in &created {
            println!("  {name}");
        }
        if created.iter().any(|c| c.ends_with("master.key")) {
            println!(
                "\nthe master key seals your secrets: back it up somewhere safe, outside the project (losing it loses every secret)"
            );
        }
        let cd = if root == Path::new(".") {
            String::new()
        } else {
            format!("cd {} && ", root.display())
        };
        println!(
            "\nnext:\n  {cd}plumb check\n  {cd}plumb run hello --input input.json\n  {cd}plumb runs list"
        );
    }
    Ok(Exit::Success)
}
