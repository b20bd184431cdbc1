//! The `sql` step on PostgreSQL (`PLUMB_TEST_POSTGRES`), MySQL/MariaDB
//! (`PLUMB_TEST_MYSQL`) and SQLite (always), with the real binary: values
//! go in only as bind parameters and come back typed; constraint violations
//! fail for good naming the code and the constraint; an expression in
//! `query` and a password in a URL are `check` errors; a URL kept as a
//! secret never shows, even in a driver's error; `exactly_once` writes
//! survive SIGKILL exactly once, and without it nothing is lost.

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

/// A database the generic tests run on.
struct Db {
    /// The connection kind (`postgres`, `mysql`, `sqlite`).
    kind: &'static str,
    /// Its URL.
    url: String,
}

impl Db {
    /// The `n`th (1-based) placeholder in this database's dialect.
    fn ph(&self, n: usize) -> String {
        match self.kind {
            "postgres" => format!("${n}"),
            "sqlite" => format!("?{n}"),
            _ => "?".to_owned(),
        }
    }

    /// A `connections:` entry for it.
    fn connection(&self, name: &str, extra: &str) -> String {
        format!(
            "  {name}:\n    {}: {{ url: '{}'{extra} }}\n",
            self.kind, self.url
        )
    }
}

/// SQLite always; PostgreSQL and MySQL when their URLs are set.
fn databases() -> Vec<Db> {
    let mut all = vec![Db {
        kind: "sqlite",
        url: "sqlite://warehouse.db".to_owned(),
    }];
    if let Some(url) = postgres_url() {
        all.push(Db {
            kind: "postgres",
            url,
        });
    }
    match std::env::var("PLUMB_TEST_MYSQL") {
        Ok(url) if !url.is_empty() => all.push(Db { kind: "mysql", url }),
        _ => eprintln!(
            "skipped on MySQL: set PLUMB_TEST_MYSQL (e.g. mysql://root@127.0.0.1:3306/test) to run the sql step tests there"
        ),
    }
    all
}

/// A workflow running `statements` in order on connection `db`.
fn statements(name: &str, statements: &[String]) -> String {
    let mut text = format!("name: {name}\nowner: qa@example.com\ndescription: d\nsteps:\n");
    for (i, q) in statements.iter().enumerate() {
        text.push_str(&format!(
            "  - id: s{i}\n    sql: {{ connection: db, query: \"{q}\" }}\n"
        ));
    }
    text
}

/// `canary` is nowhere a user or the store could see it: the command's
/// output, the run's record, the store's file and WAL.
async fn assert_never_shows(project: &Project, out: &support::Output, canary: &str) {
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
    assert_never_shows(&project, &out, canary).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mysql_values_go_in_as_parameters_and_come_back_typed() {
    let Some(db) = databases().into_iter().find(|d| d.kind == "mysql") else {
        return;
    };
    let table = format!("plumb_sql_{}", std::process::id());
    let project = Project::new(&format!(
        "connections:\n{}",
        db.connection("db", ", pool: 2")
    ));
    project.workflow(
        "types",
        &format!(
            r#"name: types
owner: qa@example.com
description: a typed round trip
steps:
  - id: clean
    sql:
      connection: db
      query: DROP TABLE IF EXISTS {table}
  - id: create
    sql:
      connection: db
      query: CREATE TABLE {table} (id int PRIMARY KEY, name varchar(100), score double, ok boolean, doc json, note text, big bigint, amount decimal(12,4), at timestamp(3) NULL, day date, naive datetime(3), raw blob, u bigint unsigned)
  - id: insert
    sql:
      connection: db
      query: INSERT INTO {table} VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, FROM_BASE64(?), ?)
      params: [1, "${{{{ .trigger.body.name }}}}", 1.5, true, '${{{{ {{a: [1, 2], b: "x"}} }}}}', null, 9007199254740993, "1234.5000", "2026-11-30 16:00:00", "2026-11-30", "2026-11-30 18:00:00.5", "aGVsbG8=", 4294967296]
  - id: select
    sql:
      connection: db
      query: SELECT * FROM {table} WHERE name = ?
      params: ["${{{{ .trigger.body.name }}}}"]
  - id: drop
    sql:
      connection: db
      query: DROP TABLE {table}
"#
        ),
    );
    let input = project.path().join("input.json");
    std::fs::write(&input, r#"{"name": "ada'); DROP TABLE x; --"}"#).expect("input");
    let out = project
        .run(&["run", "types", "--input", input.to_str().expect("utf-8")])
        .await;
    assert_eq!(out.code, Some(0), "{out}");
    let run_id = support::run_id_of(&out.stdout);
    let mut row = output(&project, &run_id, "select").await["rows"][0].clone();
    // MySQL says a JSON column is JSON; MariaDB stores JSON as text and
    // says text, so it reads as the string written.
    let doc = row["doc"].take();
    let doc = match doc {
        Value::String(text) => serde_json::from_str(&text).expect("json text"),
        other => other,
    };
    assert_eq!(doc, json!({"a": [1, 2], "b": "x"}));
    assert_eq!(
        row,
        json!({
            "id": 1,
            "name": "ada'); DROP TABLE x; --",
            "score": 1.5,
            "ok": true,
            "doc": null,
            "note": null,
            "big": 9_007_199_254_740_993_i64,
            "amount": "1234.5000",
            "at": "2026-11-30T16:00:00Z",
            "day": "2026-11-30",
            "naive": "2026-11-30T18:00:00.500",
            "raw": "aGVsbG8=",
            "u": 4_294_967_296_u64
        }),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_values_go_in_as_parameters_and_come_back_typed() {
    let project =
        Project::new("connections:\n  db:\n    sqlite: { url: 'sqlite://warehouse.db' }\n");
    project.workflow(
        "types",
        r#"name: types
owner: qa@example.com
description: a typed round trip
steps:
  - id: create
    sql:
      connection: db
      query: CREATE TABLE t (id INTEGER PRIMARY KEY, name TEXT, score REAL, ok BOOLEAN, doc JSON, note TEXT, big INTEGER, amount TEXT, at TEXT, raw BLOB)
  - id: insert
    sql:
      connection: db
      query: INSERT INTO t VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, unhex(?10))
      params: [1, "${{ .trigger.body.name }}", 1.5, true, '${{ {a: [1, 2], b: "x"} }}', null, 9007199254740993, "1234.5000", "2026-11-30T16:00:00Z", "68656c6c6f"]
  - id: select
    sql:
      connection: db
      query: SELECT * FROM t WHERE name = ?1
      params: ["${{ .trigger.body.name }}"]
"#,
    );
    let input = project.path().join("input.json");
    std::fs::write(&input, r#"{"name": "ada'); DROP TABLE x; --"}"#).expect("input");
    let out = project
        .run(&["run", "types", "--input", input.to_str().expect("utf-8")])
        .await;
    assert_eq!(out.code, Some(0), "{out}");
    let run_id = support::run_id_of(&out.stdout);
    assert_eq!(
        output(&project, &run_id, "insert").await["rows_affected"],
        1
    );
    assert_eq!(
        output(&project, &run_id, "select").await["rows"],
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
            "raw": "aGVsbG8="
        }]),
    );
    assert!(
        project.path().join("warehouse.db").exists(),
        "the file is relative to the project"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_commits_all_its_elements_or_none_naming_the_bad_one() {
    for db in databases() {
        batch_all_or_nothing(&db).await;
    }
}

async fn batch_all_or_nothing(db: &Db) {
    let table = format!("plumb_sql_batch_{}", std::process::id());
    let project = Project::new(&format!(
        "connections:\n{}defaults:\n  retry: {{ attempts: 2, initial: 100ms, max: 1s }}\n",
        db.connection("db", "")
    ));
    let (p1, p2) = (db.ph(1), db.ph(2));
    // MySQL names every primary key PRIMARY.
    let pk = if db.kind == "mysql" {
        "PRIMARY KEY".to_owned()
    } else {
        format!("CONSTRAINT {table}_pk PRIMARY KEY")
    };
    let workflow = |name: &str, bad: &str| {
        format!(
            "name: {name}\nowner: qa@example.com\ndescription: d\nsteps:\n  - id: t\n    sql: {{ connection: db, query: 'CREATE TABLE IF NOT EXISTS {table} (id int {pk}, email varchar(50) NOT NULL)' }}\n  - id: rows\n    jq: '[range(0; 1000) | {{id: ., email: \"u\\(.)@x\"}}]{bad}'\n  - id: load\n    sql:\n      connection: db\n      query: INSERT INTO {table} (id, email) VALUES ({p1}, {p2})\n      batch: '${{{{ .steps.rows }}}}'\n      params: ['${{{{ .id }}}}', '${{{{ .email }}}}']\n  - id: count\n    sql: {{ connection: db, query: 'SELECT count(*) AS n FROM {table}' }}\n"
        )
    };
    // Element 500 repeats id 499: the whole batch fails, nothing is kept.
    project.workflow("bad", &workflow("bad", " | .[500].id = 499"));
    let out = project.run(&["run", "bad"]).await;
    let kind = db.kind;
    assert_ne!(out.code, Some(0), "{kind}: {out}");
    assert!(out.stdout.contains("element 500 of 1000"), "{kind}: {out}");
    let (code, constraint) = match kind {
        "postgres" => (
            "SQLSTATE 23505".to_owned(),
            format!("constraint `{table}_pk`"),
        ),
        "mysql" => ("error 1062".to_owned(), "for key 'PRIMARY'".to_owned()),
        _ => (
            "ConstraintViolation".to_owned(),
            format!("UNIQUE constraint failed: {table}.id"),
        ),
    };
    assert!(out.stdout.contains(&code), "{kind}: {out}");
    assert!(out.stdout.contains(&constraint), "{kind}: {out}");
    assert!(
        out.stdout.contains("1 attempt"),
        "{kind}: a constraint is not retried: {out}"
    );
    project.workflow("good", &workflow("good", ""));
    let out = project.run(&["run", "good"]).await;
    assert_eq!(out.code, Some(0), "{kind}: {out}");
    let run_id = support::run_id_of(&out.stdout);
    let load = output(&project, &run_id, "load").await;
    assert_eq!(
        load,
        json!({"rows_affected": 1000, "elements": 1000}),
        "{kind}"
    );
    let count = output(&project, &run_id, "count").await;
    assert_eq!(
        count["rows"][0]["n"], 1000,
        "{kind}: nothing of the failed batch was kept: {count}"
    );
    project.workflow(
        "drop",
        &statements("drop", &[format!("DROP TABLE IF EXISTS {table}")]),
    );
    let dropped = project.run(&["run", "drop"]).await;
    assert_eq!(dropped.code, Some(0), "{kind}: {dropped}");
}

/// `exactly_once`: each of 500 items inserts a row into a table with no
/// unique key, then each adds its number to a balance; plumb is SIGKILLed
/// at a random moment and the run resumed, 30 times per database. The
/// table holds exactly 500 rows and the balance is exact every time: a
/// write whose key is recorded in the target is never made twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_once_writes_survive_sigkill_at_random_points() {
    for db in databases() {
        let (trials, mid_run, rows, balance) = kill_and_resume(&db, true, 30).await;
        assert_eq!(
            (rows, balance),
            (ITEMS, ITEMS * (ITEMS + 1) / 2),
            "{}: every write exactly once",
            db.kind
        );
        eprintln!(
            "{}: {trials} trials, {mid_run} killed mid-run: every write exactly once",
            db.kind
        );
    }
}

/// Without `exactly_once` a SQL write is at-least-once, as the README
/// says: a resumed step may write again, but nothing is ever lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_exactly_once_writes_are_at_least_once() {
    for db in databases() {
        let (_, _, rows, balance) = kill_and_resume(&db, false, 8).await;
        assert!(
            rows >= ITEMS && balance >= ITEMS * (ITEMS + 1) / 2,
            "{}: nothing lost ({rows} rows, balance {balance})",
            db.kind
        );
        eprintln!(
            "{}: without exactly_once, {} rows for {ITEMS} items after the last trial",
            db.kind, rows
        );
    }
}

const ITEMS: i64 = 500;

/// Runs `trials` kill-and-resume trials of the 500-item workflow; returns
/// the trials, how many were killed mid-run, and the rows and balance of
/// the last trial (each trial starts from empty tables and checks its own
/// result when `exactly_once`).
async fn kill_and_resume(db: &Db, exactly_once: bool, trials: usize) -> (usize, usize, i64, i64) {
    // The two tests of this kind run at once in one process: their tables differ.
    let tag = format!("{}_{}", std::process::id(), u8::from(exactly_once));
    let kind = db.kind;
    let (events, accounts, effects) = (
        format!("plumb_eo_events_{tag}"),
        format!("plumb_eo_accounts_{tag}"),
        format!("plumb_eo_effects_{tag}"),
    );
    let eo = if exactly_once {
        format!(", pool: 4, exactly_once: true, effects_table: {effects}")
    } else {
        ", pool: 4".to_owned()
    };
    // Set-up and tear-down go through a connection without exactly_once
    // (dropping the effects table cannot be recorded in it).
    let project = Project::new(&format!(
        "connections:\n{}{}",
        db.connection("w", &eo),
        db.connection("db", "")
    ));
    project.workflow(
        "setup",
        &statements(
            "setup",
            &[
                format!("DROP TABLE IF EXISTS {events}"),
                format!("DROP TABLE IF EXISTS {accounts}"),
                format!("CREATE TABLE {events} (n bigint)"),
                format!("CREATE TABLE {accounts} (id int PRIMARY KEY, balance bigint NOT NULL)"),
                format!("INSERT INTO {accounts} VALUES (1, 0)"),
            ],
        ),
    );
    project.workflow(
        "count",
        &statements(
            "count",
            &[format!(
                "SELECT (SELECT count(*) FROM {events}) AS n_rows, (SELECT balance FROM {accounts} WHERE id = 1) AS bal"
            )],
        ),
    );
    let p1 = db.ph(1);
    project.workflow(
        "pay",
        &format!(
            "name: pay\nowner: qa@example.com\ndescription: d\nsteps:\n  - id: items\n    jq: '[range(1; {ITEMS} + 1)]'\n  - id: record\n    for_each: '${{{{ .steps.items }}}}'\n    concurrency: 8\n    sql:\n      connection: w\n      query: INSERT INTO {events} (n) VALUES ({p1})\n      params: ['${{{{ .item }}}}']\n  - id: pay\n    for_each: '${{{{ .steps.items }}}}'\n    concurrency: 8\n    sql:\n      connection: w\n      query: UPDATE {accounts} SET balance = balance + {p1} WHERE id = 1\n      params: ['${{{{ .item }}}}']\n"
        ),
    );
    let mut killed_mid_run = 0;
    let mut last = (0, 0);
    for trial in 0..trials {
        let setup = project.run(&["run", "setup"]).await;
        assert_eq!(setup.code, Some(0), "{kind}: {setup}");
        let started = project.start(&["run", "pay"]).await;
        let run_id = started.run_id.clone();
        let mut child = started.child;
        tokio::time::sleep(std::time::Duration::from_millis(rand::random_range(
            20..600,
        )))
        .await;
        let _ = child.start_kill();
        let status = child.wait().await.expect("wait");
        if !status.success() {
            killed_mid_run += 1;
            let resumed = project.run(&["run", "--resume", &run_id]).await;
            assert_eq!(resumed.code, Some(0), "{kind} trial {trial}: {resumed}");
        }
        let count = project.run(&["run", "count"]).await;
        assert_eq!(count.code, Some(0), "{kind}: {count}");
        let c = output(&project, &support::run_id_of(&count.stdout), "s0").await;
        last = (
            c["rows"][0]["n_rows"].as_i64().unwrap_or(-1),
            c["rows"][0]["bal"].as_i64().unwrap_or(-1),
        );
        if exactly_once {
            assert_eq!(
                last,
                (ITEMS, ITEMS * (ITEMS + 1) / 2),
                "{kind} trial {trial}: {c}"
            );
        }
    }
    assert!(
        killed_mid_run >= trials / 2,
        "{kind}: most kills landed mid-run: {killed_mid_run}"
    );
    project.workflow(
        "drop",
        &statements(
            "drop",
            &[
                format!("DROP TABLE IF EXISTS {events}"),
                format!("DROP TABLE IF EXISTS {accounts}"),
                format!("DROP TABLE IF EXISTS {effects}"),
            ],
        ),
    );
    let dropped = project.run(&["run", "drop"]).await;
    assert_eq!(dropped.code, Some(0), "{kind}: {dropped}");
    (trials, killed_mid_run, last.0, last.1)
}

/// The retention job deletes `exactly_once` records older than the
/// retention of the workflows using the connection, and keeps younger
/// ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_purges_exactly_once_records_past_the_workflows_retention() {
    for db in databases() {
        let kind = db.kind;
        let effects = format!("plumb_purge_effects_{}", std::process::id());
        let events = format!("plumb_purge_events_{}", std::process::id());
        let listen = format!("127.0.0.1:{}", support::free_port());
        let project = Project::new(&format!(
            "listen: {listen}\nconnections:\n{}{}",
            db.connection(
                "w",
                &format!(", exactly_once: true, effects_table: {effects}")
            ),
            db.connection("db", "")
        ));
        project.workflow(
            "setup",
            &statements(
                "setup",
                &[
                    format!("DROP TABLE IF EXISTS {events}"),
                    format!("DROP TABLE IF EXISTS {effects}"),
                    format!("CREATE TABLE {events} (n bigint)"),
                ],
            ),
        );
        project.workflow(
            "write",
            &format!(
                "name: write\nowner: qa@example.com\ndescription: d\nretention: {{ runs: 30d }}\nsteps:\n  - id: w\n    sql: {{ connection: w, query: 'INSERT INTO {events} VALUES (1)' }}\n"
            ),
        );
        let age = match kind {
            "postgres" => format!("UPDATE {effects} SET committed_at = now() - interval '40 days'"),
            "mysql" => format!("UPDATE {effects} SET committed_at = NOW(6) - INTERVAL 40 DAY"),
            _ => format!(
                "UPDATE {effects} SET committed_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now', '-40 days')"
            ),
        };
        project.workflow("age", &statements("age", &[age]));
        project.workflow(
            "count",
            &statements("count", &[format!("SELECT count(*) AS n FROM {effects}")]),
        );
        for name in ["setup", "write", "write", "age", "write"] {
            let out = project.run(&["run", name]).await;
            assert_eq!(out.code, Some(0), "{kind}: {out}");
        }
        let server = project.serve(&listen).await;
        // The first purge runs 5 s after start.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        let mut left = Value::Null;
        while std::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            let out = project.run(&["run", "count"]).await;
            assert_eq!(out.code, Some(0), "{kind}: {out}");
            left = output(&project, &support::run_id_of(&out.stdout), "s0").await["rows"][0]["n"]
                .clone();
            if left == 1 {
                break;
            }
        }
        server.kill().await;
        assert_eq!(
            left, 1,
            "{kind}: the two old records went, the young one stayed"
        );
        project.workflow(
            "drop",
            &statements(
                "drop",
                &[
                    format!("DROP TABLE IF EXISTS {events}"),
                    format!("DROP TABLE IF EXISTS {effects}"),
                ],
            ),
        );
        let dropped = project.run(&["run", "drop"]).await;
        assert_eq!(dropped.code, Some(0), "{kind}: {dropped}");
    }
}

/// MySQL checks passwords (the machine's PostgreSQL trusts loopback): a
/// wrong password in a URL kept as a secret fails with the server's
/// "access denied", never showing the password, and is not retried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_mysql_password_kept_as_a_secret_never_shows() {
    let Some(db) = databases().into_iter().find(|d| d.kind == "mysql") else {
        return;
    };
    let canary = "canary-pw-7c1e2";
    let mut parsed = url::Url::parse(&db.url).expect("url");
    parsed.set_password(Some(canary)).expect("password");
    let project = Project::new(
        "connections:\n  db:\n    mysql: { url: { secret: db_url }, timeout: 5s }\ndefaults:\n  retry: { attempts: 2, initial: 100ms, max: 1s }\n",
    );
    let set = project.set_secret("db_url", parsed.as_str()).await;
    assert_eq!(set.code, Some(0), "{set}");
    project.workflow(
        "denied",
        "name: denied\nowner: qa@example.com\ndescription: d\nsteps:\n  - id: q\n    sql: { connection: db, query: 'SELECT 1 AS one' }\n",
    );
    let out = project.run(&["run", "denied"]).await;
    assert_ne!(out.code, Some(0), "{out}");
    assert!(
        out.stdout.contains("Access denied") || out.stdout.contains("1045"),
        "{out}"
    );
    assert!(
        out.stdout.contains("1 attempt"),
        "a wrong password is not retried: {out}"
    );
    assert_never_shows(&project, &out, canary).await;
}

/// On SQLite `$N` is a name numbered by first appearance: a statement whose
/// `$2` comes before `$1` would bind the values swapped, so it is refused
/// with the fix; a SQLite connection is a file, never a secret.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_refuses_placeholders_that_would_bind_out_of_order() {
    let project = Project::new("connections:\n  db:\n    sqlite: { url: 'sqlite://w.db' }\n");
    project.workflow(
        "swap",
        "name: swap\nowner: qa@example.com\ndescription: d\nsteps:\n  - id: t\n    sql: { connection: db, query: 'CREATE TABLE t (id INTEGER PRIMARY KEY, a TEXT)' }\n  - id: i\n    sql: { connection: db, query: 'INSERT INTO t (a, id) VALUES ($2, $1)', params: [1, x] }\n",
    );
    let out = project.run(&["run", "swap"]).await;
    assert_ne!(out.code, Some(0), "{out}");
    assert!(out.stdout.contains("write `?N`"), "{out}");
    let bad = Project::new("connections:\n  db:\n    sqlite: { url: { secret: file } }\n");
    let check = bad.run(&["check"]).await;
    assert_eq!(check.code, Some(1), "{check}");
    assert!(
        check
            .stderr
            .contains("a SQLite database is a file, not a secret"),
        "{check}"
    );
}
