//! Data contracts (JSON Schemas in `schemas/`) as a user meets them: a
//! webhook body, a manual run's input and an http step's response held to
//! one, and `plumb check` naming a bad or missing schema with its line.

mod support;

use std::time::Duration;

use serde_json::{Value, json};
use support::{Project, Receiver, post_json, wait_run};

const HEAD: &str = "owner: qa@example.com\ndescription: test workflow\n";

const ORDER_SCHEMA: &str = r#"{
  "type": "object",
  "required": ["id", "items"],
  "properties": {
    "id": { "type": "string" },
    "items": {
      "type": "array",
      "items": {
        "type": "object",
        "required": ["sku", "price"],
        "properties": { "sku": { "type": "string" }, "price": { "type": "number" } }
      }
    }
  }
}
"#;

fn project(rx: &Receiver) -> Project {
    let project = Project::new(&format!(
        "connections:\n  rx:\n    http:\n      base_url: {}\n      timeout: 10s\ndefaults:\n  retry: {{ attempts: 3, initial: 100ms, max: 1s }}\n",
        rx.base_url
    ));
    std::fs::create_dir_all(project.path().join("schemas/api")).expect("schemas dir");
    std::fs::write(project.path().join("schemas/order.json"), ORDER_SCHEMA).expect("schema");
    // A schema in a subfolder, draft 7.
    std::fs::write(
        project.path().join("schemas/api/echo.json"),
        r#"{"$schema": "http://json-schema.org/draft-07/schema#",
            "type": "object", "required": ["body"],
            "properties": {"body": {"type": "object", "required": ["total"],
              "properties": {"total": {"type": "number"}}}}}"#,
    )
    .expect("schema");
    project.workflow(
        "orders",
        &format!(
            "name: orders\n{HEAD}trigger:\n  webhook: {{ path: orders, schema: schemas/order.json }}\nsteps:\n  - id: post\n    http: {{ connection: rx, method: POST, path: /ok/orders, body: '${{{{ .trigger.body }}}}' }}\n"
        ),
    );
    project.workflow(
        "maintenance",
        &format!(
            "name: maintenance\n{HEAD}trigger:\n  webhook: {{ path: maintenance }}\nsteps:\n  - id: get\n    http:\n      connection: rx\n      path: /text\n      expect: {{ schema: schemas/api/echo.json }}\n"
        ),
    );
    project.workflow(
        "totals",
        &format!(
            "name: totals\n{HEAD}trigger:\n  webhook: {{ path: totals }}\nsteps:\n  - id: echo\n    http:\n      connection: rx\n      method: POST\n      path: /echo\n      body: {{ total: '${{{{ .trigger.body.total }}}}' }}\n      expect: {{ status: [200], schema: schemas/api/echo.json }}\n"
        ),
    );
    project
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_breaks_the_webhook_contract_is_a_400_naming_each_pointer_and_starts_nothing() {
    let rx = Receiver::start().await;
    let project = project(&rx);
    let check = project.run(&["check"]).await;
    assert_eq!(check.code, Some(0), "{check}");
    let set = project
        .set_secret("vendor_key", "s3cr3t-vendor-value")
        .await;
    assert_eq!(set.code, Some(0), "{set}");
    let server = project.serve("127.0.0.1:0").await;
    let base = server.base_url.clone();
    let hook = format!("{base}/hooks/orders");

    // A violation quotes the offending value, through the redactor.
    let (status, body) =
        post_json(&hook, &json!({"id": "o-0", "items": "s3cr3t-vendor-value"})).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["violations"][0]["path"], "/items", "{body}");
    assert!(!body.to_string().contains("s3cr3t-vendor-value"), "{body}");

    let bad = json!({"id": 7, "items": [{"sku": "a", "price": 1}, {"sku": "b", "price": "cheap"}, {"sku": "c"}]});
    let (status, body) = post_json(&hook, &bad).await;
    assert_eq!(status, 400, "{body}");
    let error = &body["error"];
    assert_eq!(error["code"], "contract_violation", "{body}");
    assert!(
        error["message"]
            .as_str()
            .unwrap_or("")
            .contains("schemas/order.json"),
        "{body}"
    );
    let violations: Vec<(String, String)> = error["violations"]
        .as_array()
        .expect("violations")
        .iter()
        .map(|v| {
            assert!(v["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
            (
                v["path"].as_str().unwrap_or("").to_owned(),
                v["rule"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect();
    for expected in [
        ("/id", "type"),
        ("/items/1/price", "type"),
        ("/items/2", "required"),
    ] {
        assert!(
            violations
                .iter()
                .any(|(p, r)| p == expected.0 && r == expected.1),
            "{expected:?} in {violations:?}"
        );
    }
    assert_eq!(violations.len(), 3, "{violations:?}");

    // A manual run through the API is held to the same contract.
    let (status, body) = post_json(
        &format!("{base}/api/v1/workflows/orders/runs"),
        &json!({"id": "m-1"}),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["violations"][0]["rule"], "required", "{body}");

    // Nothing ran for any of them; a body that keeps the contract runs.
    let runs = project.run(&["runs", "list", "--json"]).await;
    assert_eq!(runs.code, Some(0), "{runs}");
    let listed: Value = serde_json::from_str(&runs.stdout).expect("json");
    assert_eq!(listed.as_array().map(Vec::len), Some(0), "{listed}");
    let good = json!({"id": "o-1", "items": [{"sku": "a", "price": 9.5}]});
    let (status, body) = post_json(&hook, &good).await;
    assert_eq!(status, 202, "{body}");
    let done = wait_run(
        &base,
        body["run_id"].as_str().expect("id"),
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(done["run"]["status"], "succeeded", "{done}");
    assert_eq!(
        rx.hits().len(),
        1,
        "only the good body reached the upstream"
    );

    // An edited contract is deployed and audited like an edited workflow,
    // and holds from then on.
    std::fs::write(
        project.path().join("schemas/order.json"),
        ORDER_SCHEMA.replace(
            r#""id": { "type": "string" }"#,
            r#""id": { "type": "integer" }"#,
        ),
    )
    .expect("edit the schema");
    let (status, doc) = post_json(&format!("{base}/api/v1/deployments"), &json!({})).await;
    assert_eq!(status, 200, "{doc}");
    assert_eq!(
        doc["changed"],
        json!(["schema:schemas/order.json"]),
        "{doc}"
    );
    let (status, body) = post_json(&hook, &good).await;
    assert_eq!(
        status, 400,
        "a string id breaks the edited contract: {body}"
    );
    let renumbered = json!({"id": 7, "items": [{"sku": "a", "price": 9.5}]});
    let (status, body) = post_json(&hook, &renumbered).await;
    assert_eq!(status, 202, "{body}");

    let metrics = support::metrics(&base).await;
    assert!(
        metrics.contains("plumb_webhook_contract_violations_total{workflow=\"orders\"} 3"),
        "{metrics}"
    );
    assert_eq!(server.stop().await, Some(0));

    // `plumb run --input` too: refused before anything runs.
    let input = project.path().join("in.json");
    std::fs::write(&input, r#"{"id": "x", "items": {}}"#).expect("input");
    let run = project
        .run(&[
            "run",
            "orders",
            "--input",
            input.to_str().expect("utf-8 path"),
        ])
        .await;
    assert_eq!(run.code, Some(2), "{run}");
    assert!(
        run.stderr.contains("/items") && run.stderr.contains("schemas/order.json"),
        "{run}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_that_breaks_expect_schema_fails_the_step_for_good_without_retries() {
    let rx = Receiver::start().await;
    let project = project(&rx);
    let server = project.serve("127.0.0.1:0").await;
    let base = server.base_url.clone();
    let hook = format!("{base}/hooks/totals");

    let (status, body) = post_json(&hook, &json!({"total": "twelve"})).await;
    assert_eq!(status, 202, "{body}");
    let failed = wait_run(
        &base,
        body["run_id"].as_str().expect("id"),
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(failed["run"]["status"], "failed", "{failed}");
    let error = failed["run"]["failure"]["message"]
        .as_str()
        .or_else(|| failed["run"]["error"].as_str())
        .unwrap_or_default()
        .to_owned();
    assert!(
        error.contains("/body/total")
            && error.contains("(type)")
            && error.contains("schemas/api/echo.json"),
        "{failed}"
    );
    assert_eq!(
        rx.hits().len(),
        1,
        "a contract violation is permanent: the request is not retried"
    );

    // A 200 that is not JSON at all (a proxy's maintenance page) is a
    // glitch in front of the upstream: retried, then failed naming it.
    let (status, body) = post_json(&format!("{base}/hooks/maintenance"), &json!({})).await;
    assert_eq!(status, 202, "{body}");
    let failed = wait_run(
        &base,
        body["run_id"].as_str().expect("id"),
        Duration::from_secs(15),
    )
    .await;
    assert_eq!(failed["run"]["status"], "failed", "{failed}");
    assert!(failed.to_string().contains("not JSON"), "{failed}");
    let retried = rx.hits().iter().filter(|h| h.path == "/text").count();
    assert_eq!(retried, 3, "every attempt of the policy was made");

    let (status, body) = post_json(&hook, &json!({"total": 12})).await;
    assert_eq!(status, 202, "{body}");
    let done = wait_run(
        &base,
        body["run_id"].as_str().expect("id"),
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(done["run"]["status"], "succeeded", "{done}");
    assert_eq!(server.stop().await, Some(0));
}

#[tokio::test]
async fn check_names_a_bad_schema_at_its_line_and_a_missing_one_at_the_field() {
    let rx = Receiver::start().await;
    let project = project(&rx);
    std::fs::write(
        project.path().join("schemas/broken.json"),
        "{\n  \"type\": \"object\",\n  \"properties\": {\n    \"id\": { \"type\": \"strnig\" }\n  }\n}\n",
    )
    .expect("schema");
    std::fs::write(
        project.path().join("schemas/notjson.json"),
        "{\n  \"type\": ,\n}\n",
    )
    .expect("schema");
    project.workflow(
        "missing",
        &format!(
            "name: missing\n{HEAD}trigger:\n  webhook: {{ path: missing, schema: schemas/ordr.json }}\nsteps:\n  - id: a\n    jq: '1'\n"
        ),
    );
    let check = project.run(&["check"]).await;
    assert_eq!(check.code, Some(1), "{check}");
    let text = format!("{}{}", check.stdout, check.stderr);
    assert!(text.contains("schemas/broken.json:4"), "{text}");
    assert!(text.contains("schemas/notjson.json:2"), "{text}");
    assert!(
        text.contains("workflows/missing.yaml:5") && text.contains("schemas/order.json"),
        "the missing schema is named at its field, with the closest one: {text}"
    );
}
