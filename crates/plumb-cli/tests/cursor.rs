//! SPEC G7 with the real binary: a workflow's `cursor` moves only with a
//! run's success, in the same transaction; a failed run leaves it, so the
//! next run reads the same window again; a dead letter replayed after newer
//! runs succeeded does not move it back, and says so; operators can show,
//! set and reset it (audited).

mod support;

use serde_json::Value;
use support::{Project, Receiver, page_of};

/// Reads every record since the cursor (a watermark: the next id to read),
/// hands them to the sink named by the input (default `/ok/sink`), and
/// moves the cursor past the last record read.
const SYNC: &str = r#"name: sync
owner: qa@example.com
description: copies new records since the last successful run
cursor: '${{ [.steps.fetch.pages[].body.items[].id] | max | if . == null then null else . + 1 end }}'
steps:
  - id: fetch
    http:
      connection: rx
      path: /pages/number
      query:
        page: 1
        since: '${{ .cursor // 0 }}'
        total: '${{ .trigger.body.total // 250 }}'
      paginate:
        next: '${{ if (.response.body.items | length) < 100 then null else {query: {page: (.page + 1)}} end }}'
  - id: send
    http:
      connection: rx
      method: POST
      path: '${{ .trigger.body.sink // "/ok/sink" }}'
      body: { records: '${{ [.steps.fetch.pages[].body.items[].id] }}' }
"#;

async fn cursor_of(project: &Project) -> Value {
    let out = project.run(&["cursor", "show", "sync", "--json"]).await;
    assert_eq!(out.code, Some(0), "{out}");
    serde_json::from_str(&out.stdout).expect("cursor show --json")
}

/// The `since` of each page request the mock got after the first `mark`
/// requests, in order. (The receiver is never cleared: it counts requests
/// per idempotency key, and the replayed run's key must find its first.)
fn since_of_pages(rx: &Receiver, mark: usize) -> Vec<String> {
    rx.hits()[mark..]
        .iter()
        .filter(|h| h.path == "/pages/number")
        .map(|h| {
            assert!(page_of("number", &h.query).is_some());
            h.query.get("since").cloned().unwrap_or_default()
        })
        .collect()
}

async fn run_with(project: &Project, input: &str) -> support::Output {
    let file = project.path().join("input.json");
    std::fs::write(&file, input).expect("write input");
    project
        .run(&["run", "sync", "--input", file.to_str().expect("utf-8 path")])
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cursor_moves_only_with_success_and_never_back() {
    let rx = Receiver::start().await;
    let project = Project::with_receiver(&rx.base_url);
    project.workflow("sync", SYNC);
    let check = project.run(&["check"]).await;
    assert_eq!(check.code, Some(0), "{check}");
    assert_eq!(cursor_of(&project).await["version"], 0);

    // A run that fails after fetching (the sink refuses it once) leaves
    // the cursor where it was.
    let failed = run_with(&project, r#"{"sink": "/flaky/400/1"}"#).await;
    assert_ne!(failed.code, Some(0), "{failed}");
    let failed_id = support::run_id_of(&failed.stdout);
    let cursor = cursor_of(&project).await;
    assert_eq!(
        (cursor["value"].clone(), cursor["version"].clone()),
        (Value::Null, 0.into())
    );

    // The next run reads the same window again, from the start.
    let mark = rx.hits().len();
    let ok = run_with(&project, "{}").await;
    assert_eq!(ok.code, Some(0), "{ok}");
    assert_eq!(since_of_pages(&rx, mark), ["0", "0", "0"]);
    let cursor = cursor_of(&project).await;
    assert_eq!(
        (cursor["value"].clone(), cursor["version"].clone()),
        (250.into(), 1.into())
    );

    // New records appear; the next run reads only those.
    let mark = rx.hits().len();
    let more = run_with(&project, r#"{"total": 300}"#).await;
    assert_eq!(more.code, Some(0), "{more}");
    assert_eq!(since_of_pages(&rx, mark), ["250"]);
    let sink: Vec<Value> = rx.hits()[mark..]
        .iter()
        .filter(|h| h.path == "/ok/sink")
        .map(|h| h.body["records"].clone())
        .collect();
    assert_eq!(sink.len(), 1);
    assert_eq!(sink[0].as_array().map(Vec::len), Some(50));
    assert_eq!(cursor_of(&project).await["value"], 300);

    // The old failed run, replayed now, succeeds — and leaves the cursor.
    let replay = project.run(&["dlq", "replay", &failed_id]).await;
    assert_eq!(replay.code, Some(0), "{replay}");
    let resumed = project.run(&["run", "--resume", &failed_id]).await;
    assert_eq!(resumed.code, Some(0), "{resumed}");
    let cursor = cursor_of(&project).await;
    assert_eq!(
        (cursor["value"].clone(), cursor["version"].clone()),
        (300.into(), 2.into())
    );
    let shown = project.show(&failed_id).await;
    assert_eq!(shown["run"]["status"], "succeeded");
    let record = &shown["run"]["cursor"];
    assert_eq!(record["moved"], false, "{shown}");
    assert!(
        record["note"]
            .as_str()
            .is_some_and(|n| n.contains("moved on since this run started")),
        "{record}"
    );

    // Status and the CLI show it; an operator sets and resets it, audited.
    let status = project.run(&["status", "--json"]).await;
    let status: Value = serde_json::from_str(&status.stdout).expect("status --json");
    let sync = status["workflows"]
        .as_array()
        .and_then(|w| w.iter().find(|w| w["name"] == "sync"))
        .cloned()
        .expect("sync in status");
    assert_eq!(sync["cursor"]["value"], 300);
    let set = project.run(&["cursor", "set", "sync", "120"]).await;
    assert_eq!(set.code, Some(0), "{set}");
    assert_eq!(cursor_of(&project).await["value"], 120);
    let mark = rx.hits().len();
    let after_set = run_with(&project, r#"{"total": 300}"#).await;
    assert_eq!(after_set.code, Some(0), "{after_set}");
    assert_eq!(since_of_pages(&rx, mark), ["120", "120"]);
    let reset = project.run(&["cursor", "reset", "sync"]).await;
    assert_eq!(reset.code, Some(0), "{reset}");
    assert_eq!(cursor_of(&project).await["value"], Value::Null);
    let audit = project.run(&["audit", "list", "--json"]).await;
    assert!(
        audit.stdout.contains("cursor.set") && audit.stdout.contains("cursor.reset"),
        "{audit}"
    );
}

#[tokio::test]
async fn a_cursor_is_checked_when_the_project_loads() {
    let project = Project::with_receiver("http://127.0.0.1:9");
    project.workflow(
        "bad",
        "name: bad\nowner: qa@example.com\ndescription: d\nconcurrency: 4\ncursor: '${{ .steps.fech.body.last }}'\nsteps:\n  - id: fetch\n    http: { connection: rx, path: /x }\n",
    );
    let out = project.run(&["check"]).await;
    assert_eq!(out.code, Some(1), "{out}");
    for expected in [
        "workflows/bad.yaml:4:14: error: `concurrency` is 4, but a workflow with a `cursor` runs one run at a time",
        "error: `cursor` reads `.steps.fech`, but no step has the id `fech`",
        "did you mean `.steps.fetch`?",
    ] {
        assert!(out.stderr.contains(expected), "{expected}\n{out}");
    }
    // A cursor is a watermark: a huge one fails the run and is not kept.
    project.workflow(
        "bad",
        "name: bad\nowner: qa@example.com\ndescription: d\ncursor: '${{ [range(0; 20000)] }}'\nsteps:\n  - id: fetch\n    jq: '1'\n",
    );
    let huge = project.run(&["run", "bad"]).await;
    assert_ne!(huge.code, Some(0), "{huge}");
    assert!(
        huge.stdout.contains("more than a cursor may hold (64 KiB)"),
        "{huge}"
    );
    let shown = project.run(&["cursor", "show", "bad", "--json"]).await;
    assert!(shown.stdout.contains("\"version\":0"), "{shown}");
    let set = project.run(&["cursor", "set", "nope", "1"]).await;
    assert_eq!(set.code, Some(2), "{set}");
    assert!(set.stderr.contains("no workflow named `nope`"), "{set}");
}

/// `plumb init --example sync` scaffolds a sync that works against
/// `plumb mock-api` as its SYNC.md says: the first run copies every
/// contact, the next only what changed, and the warehouse ends in sync.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sync_example_runs_against_the_mock_api() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("sync");
    let init = tokio::process::Command::new(support::plumb_bin())
        .args(["init", root.to_str().expect("utf-8"), "--example", "sync"])
        .output()
        .await
        .expect("init");
    assert!(init.status.success(), "{init:?}");
    let port = support::free_port();
    let yaml = std::fs::read_to_string(root.join("plumb.yaml")).expect("plumb.yaml");
    std::fs::write(
        root.join("plumb.yaml"),
        yaml.replace("127.0.0.1:8090", &format!("127.0.0.1:{port}")),
    )
    .expect("write");
    let mut mock = tokio::process::Command::new(support::plumb_bin())
        .args([
            "mock-api",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--records",
            "230",
            "--every",
            "3600",
        ])
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("mock-api");
    let stats = format!("http://127.0.0.1:{port}/warehouse/stats");
    let mut up = false;
    for _ in 0..100 {
        if support::try_get_json(&stats).await.is_some() {
            up = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(up, "plumb mock-api answers");
    let plumb = |args: &'static [&'static str]| {
        let root = root.clone();
        async move {
            tokio::process::Command::new(support::plumb_bin())
                .arg("--project")
                .arg(&root)
                .args(args)
                .output()
                .await
                .expect("plumb")
        }
    };
    let check = plumb(&["check"]).await;
    assert!(check.status.success(), "{check:?}");
    let first = plumb(&["run", "contacts-sync"]).await;
    assert!(first.status.success(), "{first:?}");
    let after_first = support::get_json(&stats).await;
    assert_eq!(after_first["warehouse_contacts"], 230, "{after_first}");
    assert_eq!(after_first["in_sync"], true, "{after_first}");
    let cursor = plumb(&["cursor", "show", "contacts-sync", "--json"]).await;
    let cursor: Value = serde_json::from_slice(&cursor.stdout).expect("json");
    assert_eq!(cursor["version"], 1, "{cursor}");
    // Nothing changed: the next run copies nothing, and the cursor stays.
    let second = plumb(&["run", "contacts-sync"]).await;
    assert!(second.status.success(), "{second:?}");
    let after_second = support::get_json(&stats).await;
    assert_eq!(after_second["deliveries"], 1, "{after_second}");
    let cursor: Value = serde_json::from_slice(
        &plumb(&["cursor", "show", "contacts-sync", "--json"])
            .await
            .stdout,
    )
    .expect("json");
    assert_eq!(cursor["version"], 1, "{cursor}");
    let _ = mock.start_kill();
}
