//! Security guarantees, tested by trying to break them with the real
//! binary: secrets never leak, every API route checks its role, webhook
//! senders are authenticated, credentials stay with their hosts, keys are
//! guarded, and the audit log shows tampering.

mod support;

use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{Value, json};
use support::{Project, Receiver, get_json, post_json, wait_run};

const HEAD: &str = "owner: qa@example.com\ndescription: security test workflow\n";

/// A value that appears nowhere unless plumb leaks it. `+`, `/` and `=`
/// make its URL-encoded and base64 forms differ from it; `"` and `\` make
/// it change when a JSON document holding it is printed.
fn canary() -> String {
    format!("cn+{}/x=\"q\\", uuid_like())
}

fn uuid_like() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    format!("{:016x}{:08x}", h.finish(), std::process::id())
}

/// Every form of `value` that must never appear.
fn forms(value: &str) -> Vec<String> {
    use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
    let url: String = value
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect();
    let escaped = serde_json::to_string(value).expect("json");
    vec![
        value.to_owned(),
        STANDARD.encode(value),
        URL_SAFE_NO_PAD.encode(value),
        url,
        escaped[1..escaped.len() - 1].to_owned(),
    ]
}

/// A project with one http connection `conn` to `base_url` sending the
/// secret `secret` as a bearer token, and no retries.
fn bearer_project(conn: &str, base_url: &str, secret: &str) -> Project {
    Project::new(&format!(
        "connections:\n  {conn}:\n    http:\n      base_url: {base_url}\n      auth: {{ bearer: {{ secret: {secret} }} }}\ndefaults:\n  retry: {{ attempts: 1 }}\n"
    ))
}

/// A manual workflow `name` with one step `go` POSTing to `path` on `conn`.
fn post_workflow(name: &str, conn: &str, path: &str) -> String {
    format!(
        "name: {name}\n{HEAD}trigger: manual\nsteps:\n  - id: go\n    http: {{ connection: {conn}, method: POST, path: {path} }}\n"
    )
}

/// The audit log through the API (admin token of the test server).
async fn api_audit(base: &str) -> Vec<Value> {
    get_json(&format!("{base}/api/v1/audit?limit=1000")).await["entries"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// The audit log through `plumb audit list --json`.
async fn cli_audit(project: &Project) -> Vec<Value> {
    let out = project.run(&["audit", "list", "--json"]).await;
    assert_eq!(out.code, Some(0), "{out}");
    serde_json::from_str(&out.stdout).expect("audit list --json is JSON")
}

async fn must_set(project: &Project, name: &str, value: &str) {
    let out = project.set_secret(name, value).await;
    assert_eq!(out.code, Some(0), "secrets set {name}: {out}");
}

fn assert_absent(what: &str, haystack: &[u8], value: &str) {
    // With basic auth the credential on the wire is base64("svc:<value>").
    let mut all = forms(value);
    all.extend(forms(&format!("svc:{value}")));
    // A long value cut in half (an error message truncated mid-secret)
    // still leaks its start.
    if let Some(start) = value.get(..12).filter(|_| value.len() > 16) {
        all.push(start.to_owned());
    }
    for form in all {
        let found = haystack.windows(form.len()).any(|w| w == form.as_bytes());
        assert!(!found, "{what} contains the secret (as `{form}`)");
    }
}

/// An authenticated API call with `token`; returns status and JSON body.
async fn call(method: &str, url: &str, token: Option<&str>, body: Option<Value>) -> (u16, Value) {
    let client = support::http();
    let mut req = client.request(method.parse().expect("method"), url);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    if let Some(b) = body {
        req = req.json(&b);
    }
    let r = req.send().await.expect("request");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

async fn runs_of(base: &str, workflow: &str) -> Vec<Value> {
    get_json(&format!("{base}/api/v1/runs?workflow={workflow}"))
        .await
        .get("runs")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_secret_reaches_its_upstream_and_appears_nowhere_else() {
    let up = Receiver::start().await;
    let pager = Receiver::start().await;
    let secret = canary();
    let project = Project::new(&format!(
        "connections:\n  up:\n    http:\n      base_url: {0}\n      timeout: 10s\n      auth: {{ bearer: {{ secret: canary }} }}\n  up_basic:\n    http:\n      base_url: {0}\n      timeout: 10s\n      auth: {{ basic: {{ username: svc, password: {{ secret: canary }} }} }}\n  pager:\n    http:\n      base_url: {1}\n      timeout: 10s\n      auth: {{ header: {{ name: X-Pager-Key, secret: pager_key }} }}\ndefaults:\n  retry: {{ attempts: 2, initial: 100ms, max: 1s }}\nalerts:\n  ops:\n    http: {{ connection: pager, path: /ok/alert }}\n",
        up.base_url, pager.base_url
    ));
    project.workflow(
        "canary",
        &format!(
            "name: canary\n{HEAD}trigger:\n  webhook: {{ path: canary }}\nalerts: {{ on_failure: [ops] }}\nsteps:\n  - id: call\n    http: {{ connection: up, method: POST, path: /echo, body: '${{{{ .trigger.body }}}}' }}\n  - id: call_basic\n    http: {{ connection: up_basic, method: POST, path: /echo }}\n  - id: copy\n    jq: '{{seen: .steps.call.body.headers.authorization, echoed: .steps.call.headers[\"x-echo-authorization\"], sent: .trigger.body}}'\n  - id: fail\n    http: {{ connection: up, method: POST, path: '/echo-fail/400?pad=230', body: '${{{{ .steps.copy }}}}' }}\n"
        ),
    );
    let set = project.set_secret("canary", &secret).await;
    assert_eq!(set.code, Some(0), "{set}");
    must_set(&project, "pager_key", "pager-key-value").await;

    let log_path = project.path().join("serve.log");
    let log = std::fs::File::create(&log_path).expect("log file");
    let token = project.admin_token().await;
    let mut child = project
        .cmd(&["serve", "--listen", "127.0.0.1:0"])
        .env("PLUMB_LOG", "debug")
        .stdout(std::process::Stdio::piped())
        .stderr(log)
        .spawn()
        .expect("spawn serve");
    let stdout = child.stdout.take().expect("stdout");
    let mut reader = tokio::io::BufReader::new(stdout);
    let mut first = String::new();
    tokio::io::AsyncBufReadExt::read_line(&mut reader, &mut first)
        .await
        .expect("first line");
    let base = first
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .expect("address")
        .to_owned();

    // The sender, too, posts the secret (and its encodings) in the event.
    let [plain, b64, _, url, _] = <[String; 5]>::try_from(forms(&secret)).expect("forms");
    let (status, body) = call(
        "POST",
        &format!("{base}/hooks/canary"),
        None,
        Some(json!({"token": plain, "b64": b64, "url": url, "note": format!("header Bearer {plain}")})),
    )
    .await;
    assert_eq!(status, 202, "{body}");
    let run_id = body["run_id"].as_str().expect("run id").to_owned();
    let deadline = Instant::now() + Duration::from_secs(15);
    let done = loop {
        let (_, doc) = call(
            "GET",
            &format!("{base}/api/v1/runs/{run_id}"),
            Some(&token),
            None,
        )
        .await;
        if doc["run"]["status"] == "failed" {
            break doc;
        }
        assert!(Instant::now() < deadline, "run did not fail in time: {doc}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // The upstream got the credential, exactly as configured.
    let echo_hit = up
        .hits()
        .into_iter()
        .find(|h| h.path == "/echo")
        .expect("the upstream was called");
    assert_eq!(
        echo_hit.headers.get("authorization").map(String::as_str),
        Some(format!("Bearer {secret}").as_str())
    );
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("svc:{secret}"));
    assert!(
        up.hits()
            .iter()
            .any(|h| h.headers.get("authorization") == Some(&format!("Basic {basic}"))),
        "the basic-auth connection sent its credential"
    );
    // Later steps saw only the redacted form.
    let copied = up
        .hits()
        .into_iter()
        .find(|h| h.path.starts_with("/echo-fail/400"))
        .expect("the failing step ran");
    assert_eq!(copied.body["seen"], "Bearer [redacted:canary]");
    assert_eq!(copied.body["echoed"], "Bearer [redacted:canary]");
    assert_eq!(copied.body["sent"]["b64"], "[redacted:canary]");

    // Wait for the alert, whose body carries the upstream's error message.
    let deadline = Instant::now() + Duration::from_secs(15);
    while !pager.hits().iter().any(|h| h.path == "/ok/alert") {
        assert!(Instant::now() < deadline, "no alert delivered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let alert = pager
        .hits()
        .into_iter()
        .find(|h| h.path == "/ok/alert")
        .expect("alert");
    assert_eq!(
        alert.headers.get("x-pager-key").map(String::as_str),
        Some("pager-key-value"),
        "an alert channel's connection authenticates"
    );
    let alert_text = alert.body.to_string();
    assert!(
        alert_text.contains("[redacted:canary]"),
        "the alert carries the redacted error: {alert_text}"
    );
    assert_absent("the alert body", alert_text.as_bytes(), &secret);

    let mut api_text = done.to_string();
    for route in ["runs", "dlq", "status", "secrets", "audit", "tokens"] {
        let (status, doc) =
            call("GET", &format!("{base}/api/v1/{route}"), Some(&token), None).await;
        assert_eq!(status, 200, "{route}: {doc}");
        api_text.push_str(&doc.to_string());
    }
    assert!(api_text.contains("[redacted:canary]"), "{api_text}");
    assert_absent("API responses", api_text.as_bytes(), &secret);

    let mut cli_text = String::new();
    for args in [
        vec!["runs", "show", run_id.as_str()],
        vec!["runs", "show", run_id.as_str(), "--json"],
        vec!["runs", "list"],
        vec!["dlq", "list", "--json"],
        vec!["status"],
        vec!["secrets", "list", "--json"],
        vec!["audit", "list", "--json"],
    ] {
        let out = project.run(&args).await;
        // `status` exits 1 when something needs a person: here, the
        // failed run in the dead-letter list.
        let expected = if args == ["status"] { 1 } else { 0 };
        assert_eq!(out.code, Some(expected), "{args:?}: {out}");
        cli_text.push_str(&out.stdout);
        cli_text.push_str(&out.stderr);
    }
    assert_absent("CLI output", cli_text.as_bytes(), &secret);

    let server = support::Server {
        child,
        base_url: base.clone(),
        stdout: reader,
    };
    assert_eq!(server.stop().await, Some(0));
    let logs = std::fs::read(&log_path).expect("logs");
    assert!(!logs.is_empty(), "debug logs were written");
    assert_absent("the server's logs", &logs, &secret);
    for entry in std::fs::read_dir(project.path()).expect("project dir") {
        let path = entry.expect("entry").path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name.starts_with("plumb.db") {
            let bytes = std::fs::read(&path).expect("store file");
            assert_absent(&format!("store file {name}"), &bytes, &secret);
        }
    }
}

/// Every `/api/v1` route, its lowest role, and a request to send.
const ROUTES: &[(&str, &str, &str)] = &[
    ("GET", "/api/v1/workflows", "viewer"),
    ("GET", "/api/v1/runs", "viewer"),
    (
        "GET",
        "/api/v1/runs/00000000-0000-0000-0000-000000000000",
        "viewer",
    ),
    ("GET", "/api/v1/dlq", "viewer"),
    ("GET", "/api/v1/status", "viewer"),
    ("GET", "/api/v1/secrets", "viewer"),
    ("POST", "/api/v1/workflows/noop/runs", "operator"),
    (
        "POST",
        "/api/v1/runs/00000000-0000-0000-0000-000000000000/cancel",
        "operator",
    ),
    (
        "POST",
        "/api/v1/dlq/00000000-0000-0000-0000-000000000000/replay",
        "operator",
    ),
    ("POST", "/api/v1/dlq/replay", "operator"),
    ("POST", "/api/v1/secrets", "admin"),
    ("PUT", "/api/v1/secrets/nope", "admin"),
    ("DELETE", "/api/v1/secrets/nope", "admin"),
    ("GET", "/api/v1/tokens", "admin"),
    ("POST", "/api/v1/tokens", "admin"),
    ("DELETE", "/api/v1/tokens/nope", "admin"),
    ("POST", "/api/v1/deployments", "admin"),
    ("GET", "/api/v1/audit", "admin"),
    ("GET", "/api/v1/audit/verify", "admin"),
];

fn rank(role: &str) -> u8 {
    match role {
        "viewer" => 1,
        "operator" => 2,
        "admin" => 3,
        other => panic!("unknown role {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_api_route_answers_401_without_a_token_and_403_below_its_role() {
    let project = Project::new("defaults:\n  retry: { attempts: 1 }\n");
    project.workflow(
        "noop",
        &format!("name: noop\n{HEAD}trigger: manual\nsteps:\n  - id: a\n    jq: '1'\n"),
    );
    let viewer = project.token("v", "viewer").await;
    let operator = project.token("o", "operator").await;
    let admin = project.token("a", "admin").await;
    let revoked = project.token("r", "admin").await;
    let out = project.run(&["tokens", "revoke", "r"]).await;
    assert_eq!(out.code, Some(0), "{out}");
    let server = project.serve("127.0.0.1:0").await;
    let base = server.base_url.clone();

    let body_for = |route: &str| -> Option<Value> {
        if route.ends_with("/secrets") {
            Some(json!({"name": "matrix", "value": "matrix-value-1"}))
        } else if route.contains("/secrets/") {
            Some(json!({"value": "matrix-value-2"}))
        } else if route.ends_with("/tokens") {
            Some(json!({"name": format!("t-{}", uuid_like()), "role": "viewer"}))
        } else if route.ends_with("/runs") && route.contains("workflows") {
            Some(json!({"input": {}}))
        } else {
            None
        }
    };
    let mut checked = 0;
    for (method, route, needs) in ROUTES {
        let url = format!("{base}{route}");
        for (label, token) in [
            ("no token", None),
            ("garbage token", Some("plumb_not-a-token")),
            ("revoked token", Some(revoked.as_str())),
        ] {
            let (status, doc) = call(method, &url, token, body_for(route)).await;
            assert_eq!(status, 401, "{method} {route} with {label}: {doc}");
            assert_eq!(doc["error"]["code"], "unauthorized", "{doc}");
            checked += 1;
        }
        for (role, token) in [
            ("viewer", &viewer),
            ("operator", &operator),
            ("admin", &admin),
        ] {
            let (status, doc) = call(method, &url, Some(token), body_for(route)).await;
            if rank(role) < rank(needs) {
                assert_eq!(status, 403, "{method} {route} as {role}: {doc}");
                assert_eq!(doc["error"]["code"], "forbidden", "{doc}");
            } else {
                assert!(
                    status != 401 && status != 403,
                    "{method} {route} as {role} got {status}: {doc}"
                );
            }
            checked += 1;
        }
    }
    assert_eq!(checked, ROUTES.len() * 6);
    // The open endpoints say nothing secret.
    for open in ["/healthz", "/readyz", "/metrics"] {
        let (status, _) = call("GET", &format!("{base}{open}"), None, None).await;
        assert_eq!(status, 200, "{open} stays open");
        let text = support::http()
            .get(format!("{base}{open}"))
            .send()
            .await
            .expect("open endpoint")
            .text()
            .await
            .expect("text");
        for token in [&viewer, &operator, &admin] {
            assert!(!text.contains(token.as_str()), "{open} reveals a token");
        }
        assert!(!text.contains("matrix-value"), "{open} reveals a secret");
    }
    // Failed attempts are in the audit log, but not one per request.
    let audit = api_audit(&base).await;
    let failures = audit
        .iter()
        .filter(|e| e["action"] == "auth.failed")
        .count();
    assert!(failures > 0, "failed attempts are audited: {audit:?}");
    for who in ["api:v", "api:o"] {
        assert!(
            audit
                .iter()
                .any(|e| e["action"] == "auth.failed" && e["actor"] == who),
            "a refusal of a real token ({who}) is audited despite anonymous noise: {audit:?}"
        );
    }
    assert!(
        failures < ROUTES.len() * 5,
        "failed attempts are rate-limited ({failures})"
    );
}

fn hmac_hex(key: &[u8], parts: &[&[u8]]) -> String {
    use hmac::{KeyInit, Mac};
    let mut mac = <hmac::Hmac<sha2::Sha256> as KeyInit>::new_from_slice(key).expect("key");
    for p in parts {
        mac.update(p);
    }
    hex::encode(mac.finalize().into_bytes())
}

/// Request headers as name/value pairs.
type Headers = Vec<(&'static str, String)>;

async fn post_raw(url: &str, body: &str, headers: &[(&str, String)]) -> (u16, Value) {
    let mut req = support::http()
        .post(url)
        .header("content-type", "application/json")
        .body(body.to_owned());
    for (k, v) in headers {
        req = req.header(*k, v);
    }
    let r = req.send().await.expect("request");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_webhooks_run_only_with_a_good_fresh_signature_or_bearer_secret() {
    let project = Project::new("defaults:\n  retry: { attempts: 1 }\n");
    project.workflow(
        "signed",
        &format!(
            "name: signed\n{HEAD}trigger:\n  webhook:\n    path: signed\n    auth:\n      hmac_sha256: {{ secret: hook_key, header: X-Signature, prefix: 'sha256=', timestamp_header: X-Timestamp, tolerance: 5m }}\nsteps:\n  - id: a\n    jq: '.trigger.body'\n"
        ),
    );
    project.workflow(
        "bearer",
        &format!(
            "name: bearer\n{HEAD}trigger:\n  webhook:\n    path: bearer\n    auth: {{ bearer: {{ secret: hook_token }} }}\nsteps:\n  - id: a\n    jq: '.trigger.body'\n"
        ),
    );
    must_set(&project, "hook_key", "k3y-for-hmac").await;
    must_set(&project, "hook_token", "t0ken-for-bearer").await;
    let server = project.serve("127.0.0.1:0").await;
    let base = server.base_url.clone();
    let hook = format!("{base}/hooks/signed");
    let body = r#"{"order":"A-1","total":12.5}"#;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs()
        .to_string();
    let sign = |ts: &str, body: &str, key: &[u8]| {
        format!(
            "sha256={}",
            hmac_hex(key, &[ts.as_bytes(), b".", body.as_bytes()])
        )
    };

    let good = sign(&now, body, b"k3y-for-hmac");
    let (status, doc) = post_raw(
        &hook,
        body,
        &[("x-signature", good.clone()), ("x-timestamp", now.clone())],
    )
    .await;
    assert_eq!(status, 202, "a good signature is accepted: {doc}");
    let run_id = doc["run_id"].as_str().expect("run id").to_owned();
    wait_run(&base, &run_id, Duration::from_secs(10)).await;

    let stale_ts = (now.parse::<i64>().expect("ts") - 600).to_string();
    let cases: Vec<(&str, Headers, &str)> = vec![
        ("no signature", vec![("x-timestamp", now.clone())], body),
        (
            "wrong key",
            vec![
                ("x-signature", sign(&now, body, b"not-the-key")),
                ("x-timestamp", now.clone()),
            ],
            body,
        ),
        (
            "changed body",
            vec![("x-signature", good.clone()), ("x-timestamp", now.clone())],
            r#"{"order":"A-1","total":99999}"#,
        ),
        (
            "stale timestamp (a replay)",
            vec![
                ("x-signature", sign(&stale_ts, body, b"k3y-for-hmac")),
                ("x-timestamp", stale_ts.clone()),
            ],
            body,
        ),
        ("no timestamp", vec![("x-signature", good.clone())], body),
    ];
    for (label, headers, body) in &cases {
        let (status, doc) = post_raw(&hook, body, headers).await;
        assert_eq!(status, 401, "{label}: {doc}");
        assert_eq!(doc["error"]["code"], "unauthorized", "{label}: {doc}");
    }
    assert_eq!(
        runs_of(&base, "signed").await.len(),
        1,
        "refused requests created no run"
    );

    let bearer_hook = format!("{base}/hooks/bearer");
    for (label, auth) in [
        ("no header", None),
        ("wrong secret", Some("Bearer t0ken-for-bearer-not")),
        ("prefix of the secret", Some("Bearer t0ken-for")),
    ] {
        let headers: Vec<(&str, String)> = auth
            .map(|a| vec![("authorization", a.to_owned())])
            .unwrap_or_default();
        let (status, doc) = post_raw(&bearer_hook, "{}", &headers).await;
        assert_eq!(status, 401, "{label}: {doc}");
    }
    assert!(runs_of(&base, "bearer").await.is_empty());
    let (status, doc) = post_raw(
        &bearer_hook,
        "{}",
        &[("authorization", "Bearer t0ken-for-bearer".to_owned())],
    )
    .await;
    assert_eq!(status, 202, "{doc}");
    let run_id = doc["run_id"].as_str().expect("run id").to_owned();
    let done = wait_run(&base, &run_id, Duration::from_secs(10)).await;
    assert!(
        done["run"]["trigger"]["headers"]
            .get("authorization")
            .is_none(),
        "the bearer secret is not journaled: {done}"
    );
    let audit = api_audit(&base).await;
    assert!(
        audit
            .iter()
            .any(|e| e["action"] == "webhook.auth_failed" && e["subject"] == "signed"),
        "refusals are audited: {audit:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redirect_to_another_host_never_carries_the_credential() {
    let first = Receiver::start().await;
    let elsewhere = Receiver::start_on("127.0.0.2").await;
    let project = Project::new(&format!(
        "connections:\n  api:\n    http:\n      base_url: {}\n      timeout: 10s\n      auth: {{ header: {{ name: X-Api-Key, secret: api_key }} }}\ndefaults:\n  retry: {{ attempts: 1 }}\n",
        first.base_url
    ));
    let target = format!("{}/echo", elsewhere.base_url);
    project.workflow(
        "hop",
        &format!(
            "name: hop\n{HEAD}trigger: manual\nsteps:\n  - id: go\n    http: {{ connection: api, method: GET, path: '/redirect?to={target}' }}\n"
        ),
    );
    must_set(&project, "api_key", "key-that-stays-home").await;
    let out = project.run(&["run", "hop"]).await;
    assert_ne!(out.code, Some(0), "the run fails: {out}");
    assert!(
        out.stderr.contains("outside the connection's host")
            || out.stdout.contains("outside the connection's host"),
        "{out}"
    );
    let first_hits = first.hits();
    assert_eq!(first_hits.len(), 1);
    assert_eq!(
        first_hits[0].headers.get("x-api-key").map(String::as_str),
        Some("key-that-stays-home"),
        "the connection's own host got the credential"
    );
    assert!(
        elsewhere.hits().iter().all(|h| !h
            .headers
            .values()
            .any(|v| v.contains("key-that-stays-home"))),
        "the other host never saw the credential"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_wrong_master_key_is_refused_with_a_clear_error() {
    let rx = Receiver::start().await;
    let project = bearer_project("api", &rx.base_url, "tok");
    project.workflow("call", &post_workflow("call", "api", "/ok/x"));
    must_set(&project, "tok", "sealed-under-key-one").await;
    let other_key = base64::engine::general_purpose::STANDARD.encode([7u8; 32]);
    let out = project
        .cmd(&["run", "call"])
        .env("PLUMB_MASTER_KEY", &other_key)
        .output()
        .await
        .expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains("sealed with another master key") && stderr.contains("tok"),
        "{stderr}"
    );
    assert!(
        rx.hits().is_empty(),
        "nothing was sent with a garbage value"
    );
    let serve = project
        .cmd(&["serve", "--listen", "127.0.0.1:0"])
        .env("PLUMB_MASTER_KEY", &other_key)
        .output()
        .await
        .expect("serve");
    assert_ne!(serve.status.code(), Some(0), "serve refuses to start");
    assert!(
        String::from_utf8_lossy(&serve.stderr).contains("sealed with another master key"),
        "{}",
        String::from_utf8_lossy(&serve.stderr)
    );
    // With the right key (the file) it works.
    let ok = project.run(&["run", "call"]).await;
    assert_eq!(ok.code, Some(0), "{ok}");
    assert_eq!(
        rx.hits()[0]
            .headers
            .get("authorization")
            .map(String::as_str),
        Some("Bearer sealed-under-key-one")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_file_readable_by_others_is_refused_and_the_fix_is_named() {
    use std::os::unix::fs::PermissionsExt;
    let project = Project::new(
        "connections:\n  api:\n    http:\n      base_url: http://127.0.0.1:9\n      auth: { bearer: { secret: tok } }\n",
    );
    project.workflow(
        "noop",
        &format!("name: noop\n{HEAD}trigger: manual\nsteps:\n  - id: a\n    jq: '1'\n"),
    );
    must_set(&project, "tok", "some-token-value").await;
    let key = project.path().join(".plumb").join("master.key");
    let mode = std::fs::metadata(&key)
        .expect("key file")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600, "the key file is created private");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    for args in [
        vec!["run", "noop"],
        vec!["serve", "--listen", "127.0.0.1:0"],
        vec!["secrets", "rotate", "tok"],
    ] {
        let out = if args[0] == "secrets" {
            project
                .set_secret_with("rotate", "tok", "another-value")
                .await
        } else {
            project.run(&args).await
        };
        assert_ne!(out.code, Some(0), "{args:?} refuses: {out}");
        assert!(
            out.stderr.contains("can be read by group or others")
                && out.stderr.contains("chmod 600"),
            "{args:?}: {out}"
        );
    }
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let out = project.run(&["run", "noop"]).await;
    assert_eq!(out.code, Some(0), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rekey_reseals_every_secret_under_a_new_key_and_all_stay_readable() {
    let rx = Receiver::start().await;
    let project = Project::new(&format!(
        "connections:\n  a:\n    http:\n      base_url: {0}\n      auth: {{ bearer: {{ secret: one }} }}\n  b:\n    http:\n      base_url: {0}\n      auth: {{ basic: {{ username: svc, password: {{ secret: two }} }} }}\n  c:\n    http:\n      base_url: {0}\n      auth: {{ header: {{ name: X-Key, secret: three }} }}\ndefaults:\n  retry: {{ attempts: 1 }}\n",
        rx.base_url
    ));
    project.workflow(
        "all",
        &format!(
            "name: all\n{HEAD}trigger: manual\nsteps:\n  - id: a\n    http: {{ connection: a, method: POST, path: /ok/a }}\n  - id: b\n    http: {{ connection: b, method: POST, path: /ok/b }}\n  - id: c\n    http: {{ connection: c, method: POST, path: /ok/c }}\n"
        ),
    );
    for (name, value) in [
        ("one", "value-one-1"),
        ("two", "value-two-2"),
        ("three", "value-three-3"),
    ] {
        must_set(&project, name, value).await;
    }
    let key_file = project.path().join(".plumb").join("master.key");
    let before = std::fs::read_to_string(&key_file).expect("key");
    let out = project.run(&["secrets", "rekey", "--json"]).await;
    assert_eq!(out.code, Some(0), "{out}");
    let doc: Value = serde_json::from_str(&out.stdout).expect("json");
    assert_eq!(doc["secrets"], 3, "{doc}");
    let after = std::fs::read_to_string(&key_file).expect("key");
    assert_ne!(before, after, "a new key is in place");
    // The old key opens nothing any more.
    let stale = project
        .cmd(&["run", "all"])
        .env("PLUMB_MASTER_KEY", before.trim())
        .output()
        .await
        .expect("run");
    assert_ne!(stale.status.code(), Some(0));
    // The new key opens every secret.
    let run = project.run(&["run", "all"]).await;
    assert_eq!(run.code, Some(0), "{run}");
    let hits = rx.hits();
    let header = |path: &str, name: &str| {
        hits.iter()
            .find(|h| h.path == path)
            .and_then(|h| h.headers.get(name).cloned())
    };
    assert_eq!(
        header("/ok/a", "authorization").as_deref(),
        Some("Bearer value-one-1")
    );
    let basic = base64::engine::general_purpose::STANDARD.encode("svc:value-two-2");
    assert_eq!(
        header("/ok/b", "authorization"),
        Some(format!("Basic {basic}"))
    );
    assert_eq!(header("/ok/c", "x-key").as_deref(), Some("value-three-3"));
    let audit = cli_audit(&project).await;
    assert!(
        audit.iter().any(|e| e["action"] == "secrets.rekeyed"),
        "{audit:?}"
    );
    let verify = project.run(&["audit", "verify"]).await;
    assert_eq!(verify.code, Some(0), "{verify}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rekey_of_an_environment_key_killed_right_after_its_commit_leaves_the_new_key_on_disk() {
    use std::os::unix::fs::PermissionsExt;
    let rx = Receiver::start().await;
    let project = Project::new(&format!(
        "connections:\n  a:\n    http:\n      base_url: {}\n      auth: {{ bearer: {{ secret: one }} }}\ndefaults:\n  retry: {{ attempts: 1 }}\n",
        rx.base_url
    ));
    project.workflow(
        "call",
        &format!(
            "name: call\n{HEAD}steps:\n  - id: a\n    http: {{ connection: a, path: /ok/a }}\n"
        ),
    );
    let key: [u8; 32] = rand::random();
    let key = base64::engine::general_purpose::STANDARD.encode(key);
    let with_key = |args: &[&str], key: &str| {
        let mut cmd = project.cmd(args);
        cmd.env("PLUMB_MASTER_KEY", key);
        cmd
    };
    let mut set = with_key(&["secrets", "set", "one"], &key);
    set.stdin(std::process::Stdio::piped());
    let mut child = set.spawn().expect("spawn");
    {
        use tokio::io::AsyncWriteExt;
        let mut stdin = child.stdin.take().expect("stdin");
        stdin.write_all(b"value-one-1").await.expect("write");
    }
    assert!(child.wait().await.expect("wait").success());
    // Without a place for the new key, nothing happens.
    let out = with_key(&["secrets", "rekey"], &key)
        .output()
        .await
        .expect("rekey");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--new-key-file"));
    // Killed the instant the re-sealed secrets are committed.
    let new_file = project.path().join("new.key");
    let out = with_key(
        &[
            "secrets",
            "rekey",
            "--new-key-file",
            new_file.to_str().expect("utf-8"),
        ],
        &key,
    )
    .env("PLUMB_FAILPOINT", "rekey.committed")
    .output()
    .await
    .expect("rekey");
    assert_eq!(out.status.code(), None, "the rekey was killed");
    let mode = std::fs::metadata(&new_file)
        .expect("the new key is on disk")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let new_key = std::fs::read_to_string(&new_file).expect("read the new key");
    // The old key opens nothing; the one on disk opens everything.
    let stale = with_key(&["run", "call"], &key)
        .output()
        .await
        .expect("run");
    assert_ne!(stale.status.code(), Some(0));
    let fresh = with_key(&["run", "call"], new_key.trim())
        .output()
        .await
        .expect("run");
    assert_eq!(
        fresh.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&fresh.stdout)
    );
    assert_eq!(
        rx.hits()[0]
            .headers
            .get("authorization")
            .map(String::as_str),
        Some("Bearer value-one-1")
    );
}

/// A project with a few audit entries, and a copy of its store to tamper
/// with.
async fn audited_project() -> Project {
    let project = Project::new("defaults:\n  retry: { attempts: 1 }\n");
    for (name, value) in [
        ("s1", "value-111"),
        ("s2", "value-222"),
        ("s3", "value-333"),
    ] {
        must_set(&project, name, value).await;
    }
    project.token("t1", "viewer").await;
    let out = project.run(&["tokens", "revoke", "t1"]).await;
    assert_eq!(out.code, Some(0), "{out}");
    let verify = project.run(&["audit", "verify", "--json"]).await;
    assert_eq!(verify.code, Some(0), "{verify}");
    let doc: Value = serde_json::from_str(&verify.stdout).expect("json");
    assert_eq!(doc["entries"], 5, "{doc}");
    project
}

fn tamper(project: &Project, sql: &str) {
    let conn = rusqlite::Connection::open(project.store_file()).expect("open store");
    conn.execute_batch(sql).expect("tamper");
}

async fn verify_fails(project: &Project, names: &str) {
    let out = project.run(&["audit", "verify"]).await;
    assert_eq!(out.code, Some(1), "verify must fail: {out}");
    assert!(out.stderr.contains(names), "expected `{names}` in: {out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_verify_names_an_edited_entry() {
    let project = audited_project().await;
    tamper(
        &project,
        "UPDATE audit_log SET actor = 'someone-else' WHERE seq = 3",
    );
    verify_fails(&project, "entry 3").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_verify_names_a_deleted_entry() {
    let project = audited_project().await;
    tamper(&project, "DELETE FROM audit_log WHERE seq = 2");
    verify_fails(&project, "entry 2 is missing").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_verify_names_reordered_entries() {
    let project = audited_project().await;
    // Swap entries 2 and 4 whole (hashes included), keeping the sequence
    // numbers in place.
    tamper(
        &project,
        "UPDATE audit_log SET seq = -2 WHERE seq = 2;
         UPDATE audit_log SET seq = 2 WHERE seq = 4;
         UPDATE audit_log SET seq = 4 WHERE seq = -2;",
    );
    verify_fails(&project, "entry 2").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_verify_names_an_inserted_entry() {
    let project = audited_project().await;
    // Make room after entry 2 and insert a plausible entry that links to
    // entry 2's hash, as an attacker who knows the format would.
    tamper(
        &project,
        "UPDATE audit_log SET seq = seq + 100 WHERE seq > 2;
         UPDATE audit_log SET seq = seq - 99 WHERE seq > 100;
         INSERT INTO audit_log (seq, at, actor, action, subject, details, prev_hash, hash)
           SELECT 3, at, 'cli:root', 'secret.deleted', 's2', '{}', hash, hash FROM audit_log WHERE seq = 2;",
    );
    verify_fails(&project, "entry 3").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redact_paths_mask_fields_before_anything_is_journaled() {
    let rx = Receiver::start().await;
    let project = Project::with_receiver(&rx.base_url);
    project.workflow(
        "pii",
        &format!(
            "name: pii\n{HEAD}trigger:\n  webhook: {{ path: pii }}\nredact: ['.trigger.body.ssn', '.steps.lookup.body.body.card.number']\nsteps:\n  - id: lookup\n    http: {{ connection: rx, method: POST, path: /echo, body: '${{{{ {{card: {{number: ([range(4)] | map(\"4111\") | join(\"\")), brand: \"visa\"}}}} }}}}' }}\n  - id: forward\n    http: {{ connection: rx, method: POST, path: /ok/forward, body: '${{{{ {{ssn: .trigger.body.ssn, card: .steps.lookup.body.body.card}} }}}}' }}\n"
        ),
    );
    let server = project.serve("127.0.0.1:0").await;
    let base = server.base_url.clone();
    let (status, body) = post_json(
        &format!("{base}/hooks/pii"),
        &json!({"name": "Ada", "ssn": "078-05-1120"}),
    )
    .await;
    assert_eq!(status, 202, "{body}");
    let run_id = body["run_id"].as_str().expect("id").to_owned();
    let done = wait_run(&base, &run_id, Duration::from_secs(10)).await;
    assert_eq!(done["run"]["status"], "succeeded", "{done}");
    assert_eq!(done["run"]["trigger"]["body"]["ssn"], "[redacted]");
    assert_eq!(done["run"]["trigger"]["body"]["name"], "Ada");
    let text = done.to_string();
    assert!(!text.contains("078-05-1120"), "{text}");
    assert!(!text.contains("4111411141114111"), "{text}");
    assert!(text.contains("visa"), "unmasked fields stay: {text}");
    // Later steps see what the journal holds, so a resume behaves the same.
    let forward = rx
        .hits()
        .into_iter()
        .find(|h| h.path == "/ok/forward")
        .expect("forwarded");
    assert_eq!(forward.body["ssn"], "[redacted]");
    assert_eq!(forward.body["card"]["number"], "[redacted]");
    assert_eq!(forward.body["card"]["brand"], "visa");
    drop(server);
    for entry in std::fs::read_dir(project.path()).expect("dir") {
        let path = entry.expect("entry").path();
        if path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("plumb.db"))
        {
            let bytes = std::fs::read(&path).expect("read");
            assert_absent("the store", &bytes, "078-05-1120");
            assert_absent("the store", &bytes, "4111411141114111");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_deploys_through_the_api_and_a_rekey_takes_effect_without_a_restart() {
    let rx = Receiver::start().await;
    let project = bearer_project("api", &rx.base_url, "tok");
    let flow = |path: &str| post_workflow("call", "api", path);
    project.workflow("call", &flow("/ok/v1"));
    must_set(&project, "tok", "deploy-test-token").await;
    let operator = project.token("op", "operator").await;
    let server = project.serve("127.0.0.1:0").await;
    let base = server.base_url.clone();
    let deploy = format!("{base}/api/v1/deployments");

    project.workflow("call", &flow("/ok/v2"));
    let (status, _) = call("POST", &deploy, Some(&operator), None).await;
    assert_eq!(status, 403, "an operator cannot deploy");
    let (status, doc) = post_json(&deploy, &json!({})).await;
    assert_eq!(status, 200, "{doc}");
    assert_eq!(doc["changed"], json!(["workflow:call"]), "{doc}");

    // A broken file is refused with every problem; the old version runs on.
    project.workflow("call", "name: call\nsteps: [\n");
    let (status, doc) = post_json(&deploy, &json!({})).await;
    assert_eq!(status, 422, "{doc}");
    assert_eq!(doc["error"]["code"], "invalid_project");
    assert!(
        doc["error"]["diagnostics"][0]["file"]
            .as_str()
            .is_some_and(|f| f.ends_with("call.yaml")),
        "{doc}"
    );
    project.workflow("call", &flow("/ok/v2"));

    // Rekey on the command line, then deploy: the server picks up the new
    // key and every secret still opens.
    let out = project.run(&["secrets", "rekey"]).await;
    assert_eq!(out.code, Some(0), "{out}");
    // Until it reloads, the server holds a retired key and must not seal
    // with it.
    let (status, doc) = post_json(
        &format!("{base}/api/v1/secrets"),
        &json!({"name": "late", "value": "sealed-too-late"}),
    )
    .await;
    assert_eq!(status, 409, "{doc}");
    assert_eq!(doc["error"]["code"], "key_retired", "{doc}");
    let (status, doc) = post_json(&deploy, &json!({})).await;
    assert_eq!(status, 200, "{doc}");
    let (status, doc) = post_json(&format!("{base}/api/v1/workflows/call/runs"), &json!({})).await;
    assert!(status == 200 || status == 202, "{doc}");
    let run_id = doc["run_id"].as_str().expect("run id").to_owned();
    let done = wait_run(&base, &run_id, Duration::from_secs(10)).await;
    assert_eq!(done["run"]["status"], "succeeded", "{done}");
    let hit = rx
        .hits()
        .into_iter()
        .find(|h| h.path == "/ok/v2")
        .expect("the deployed version ran");
    assert_eq!(
        hit.headers.get("authorization").map(String::as_str),
        Some("Bearer deploy-test-token")
    );
    let audit = api_audit(&base).await;
    assert!(
        audit.iter().any(|e| e["action"] == "workflow.deployed"
            && e["subject"] == "call"
            && e["actor"] == "api:tests"),
        "the deployment is audited with who made it: {audit:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_are_checked_set_listed_rotated_live_and_deleted_without_showing_a_value() {
    let rx = Receiver::start().await;
    let project = bearer_project("crm", &rx.base_url, "crm_token");
    project.workflow("sync", &post_workflow("sync", "crm", "/ok/sync"));
    project.workflow(
        "gh",
        &format!(
            "name: gh\n{HEAD}trigger:\n  webhook: {{ path: gh, auth: {{ preset: github, secret: gh_hook }} }}\nsteps:\n  - id: a\n    jq: '1'\n"
        ),
    );
    // `plumb check` names each missing secret, where it is used, and the fix.
    let check = project.run(&["check"]).await;
    assert_eq!(check.code, Some(1), "{check}");
    let text = format!("{}{}", check.stdout, check.stderr);
    assert!(text.contains("plumb.yaml:5:"), "{text}");
    assert!(
        text.contains("`crm_token`") && text.contains("`gh_hook`"),
        "{text}"
    );
    assert!(text.contains("plumb secrets set crm_token"), "{text}");

    must_set(&project, "crm_token", "crm-value-one").await;
    must_set(&project, "gh_hook", "gh-hook-value").await;
    let check = project.run(&["check"]).await;
    assert_eq!(check.code, Some(0), "{check}");
    let again = project.set_secret("crm_token", "other-value").await;
    assert_eq!(again.code, Some(2), "set does not overwrite: {again}");
    assert!(
        again.stderr.contains("plumb secrets rotate crm_token"),
        "{again}"
    );
    let empty = project.set_secret("spare", "").await;
    assert_ne!(empty.code, Some(0), "an empty value is refused: {empty}");
    let short = project.set_secret("spare", "abc").await;
    assert_ne!(
        short.code,
        Some(0),
        "an unredactable value is refused: {short}"
    );
    assert!(short.stderr.contains("shorter than 4"), "{short}");

    let list = project.run(&["secrets", "list", "--json"]).await;
    assert_eq!(list.code, Some(0), "{list}");
    let doc: Value = serde_json::from_str(&list.stdout).expect("json");
    let crm = doc
        .as_array()
        .expect("list")
        .iter()
        .find(|s| s["name"] == "crm_token")
        .expect("listed");
    assert_eq!(crm["used_by"], json!(["connection crm"]), "{doc}");
    let human = project.run(&["secrets", "list"]).await;
    for out in [&list, &human] {
        assert!(!out.stdout.contains("crm-value-one") && !out.stdout.contains("gh-hook-value"));
    }

    // A rotation reaches a running server within seconds.
    let server = project.serve("127.0.0.1:0").await;
    let base = server.base_url.clone();
    let run_now = || async {
        let (status, doc) =
            post_json(&format!("{base}/api/v1/workflows/sync/runs"), &json!({})).await;
        assert!(status == 200 || status == 202, "{doc}");
        let id = doc["run_id"].as_str().expect("run id").to_owned();
        let done = wait_run(&base, &id, Duration::from_secs(10)).await;
        assert_eq!(done["run"]["status"], "succeeded", "{done}");
        rx.hits()
            .last()
            .and_then(|h| h.headers.get("authorization").cloned())
            .expect("authorization sent")
    };
    assert_eq!(run_now().await, "Bearer crm-value-one");
    let rotated = project
        .set_secret_with("rotate", "crm_token", "crm-value-two")
        .await;
    assert_eq!(rotated.code, Some(0), "{rotated}");
    let deadline = Instant::now() + Duration::from_secs(8);
    loop {
        if run_now().await == "Bearer crm-value-two" {
            break;
        }
        assert!(Instant::now() < deadline, "the rotation was not picked up");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    // Deleting a secret in use is refused, unless forced.
    let refused = project.run(&["secrets", "delete", "crm_token"]).await;
    assert_eq!(refused.code, Some(2), "{refused}");
    assert!(
        refused.stderr.contains("connection crm") && refused.stderr.contains("--force"),
        "{refused}"
    );
    let forced = project
        .run(&["secrets", "delete", "crm_token", "--force"])
        .await;
    assert_eq!(forced.code, Some(0), "{forced}");

    let audit = cli_audit(&project).await;
    let actions: Vec<&str> = audit
        .iter()
        .filter(|e| e["subject"] == "crm_token")
        .filter_map(|e| e["action"].as_str())
        .collect();
    assert_eq!(actions, ["secret.set", "secret.rotated", "secret.deleted"]);
    assert!(
        !Value::from(audit).to_string().contains("crm-value"),
        "the audit log holds no value"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_verify_names_entries_deleted_at_the_end() {
    let project = audited_project().await;
    tamper(&project, "DELETE FROM audit_log WHERE seq >= 4");
    verify_fails(&project, "entry 4 is missing").await;
    // Later appends do not paper over the gap: they chain from the head.
    project.token("t2", "viewer").await;
    verify_fails(&project, "entry 4 is missing").await;
    // Deleting the head record along with the last entries is reported too.
    let project = audited_project().await;
    tamper(
        &project,
        "DELETE FROM audit_log WHERE seq = 5; DELETE FROM audit_head;",
    );
    verify_fails(&project, "head record is missing").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_anchor_kept_outside_the_store_catches_a_chain_rewritten_from_scratch() {
    let project = audited_project().await;
    let verify = project.run(&["audit", "verify", "--json"]).await;
    let doc: Value = serde_json::from_str(&verify.stdout).expect("json");
    let anchor = doc["anchor"].as_str().expect("anchor").to_owned();
    assert!(anchor.starts_with("5:"), "{anchor}");

    // An attacker who knows the format rewrites entry 2 and recomputes
    // every hash after it, head included: the chain alone cannot tell.
    let conn = rusqlite::Connection::open(project.store_file()).expect("open");
    let rows: Vec<(i64, i64, String, String, String, String)> = conn
        .prepare("SELECT seq, at, actor, action, subject, details FROM audit_log ORDER BY seq")
        .and_then(|mut st| {
            st.query_map([], |r| {
                Ok((
                    r.get(0)?,
                    r.get(1)?,
                    r.get(2)?,
                    r.get(3)?,
                    r.get(4)?,
                    r.get(5)?,
                ))
            })
            .and_then(Iterator::collect)
        })
        .expect("rows");
    let mut prev = plumb_store::audit::GENESIS.to_owned();
    for (seq, at, actor, action, subject, details) in rows {
        let actor = if seq == 2 {
            "cli:nobody".to_owned()
        } else {
            actor
        };
        let details: Value = serde_json::from_str(&details).expect("details");
        let hash =
            plumb_store::audit::entry_hash(&prev, seq, at, &actor, &action, &subject, &details);
        conn.execute(
            "UPDATE audit_log SET actor = ?1, prev_hash = ?2, hash = ?3 WHERE seq = ?4",
            rusqlite::params![actor, prev, hash, seq],
        )
        .expect("rewrite");
        conn.execute(
            "UPDATE audit_head SET seq = ?1, hash = ?2",
            rusqlite::params![seq, hash],
        )
        .expect("head");
        prev = hash;
    }
    drop(conn);
    let fooled = project.run(&["audit", "verify"]).await;
    assert_eq!(
        fooled.code,
        Some(0),
        "without an anchor a full rewrite passes (SECURITY.md says so): {fooled}"
    );
    let out = project.run(&["audit", "verify", "--anchor", &anchor]).await;
    assert_eq!(out.code, Some(1), "{out}");
    assert!(
        out.stderr.contains("entry 5") && out.stderr.contains("rewritten"),
        "{out}"
    );
    let bad = project.run(&["audit", "verify", "--anchor", "5:xyz"]).await;
    assert_eq!(
        bad.code,
        Some(2),
        "a malformed anchor is a usage error: {bad}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plumb_run_of_an_undeployed_version_is_audited_and_deployments_stay_with_serve() {
    let project = Project::new("defaults:\n  retry: { attempts: 1 }\n");
    let flow =
        |n: u32| format!("name: w\n{HEAD}trigger: manual\nsteps:\n  - id: a\n    jq: '{n}'\n");
    project.workflow("w", &flow(1));
    let entries = |all: &[Value], action: &str| -> Vec<Value> {
        all.iter()
            .filter(|e| e["action"] == action && e["subject"] == "w")
            .cloned()
            .collect()
    };
    // serve deploys version 1.
    let server = project.serve("127.0.0.1:0").await;
    assert_eq!(server.stop().await, Some(0));
    let out = project.run(&["run", "w"]).await;
    assert_eq!(out.code, Some(0), "{out}");
    let audit = cli_audit(&project).await;
    assert_eq!(entries(&audit, "workflow.deployed").len(), 1);
    assert!(
        entries(&audit, "workflow.run_undeployed").is_empty(),
        "running the deployed version is not news"
    );
    // An edited file run by hand is audited with who ran it.
    project.workflow("w", &flow(2));
    let out = project.run(&["run", "w"]).await;
    assert_eq!(out.code, Some(0), "{out}");
    let audit = cli_audit(&project).await;
    let manual = entries(&audit, "workflow.run_undeployed");
    assert_eq!(manual.len(), 1, "{manual:?}");
    assert!(
        manual[0]["actor"]
            .as_str()
            .is_some_and(|a| a.starts_with("cli:") && a.ends_with("(plumb run)")),
        "{manual:?}"
    );
    assert!(manual[0]["details"]["deployed_version"].is_string());
    // The next start of serve still deploys (and audits) version 2.
    let server = project.serve("127.0.0.1:0").await;
    assert_eq!(server.stop().await, Some(0));
    let audit = cli_audit(&project).await;
    assert_eq!(entries(&audit, "workflow.deployed").len(), 2);
}

/// Vendor-SDK signatures without a signed timestamp still verify at any
/// time, so they can go through a real server end to end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn github_and_shopify_deliveries_signed_by_their_sdks_are_accepted_by_a_real_server() {
    let vectors: Vec<Value> = serde_json::from_str(include_str!(
        "../../plumb-server/tests/fixtures/webhook-signatures/vectors.json"
    ))
    .expect("vectors");
    let project = Project::new("defaults:\n  retry: { attempts: 1 }\n");
    for preset in ["github", "shopify"] {
        project.workflow(
            preset,
            &format!(
                "name: {preset}\n{HEAD}trigger:\n  webhook: {{ path: {preset}, auth: {{ preset: {preset}, secret: {preset}_secret }} }}\nsteps:\n  - id: a\n    jq: '.trigger.body'\n"
            ),
        );
        let v = vectors
            .iter()
            .find(|v| v["preset"] == preset)
            .expect("vector");
        must_set(
            &project,
            &format!("{preset}_secret"),
            v["secret"].as_str().expect("secret"),
        )
        .await;
    }
    let server = project.serve("127.0.0.1:0").await;
    let base = server.base_url.clone();
    for preset in ["github", "shopify"] {
        let v = vectors
            .iter()
            .find(|v| v["preset"] == preset)
            .expect("vector");
        let body = v["body"].as_str().expect("body");
        let headers: Vec<(&str, String)> = v["headers"]
            .as_object()
            .expect("headers")
            .iter()
            .map(|(k, val)| (k.as_str(), val.as_str().expect("value").to_owned()))
            .collect();
        let hook = format!("{base}/hooks/{preset}");
        let (status, doc) = post_raw(&hook, body, &headers).await;
        assert_eq!(status, 202, "{preset}: {doc}");
        let run_id = doc["run_id"].as_str().expect("run id").to_owned();
        let done = wait_run(&base, &run_id, Duration::from_secs(10)).await;
        assert_eq!(done["run"]["status"], "succeeded", "{done}");
        let sent: Value = serde_json::from_str(body).expect("body");
        assert_eq!(
            done["run"]["trigger"]["body"], sent,
            "the raw body was parsed as sent"
        );
        let tampered = body.replacen('{', "{ ", 1);
        let (status, doc) = post_raw(&hook, &tampered, &headers).await;
        assert_eq!(status, 401, "{preset}: {doc}");
        assert_eq!(runs_of(&base, preset).await.len(), 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_reports_a_credential_in_plumb_yaml_once_without_repeating_it() {
    let project = Project::new(
        "connections:\n  crm:\n    http:\n      base_url: https://api.example.com\n      headers: { Authorization: 'Bearer abcdef123456789' }\n",
    );
    let out = project.run(&["check"]).await;
    assert_eq!(out.code, Some(1), "{out}");
    let text = format!("{}{}", out.stdout, out.stderr);
    assert_eq!(text.matches("plumb.yaml:5:").count(), 1, "{text}");
    assert!(!text.contains("abcdef123456789"), "{text}");
    assert!(text.contains("plumb secrets set NAME"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_plumb_token_the_cli_uses_the_proven_server_and_never_an_impostor() {
    // A real server: `cancel` goes through its API, audited as the token.
    let port = support::free_port();
    let project = Project::new(&format!(
        "listen: 127.0.0.1:{port}\ndefaults:\n  retry: {{ attempts: 1 }}\n"
    ));
    project.workflow(
        "nap",
        &format!("name: nap\n{HEAD}trigger:\n  webhook: {{ path: nap }}\nsteps:\n  - id: z\n    sleep: 30s\n"),
    );
    let token = project.admin_token().await;
    let server = project.serve(&format!("127.0.0.1:{port}")).await;
    let base = server.base_url.clone();
    let (status, doc) = post_json(&format!("{base}/hooks/nap"), &json!({})).await;
    assert_eq!(status, 202, "{doc}");
    let run_id = doc["run_id"].as_str().expect("run id").to_owned();
    let out = project
        .cmd(&["cancel", &run_id])
        .env("PLUMB_TOKEN", &token)
        .output()
        .await
        .expect("cancel");
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cancelled = api_audit(&base)
        .await
        .into_iter()
        .find(|e| e["action"] == "run.cancelled")
        .expect("audited");
    assert_eq!(
        cancelled["actor"], "api:tests",
        "through the API: {cancelled}"
    );
    assert_eq!(server.stop().await, Some(0));

    // An impostor on the same port answers /healthz with the right store
    // id but cannot prove it: the CLI never sends it the token.
    let store_location = std::fs::canonicalize(project.store_file())
        .expect("store")
        .display()
        .to_string();
    let seen: std::sync::Arc<std::sync::Mutex<Vec<(String, bool)>>> = Default::default();
    let app = {
        let seen = std::sync::Arc::clone(&seen);
        let store_id = plumb_server::store_id(&store_location);
        axum::Router::new().fallback(move |req: axum::extract::Request| {
            let seen = std::sync::Arc::clone(&seen);
            let store_id = store_id.clone();
            async move {
                let auth = req.headers().contains_key("authorization");
                seen.lock()
                    .expect("lock")
                    .push((req.uri().path().to_owned(), auth));
                axum::Json(
                    json!({"status": "ok", "service": "plumb", "store": store_id, "proof": "00"}),
                )
            }
        })
    };
    let listener = tokio::net::TcpListener::bind(format!("127.0.0.1:{port}"))
        .await
        .expect("bind the impostor");
    tokio::spawn(async move { axum::serve(listener, app).await });
    let out = project
        .cmd(&["status"])
        .env("PLUMB_TOKEN", &token)
        .output()
        .await
        .expect("status");
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let seen = seen.lock().expect("lock").clone();
    assert!(
        seen.iter().any(|(path, _)| path == "/healthz"),
        "the CLI did probe: {seen:?}"
    );
    assert!(
        seen.iter().all(|(path, auth)| path == "/healthz" && !auth),
        "the impostor got a token or an API call: {seen:?}"
    );
}
