//! The command line as a user meets it: init, check, run, runs.

mod support;

use serde_json::Value;
use support::{Project, run_id_of};

#[tokio::test]
async fn init_scaffolds_a_project_that_checks_and_runs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("acme");
    let out = tokio::process::Command::new(support::plumb_bin())
        .arg("init")
        .arg(&root)
        .output()
        .await
        .expect("init");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let in_root = |args: &[&str]| {
        let mut full = vec!["--project", root.to_str().expect("utf8")];
        full.extend_from_slice(args);
        full.into_iter().map(str::to_owned).collect::<Vec<_>>()
    };
    let check = run_args(&in_root(&["check"])).await;
    assert_eq!(check.code, Some(0), "{check}");
    let input = root.join("input.json");
    let run = run_args(&in_root(&[
        "run",
        "hello",
        "--input",
        input.to_str().expect("utf8"),
    ]))
    .await;
    assert_eq!(run.code, Some(0), "{run}");
    assert!(run.stdout.contains("greeted 3 names"), "{run}");
    let again = tokio::process::Command::new(support::plumb_bin())
        .arg("init")
        .arg(&root)
        .output()
        .await
        .expect("init again");
    assert_eq!(again.status.code(), Some(2), "init refuses to overwrite");
}

async fn run_args(args: &[String]) -> support::Output {
    let out = tokio::process::Command::new(support::plumb_bin())
        .args(args)
        .env("NO_COLOR", "1")
        .output()
        .await
        .expect("plumb");
    support::Output {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

#[tokio::test]
async fn check_lists_every_problem_with_file_line_and_field() {
    let project =
        Project::new("connections:\n  crm:\n    http: { base_url: 'https://api.crm.example' }\n");
    project.workflow(
        "a",
        "name: a\nowner: team@example.com\ndescription: first\nsteps:\n  - id: fetch\n    http:\n      conection: crm\n      path: /x\n",
    );
    project.workflow(
        "b",
        "name: b\ndescription: second\nsteps:\n  - id: shape\n    jq: '.steps.nope'\n",
    );
    let out = project.run(&["check"]).await;
    assert_eq!(out.code, Some(1), "{out}");
    assert!(
        out.stderr
            .contains("workflows/a.yaml:7:7: error: unknown field `conection`"),
        "{out}"
    );
    assert!(
        out.stderr.contains("field: steps[0].http.conection"),
        "{out}"
    );
    assert!(
        out.stderr.contains("help: did you mean `connection`?"),
        "{out}"
    );
    assert!(
        out.stderr
            .contains("workflows/b.yaml:1:1: error: missing required field `owner`"),
        "{out}"
    );
    // Every problem in one pass: b's missing owner does not hide the
    // reference to a step it does not have.
    assert!(
        out.stderr
            .contains("step `shape` reads `.steps.nope`, but no step has the id `nope`"),
        "{out}"
    );
    assert!(out.stderr.contains("3 problems found"), "{out}");

    let json = project.run(&["check", "--json"]).await;
    assert_eq!(json.code, Some(1));
    let doc: Value = serde_json::from_str(&json.stdout).expect("json");
    assert_eq!(doc["ok"], false);
    let problems = doc["problems"].as_array().expect("problems");
    assert_eq!(problems.len(), 3);
    assert_eq!(problems[0]["file"], "workflows/a.yaml");
    assert_eq!(problems[0]["line"], 7);
    assert_eq!(problems[0]["field"], "steps[0].http.conection");
}

#[tokio::test]
async fn a_missing_project_and_an_unknown_workflow_are_clear_errors() {
    let empty = tempfile::tempdir().expect("tempdir");
    let out = tokio::process::Command::new(support::plumb_bin())
        .args(["--project", empty.path().to_str().expect("utf8"), "check"])
        .output()
        .await
        .expect("plumb");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no plumb.yaml"));

    let project = Project::new("connections: {}\n");
    project.workflow(
        "w",
        "name: w\nowner: o\ndescription: d\nsteps:\n  - id: a\n    jq: '1'\n",
    );
    let out = project.run(&["run", "nope"]).await;
    assert_eq!(out.code, Some(2), "{out}");
    assert!(
        out.stderr
            .contains("no workflow named `nope`; the project has: w"),
        "{out}"
    );
    let bad_input = project.path().join("bad.json");
    std::fs::write(&bad_input, "{oops").expect("write");
    let out = project
        .run(&["run", "w", "--input", bad_input.to_str().expect("utf8")])
        .await;
    assert_eq!(out.code, Some(2), "{out}");
    assert!(out.stderr.contains("is not valid JSON"), "{out}");
}

#[tokio::test]
async fn run_json_streams_events_with_the_run_id_first_and_runs_list_reads_history() {
    let project = Project::new("connections: {}\n");
    project.workflow(
        "w",
        "name: w\nowner: o\ndescription: d\nsteps:\n  - id: double\n    jq: '.trigger.body.n * 2'\n  - id: check\n    assert:\n      condition: '${{ .steps.double == 42 }}'\n      message: 'expected 42, got ${{ .steps.double }}'\n",
    );
    let input = project.path().join("in.json");
    std::fs::write(&input, r#"{"n": 21}"#).expect("write");
    let out = project
        .run(&[
            "run",
            "w",
            "--json",
            "--input",
            input.to_str().expect("utf8"),
        ])
        .await;
    assert_eq!(out.code, Some(0), "{out}");
    let events: Vec<Value> = out
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect();
    assert_eq!(events[0]["event"], "run_started");
    let run_id = events[0]["run_id"].as_str().expect("id").to_owned();
    let last = events.last().expect("events");
    assert_eq!(last["event"], "run_finished");
    assert_eq!(last["status"], "succeeded");

    std::fs::write(&input, r#"{"n": 1}"#).expect("write");
    let failed = project
        .run(&["run", "w", "--input", input.to_str().expect("utf8")])
        .await;
    assert_eq!(failed.code, Some(1));
    assert!(failed.stdout.contains("expected 42, got 2"), "{failed}");

    let list = project.run(&["runs", "list", "--json"]).await;
    let runs: Vec<Value> = serde_json::from_str(&list.stdout).expect("json");
    assert_eq!(runs.len(), 2);
    assert_eq!(runs[0]["status"], "failed");
    assert_eq!(runs[1]["id"], run_id.as_str());
    let only_failed = project
        .run(&["runs", "list", "--status", "failed", "--json"])
        .await;
    let runs: Vec<Value> = serde_json::from_str(&only_failed.stdout).expect("json");
    assert_eq!(runs.len(), 1);
    let human = project.run(&["runs", "list"]).await;
    assert!(
        human.stdout.contains(&run_id) && human.stdout.contains("succeeded"),
        "{human}"
    );
    let shown = project
        .run(&["runs", "show", &run_id_of(&failed.stdout)])
        .await;
    assert!(shown.stdout.contains("expected 42, got 2"), "{shown}");
}

/// The README's `plumb.yaml` and workflow examples must stay valid.
#[tokio::test]
async fn the_readme_examples_pass_check() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md"))
        .expect("README.md");
    let blocks: Vec<&str> = readme
        .split("```yaml\n")
        .skip(1)
        .filter_map(|b| b.split("```").next())
        .collect();
    let config = blocks
        .iter()
        .find(|b| b.starts_with("store:"))
        .expect("plumb.yaml example");
    let workflow = blocks
        .iter()
        .find(|b| b.starts_with("name:"))
        .expect("workflow example");
    let schema = readme
        .split("`schemas/contacts-page.json`, the contract of the example above:\n\n```json\n")
        .nth(1)
        .and_then(|b| b.split("```").next())
        .expect("the example's schema");
    let project = Project::new(config);
    project.workflow("example", workflow);
    std::fs::create_dir_all(project.path().join("schemas")).expect("schemas dir");
    std::fs::write(project.path().join("schemas/contacts-page.json"), schema).expect("schema");
    let out = project.run(&["check"]).await;
    assert_eq!(out.code, Some(0), "{out}");
}
