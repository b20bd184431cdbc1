//! The `sql` step on PostgreSQL (`PLUMB_TEST_POSTGRES`), with the real
//! binary: values go in only as bind parameters and come back typed;
//! constraint violations fail for good naming the SQLSTATE and the
//! constraint; an expression in `query` and a password in a URL are `check`
//! errors; a URL kept as a secret never shows, even in a driver's error.

#![allow(clippy::print_stderr)] // a skipped test says why

mod support;

use serde_json::{Value, json};
use support::Project;

fn postgres_url() -> Option<String> {
    match std::env::var("PLUMB_TEST_POSTGRES") {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            eprintln!(
                "skipped: set PLUMB_TEST_POSTGRES (e.g. postgres://postgres@127.0.0.1:5432/test) to run the sql step tests"
            );
            None
        }
    }
}

/// The output of step `id` of a finished run.
async fn output(project: &Project, run_id: &str, id: &str) -> Value {
    let shown = project.show(run_id).await;
    shown["steps"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["step_id"] == id && s["item"].is_null()))
        .map(|s| s["output"].clone())
        .unwrap_or(Value::Null)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_go_in_as_parameters_and_come_back_typed() {
    let Some(url) = postgres_url() else { return };
    let table = format!("plumb_sql_{}", std::process::id());
    let project = Project::new(&format!(
        "connections:\n  db:\n    postgres: {{ url: '{url}', pool: 2, timeout: 10s }}\n"
    ));
    project.workflow(
        "types",
        &format!(
            r#"name: types
owner: qa@example.com
description: a typed round trip
steps:
  - id: create
    sql:
      connection: db
      query: DROP TABLE IF EXISTS {table}; 
  - id: table
    sql:
      connection: db
      query: CREATE TABLE {table} (id int PRIMARY KEY, name text, score float8, ok bool, doc jsonb, note text, big int8, amount numeric(12,4), at timestamptz, day date, naive timestamp, uid uuid, raw bytea)
  - id: insert
    sql:
      connection: db
      query: INSERT INTO {table} (id, name, score, ok, doc, note, big, amount, at, day, naive, uid, raw) VALUES ($1, $2, $3, $4, $5, $6, $7, $8::numeric, $9::timestamptz, $10::date, $11::timestamp, $12::uuid, decode($13, 'base64'))
      params: [1, "${{{{ .trigger.body.name }}}}", 1.5, true, '${{{{ {{a: [1, 2], b: "x"}} }}}}', null, 9007199254740993, "1234.5000", "2026-11-30T18:00:00+02:00", "2026-11-30", "2026-11-30T18:00:00.5", "0191e0c4-7c1b-7000-8000-000000000001", "aGVsbG8="]
  - id: select
    sql:
      connection: db
      query: SELECT id, name, score, ok, doc, note, big, amount, at, day, naive, uid, raw FROM {table} WHERE name = $1
      params: ["${{{{ .trigger.body.name }}}}"]
  - id: drop
    sql:
      connection: db
      query: DROP TABLE {table}
"#
        ),
    );
    let check = project.run(&["check"]).await;
    assert_eq!(check.code, Some(0), "{check}");
    let input = project.path().join("input.json");
    std::fs::write(&input, r#"{"name": "ada'); DROP TABLE x; --"}"#).expect("input");
    let out = project
        .run(&["run", "types", "--input", input.to_str().expect("utf-8")])
        .await;
    assert_eq!(out.code, Some(0), "{out}");
    let run_id = support::run_id_of(&out.stdout);
    let insert = output(&project, &run_id, "insert").await;
    assert_eq!(insert["rows_affected"], 1, "{insert}");
    let select = output(&project, &run_id, "select").await;
    assert_eq!(
        select["rows"],
        json!([{
            "id": 1,
            "name": "ada'); DROP TABLE x; --",
            "score": 1.5,
            "ok": true,
            "doc": {"a": [1, 2], "b": "x"},
            "note": null,
            "big": 9_007_199_254_740_993_i64,
            "amount": "1234.5000",
            "at": "2026-11-30T16:00:00Z",
            "day": "2026-11-30",
            "naive": "2026-11-30T18:00:00.500",
            "uid": "0191e0c4-7c1b-7000-8000-000000000001",
            "raw": "aGVsbG8="
        }]),
        "{select}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_constraint_violation_fails_for_good_naming_sqlstate_and_constraint() {
    let Some(url) = postgres_url() else { return };
    let table = format!("plumb_sql_dup_{}", std::process::id());
    let project = Project::new(&format!(
        "connections:\n  db:\n    postgres: {{ url: '{url}' }}\ndefaults:\n  retry: {{ attempts: 3, initial: 100ms, max: 1s }}\n"
    ));
    project.workflow(
        "dup",
        &format!(
            "name: dup\nowner: qa@example.com\ndescription: d\nsteps:\n  - id: t\n    sql: {{ connection: db, query: 'CREATE TABLE IF NOT EXISTS {table} (id int CONSTRAINT {table}_pk PRIMARY KEY)' }}\n  - id: one\n    sql: {{ connection: db, query: 'INSERT INTO {table} VALUES ($1)', params: [7] }}\n  - id: again\n    sql: {{ connection: db, query: 'INSERT INTO {table} VALUES ($1)', params: [7] }}\n"
        ),
    );
    let out = project.run(&["run", "dup"]).await;
    let cleanup = Project::new(&format!(
        "connections:\n  db:\n    postgres: {{ url: '{url}' }}\n"
    ));
    cleanup.workflow(
        "drop",
        &format!("name: drop\nowner: qa@example.com\ndescription: d\nsteps:\n  - id: d\n    sql: {{ connection: db, query: 'DROP TABLE IF EXISTS {table}' }}\n"),
    );
    let dropped = cleanup.run(&["run", "drop"]).await;
    assert_eq!(dropped.code, Some(0), "{dropped}");
    assert_ne!(out.code, Some(0), "{out}");
    assert!(out.stdout.contains("SQLSTATE 23505"), "{out}");
    assert!(
        out.stdout.contains(&format!("constraint `{table}_pk`")),
        "{out}"
    );
    assert!(out.stdout.contains("1 attempt"), "not retried: {out}");
}

#[tokio::test]
async fn check_refuses_expressions_in_sql_and_passwords_in_urls() {
    let project = Project::new(
        "connections:\n  db:\n    postgres: { url: 'postgres://app:hunter2@db.example:5432/wh' }\n  ok:\n    postgres: { url: 'postgres://app@db.example:5432/wh', password: { secret: wh_pw } }\n  eo:\n    postgres: { url: 'postgres://app@db.example:5432/wh', exactly_once: true, effects_table: 'x; DROP TABLE y' }\n",
    );
    project.workflow(
        "bad",
        "name: bad\nowner: qa@example.com\ndescription: d\nsteps:\n  - id: q\n    sql:\n      connection: ok\n      query: \"SELECT * FROM t WHERE id = '${{ .trigger.body.id }}'\"\n",
    );
    let out = project.run(&["check"]).await;
    assert_eq!(out.code, Some(1), "{out}");
    for expected in [
        "the URL holds a password",
        "`query` holds an expression: values reach the database only as bind parameters",
        "use params",
        "`x; DROP TABLE y` is not a table name",
    ] {
        assert!(out.stderr.contains(expected), "{expected}\n{out}");
    }
    assert!(
        !out.stderr.contains("hunter2"),
        "the password is never echoed: {out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_url_kept_as_a_secret_never_shows_even_in_a_driver_error() {
    let Some(url) = postgres_url() else { return };
    let canary = "canary-pw-5f3a9";
    let mut parsed = url::Url::parse(&url).expect("url");
    parsed.set_password(Some(canary)).expect("password");
    parsed.set_path("/plumb_no_such_database");
    let project = Project::new(
        "connections:\n  db:\n    postgres: { url: { secret: db_url }, timeout: 5s }\ndefaults:\n  retry: { attempts: 1 }\n",
    );
    let set = project.set_secret("db_url", parsed.as_str()).await;
    assert_eq!(set.code, Some(0), "{set}");
    project.workflow(
        "nodb",
        "name: nodb\nowner: qa@example.com\ndescription: d\nsteps:\n  - id: q\n    sql: { connection: db, query: 'SELECT 1 AS one' }\n",
    );
    let out = project.run(&["run", "nodb"]).await;
    assert_ne!(out.code, Some(0), "{out}");
    assert!(
        out.stdout.contains("plumb_no_such_database") || out.stdout.contains("3D000"),
        "{out}"
    );
    let run_id = support::run_id_of(&out.stdout);
    let shown = project.run(&["runs", "show", &run_id, "--json"]).await;
    for text in [&out.stdout, &out.stderr, &shown.stdout] {
        assert!(!text.contains(canary), "the password leaked: {text}");
    }
    let store = std::fs::read(project.store_file()).expect("store");
    let wal = std::fs::read(project.path().join("plumb.db-wal")).unwrap_or_default();
    for bytes in [&store, &wal] {
        assert!(
            !bytes.windows(canary.len()).any(|w| w == canary.as_bytes()),
            "the password is in the store"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_commits_all_its_elements_or_none_naming_the_bad_one() {
    let Some(url) = postgres_url() else { return };
    let table = format!("plumb_sql_batch_{}", std::process::id());
    let project = Project::new(&format!(
        "connections:\n  db:\n    postgres: {{ url: '{url}' }}\ndefaults:\n  retry: {{ attempts: 2, initial: 100ms, max: 1s }}\n"
    ));
    let workflow = |name: &str, bad: &str| {
        format!(
            "name: {name}\nowner: qa@example.com\ndescription: d\nsteps:\n  - id: t\n    sql: {{ connection: db, query: 'CREATE TABLE IF NOT EXISTS {table} (id int CONSTRAINT {table}_pk PRIMARY KEY, email text NOT NULL)' }}\n  - id: rows\n    jq: '[range(0; 1000) | {{id: ., email: \"u\\(.)@x\"}}]{bad}'\n  - id: load\n    sql:\n      connection: db\n      query: INSERT INTO {table} (id, email) VALUES ($1, $2)\n      batch: '${{{{ .steps.rows }}}}'\n      params: ['${{{{ .id }}}}', '${{{{ .email }}}}']\n  - id: count\n    sql: {{ connection: db, query: 'SELECT count(*)::int AS n FROM {table}' }}\n"
        )
    };
    // Element 500 repeats id 499: the whole batch fails, nothing is kept.
    project.workflow("bad", &workflow("bad", " | .[500].id = 499"));
    let out = project.run(&["run", "bad"]).await;
    assert_ne!(out.code, Some(0), "{out}");
    assert!(out.stdout.contains("element 500 of 1000"), "{out}");
    assert!(out.stdout.contains("SQLSTATE 23505"), "{out}");
    assert!(
        out.stdout.contains(&format!("constraint `{table}_pk`")),
        "{out}"
    );
    assert!(
        out.stdout.contains("1 attempt"),
        "a constraint is not retried: {out}"
    );
    project.workflow("good", &workflow("good", ""));
    let out = project.run(&["run", "good"]).await;
    assert_eq!(out.code, Some(0), "{out}");
    let run_id = support::run_id_of(&out.stdout);
    let load = output(&project, &run_id, "load").await;
    assert_eq!(load, json!({"rows_affected": 1000, "elements": 1000}));
    let count = output(&project, &run_id, "count").await;
    assert_eq!(
        count["rows"][0]["n"], 1000,
        "nothing of the failed batch was kept: {count}"
    );
    project.workflow(
        "drop",
        &format!("name: drop\nowner: qa@example.com\ndescription: d\nsteps:\n  - id: d\n    sql: {{ connection: db, query: 'DROP TABLE IF EXISTS {table}' }}\n"),
    );
    let dropped = project.run(&["run", "drop"]).await;
    assert_eq!(dropped.code, Some(0), "{dropped}");
}

/// `exactly_once`: each item inserts a row into a table with no unique key
/// and adds to a balance, in one statement; plumb is SIGKILLed at a random
/// moment and the run resumed, 30 times. The table holds exactly 500 rows
/// and the balance is exact every time: a write whose key is recorded in
/// the target is never made twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_once_writes_survive_sigkill_at_random_points() {
    const ITEMS: i64 = 500;
    const TRIALS: usize = 30;
    let Some(url) = postgres_url() else { return };
    let tag = std::process::id();
    let (events, accounts, effects) = (
        format!("plumb_eo_events_{tag}"),
        format!("plumb_eo_accounts_{tag}"),
        format!("plumb_eo_effects_{tag}"),
    );
    let project = Project::new(&format!(
        "connections:\n  db:\n    postgres: {{ url: '{url}', pool: 4, exactly_once: true, effects_table: {effects} }}\n  plain:\n    postgres: {{ url: '{url}' }}\n"
    ));
    // Set-up and tear-down go through a connection without exactly_once
    // (dropping the effects table cannot be recorded in it).
    let admin = |name: &str, statements: Vec<String>| {
        let mut text = format!("name: {name}\nowner: qa@example.com\ndescription: d\nsteps:\n");
        for (i, q) in statements.iter().enumerate() {
            text.push_str(&format!(
                "  - id: s{i}\n    sql: {{ connection: plain, query: \"{q}\" }}\n"
            ));
        }
        text
    };
    project.workflow(
        "setup",
        &admin(
            "setup",
            vec![
                format!("DROP TABLE IF EXISTS {events}"),
                format!("DROP TABLE IF EXISTS {accounts}"),
                format!("CREATE TABLE {events} (n int8)"),
                format!("CREATE TABLE {accounts} (id int PRIMARY KEY, balance int8 NOT NULL)"),
                format!("INSERT INTO {accounts} VALUES (1, 0)"),
            ],
        ),
    );
    project.workflow(
        "count",
        &format!(
            "name: count\nowner: qa@example.com\ndescription: d\nsteps:\n  - id: c\n    sql: {{ connection: db, query: 'SELECT (SELECT count(*)::int8 FROM {events}) AS rows, (SELECT balance FROM {accounts} WHERE id = 1) AS balance' }}\n"
        ),
    );
    project.workflow(
        "pay",
        &format!(
            "name: pay\nowner: qa@example.com\ndescription: d\nsteps:\n  - id: items\n    jq: '[range(1; {ITEMS} + 1)]'\n  - id: pay\n    for_each: '${{{{ .steps.items }}}}'\n    concurrency: 8\n    sql:\n      connection: db\n      query: WITH e AS (INSERT INTO {events} (n) VALUES ($1)) UPDATE {accounts} SET balance = balance + $1 WHERE id = 1\n      params: ['${{{{ .item }}}}']\n"
        ),
    );
    let expected_balance = ITEMS * (ITEMS + 1) / 2;
    let mut killed_mid_run = 0;
    for trial in 0..TRIALS {
        let setup = project.run(&["run", "setup"]).await;
        assert_eq!(setup.code, Some(0), "{setup}");
        let started = project.start(&["run", "pay"]).await;
        let run_id = started.run_id.clone();
        let mut child = started.child;
        tokio::time::sleep(std::time::Duration::from_millis(rand::random_range(
            20..450,
        )))
        .await;
        let _ = child.start_kill();
        let status = child.wait().await.expect("wait");
        if !status.success() {
            killed_mid_run += 1;
            let resumed = project.run(&["run", "--resume", &run_id]).await;
            assert_eq!(resumed.code, Some(0), "trial {trial}: {resumed}");
        }
        let count = project.run(&["run", "count"]).await;
        assert_eq!(count.code, Some(0), "{count}");
        let c = output(&project, &support::run_id_of(&count.stdout), "c").await;
        assert_eq!(
            (
                c["rows"][0]["rows"].as_i64(),
                c["rows"][0]["balance"].as_i64()
            ),
            (Some(ITEMS), Some(expected_balance)),
            "trial {trial}: {c}"
        );
    }
    eprintln!("{TRIALS} trials, {killed_mid_run} killed mid-run: every write exactly once");
    assert!(
        killed_mid_run >= TRIALS / 2,
        "most kills landed mid-run: {killed_mid_run}"
    );
    project.workflow(
        "drop",
        &admin(
            "drop",
            vec![
                format!("DROP TABLE IF EXISTS {events}"),
                format!("DROP TABLE IF EXISTS {accounts}"),
                format!("DROP TABLE IF EXISTS {effects}"),
            ],
        ),
    );
    let dropped = project.run(&["run", "drop"]).await;
    assert_eq!(dropped.code, Some(0), "{dropped}");
}
