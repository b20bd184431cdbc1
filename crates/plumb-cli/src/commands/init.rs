//! `plumb init`: scaffold a project that passes `plumb check` and runs
//! offline.

use std::path::Path;

use anyhow::Context;
use serde_json::json;

use crate::cli::{Example, Global};
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

const SYNC_PLUMB_YAML: &str = r#"# plumb project settings. See the README for every field.
store: sqlite://plumb.db
listen: 127.0.0.1:8080

# Both ends of the sync are served by `plumb mock-api` (see SYNC.md); point
# them at the real systems when you are ready, with `auth:` from secrets.
connections:
  crm:
    http: { base_url: "http://127.0.0.1:8090", timeout: 10s }
  warehouse:
    http: { base_url: "http://127.0.0.1:8090", timeout: 10s }

defaults:
  retry: { attempts: 5, backoff: exponential, initial: 1s, max: 1m, jitter: true }
  timeout: 30s
"#;

const SYNC_WORKFLOW: &str = r#"name: contacts-sync
owner: you@example.com
description: |
  Every 15 seconds, copies the CRM contacts changed since the last successful
  run into the warehouse. The cursor (the newest `updated_at` copied) moves
  only when a run succeeds, in the same transaction: a failed run leaves it,
  and the next run reads the same window again. See SYNC.md.
trigger:
  schedule: { cron: "*/15 * * * * *" }
cursor: "${{ [.steps.fetch.pages[].body.items[].updated_at] | max }}"
steps:
  - id: fetch
    http:
      connection: crm
      path: /contacts
      query:
        updated_since: '${{ .cursor // "1970-01-01T00:00:00Z" }}'
        limit: 100
      paginate:
        next: "${{ .response.body.next_page }}"
        max_pages: 1000
      expect: { status: [200], schema: schemas/contacts-page.json }

  - id: shape
    jq: '[.steps.fetch.pages[].body.items[] | {id, email: (.email | ascii_downcase), name, updated_at}]'

  - id: changed
    if: "${{ (.steps.shape | length) > 0 }}"
    then:
      - id: load
        http:
          connection: warehouse
          method: POST
          path: /warehouse/contacts
          body: "${{ .steps.shape }}"
"#;

const SYNC_SCHEMA: &str = r#"{
  "$schema": "https://json-schema.org/draft/2020-12/schema",
  "title": "A page of CRM contacts",
  "type": "object",
  "required": ["items", "next_page"],
  "properties": {
    "items": {
      "type": "array",
      "items": {
        "type": "object",
        "required": ["id", "email", "updated_at"],
        "properties": {
          "id": { "type": "string" },
          "email": { "type": "string" },
          "name": { "type": "string" },
          "updated_at": { "type": "string" }
        }
      }
    },
    "next_page": { "type": ["string", "null"] }
  }
}
"#;

const SYNC_README: &str = r#"# An incremental sync

`workflows/contacts-sync.yaml` copies contacts changed in a CRM into a
warehouse every 15 seconds, page by page, with a cursor. Both ends are a
mock that plumb serves itself, so you can watch it work:

```sh
plumb mock-api &          # the CRM and warehouse on 127.0.0.1:8090: 250 contacts, one more every 5 s
plumb check
plumb serve               # fires the schedule; Ctrl-C to stop
```

In another terminal:

```sh
plumb cursor show contacts-sync       # the newest updated_at copied so far
plumb runs list --workflow contacts-sync
curl -s 127.0.0.1:8090/warehouse/stats
#  {"crm_contacts":…,"warehouse_contacts":…,"deliveries":…,"duplicates_refused":0,"in_sync":true}
```

What to try:

* Kill `plumb serve` with `kill -9` in the middle of a run and start it
  again: the run resumes at the page it was on; the warehouse gets each
  change once (its `Idempotency-Key` dedupes a batch re-sent after a crash).
* Stop `plumb mock-api` for a minute: the runs fail (dead letters, and an
  alert if you add `alerts: { on_failure: [...] }`), the cursor stays where
  it was, and the first run after it is back copies everything it missed.
* `plumb cursor set contacts-sync 1970-01-01T00:00:00Z` re-reads
  everything (audited); `plumb cursor reset contacts-sync` too.

The mock's API: `GET /contacts?updated_since=RFC3339&limit=N` answers
`{"items": [{id, email, name, updated_at}], "next_page": "/contacts?…"}`
(keyset pagination: `next_page` is null on the last page);
`POST /warehouse/contacts` upserts a list by `id`; `GET /warehouse/stats`.
"#;

const INPUT_JSON: &str = "{\"names\": [\"ada\", \"grace\", \"linus\"]}\n";

// `.plumb/` holds the master key: it must never be committed.
const GITIGNORE: &str = "plumb.db\nplumb.db-wal\nplumb.db-shm\n.plumb/\n";

/// Creates the project files; refuses to overwrite an existing project.
pub fn run(global: &Global, dir: Option<&Path>, example: Example) -> anyhow::Result<Exit> {
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
    for sub in ["workflows", "schemas"] {
        std::fs::create_dir_all(root.join(sub))
            .with_context(|| format!("creating {}", root.join(sub).display()))?;
    }
    let files: &[(&str, &str)] = match example {
        Example::Hello => &[
            ("plumb.yaml", PLUMB_YAML),
            ("workflows/hello.yaml", HELLO_YAML),
            ("input.json", INPUT_JSON),
            (".gitignore", GITIGNORE),
        ],
        Example::Sync => &[
            ("plumb.yaml", SYNC_PLUMB_YAML),
            ("workflows/contacts-sync.yaml", SYNC_WORKFLOW),
            ("schemas/contacts-page.json", SYNC_SCHEMA),
            ("SYNC.md", SYNC_README),
            (".gitignore", GITIGNORE),
        ],
    };
    let mut created = Vec::new();
    for &(name, text) in files {
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
        match example {
            Example::Hello => println!(
                "\nnext:\n  {cd}plumb check\n  {cd}plumb run hello --input input.json\n  {cd}plumb runs list"
            ),
            Example::Sync => println!(
                "\nnext (see SYNC.md):\n  {cd}plumb mock-api &\n  {cd}plumb check\n  {cd}plumb serve"
            ),
        }
    }
    Ok(Exit::Success)
}
