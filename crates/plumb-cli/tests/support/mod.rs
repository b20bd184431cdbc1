//! Shared test support: a temporary project, the real `plumb` binary, and a
//! local HTTP receiver that records every request by `Idempotency-Key`.

#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use serde_json::{Value, json};

/// The `plumb` binary built for this test run.
pub fn plumb_bin() -> &'static str {
    env!("CARGO_BIN_EXE_plumb")
}

/// A project in a temporary directory.
pub struct Project {
    pub dir: tempfile::TempDir,
    admin_token: std::sync::OnceLock<String>,
}

/// The API token for each started server's base URL, so the JSON helpers
/// below authenticate to `/api/v1` the way a real operator would.
static TOKENS: Mutex<Vec<(String, String)>> = Mutex::new(Vec::new());

fn token_for(url: &str) -> Option<String> {
    let tokens = TOKENS.lock().unwrap_or_else(|e| e.into_inner());
    tokens
        .iter()
        .find(|(base, _)| url.starts_with(base.as_str()))
        .map(|(_, token)| token.clone())
}

impl Project {
    /// A project whose `plumb.yaml` is `config`.
    pub fn new(config: &str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(dir.path().join("workflows")).expect("workflows dir");
        std::fs::write(dir.path().join("plumb.yaml"), config).expect("write plumb.yaml");
        Self {
            dir,
            admin_token: std::sync::OnceLock::new(),
        }
    }

    /// An admin API token for this project, created once through the CLI.
    pub async fn admin_token(&self) -> String {
        if let Some(token) = self.admin_token.get() {
            return token.clone();
        }
        let out = self
            .run(&[
                "tokens", "create", "--name", "tests", "--role", "admin", "--json",
            ])
            .await;
        assert_eq!(out.code, Some(0), "tokens create failed: {out}");
        let doc: Value = serde_json::from_str(&out.stdout).expect("tokens create --json");
        let token = doc["token"].as_str().expect("token").to_owned();
        self.admin_token.get_or_init(|| token).clone()
    }

    /// Creates a token with `role` and returns it.
    pub async fn token(&self, name: &str, role: &str) -> String {
        let out = self
            .run(&["tokens", "create", "--name", name, "--role", role, "--json"])
            .await;
        assert_eq!(out.code, Some(0), "tokens create failed: {out}");
        let doc: Value = serde_json::from_str(&out.stdout).expect("tokens create --json");
        doc["token"].as_str().expect("token").to_owned()
    }

    /// A project with one http connection `rx` to `base_url`.
    pub fn with_receiver(base_url: &str) -> Self {
        Self::new(&format!(
            "connections:\n  rx:\n    http:\n      base_url: {base_url}\n      timeout: 10s\ndefaults:\n  retry: {{ attempts: 3, initial: 100ms, max: 2s }}\n"
        ))
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Writes `workflows/<name>.yaml`.
    pub fn workflow(&self, name: &str, text: &str) -> PathBuf {
        let path = self
            .dir
            .path()
            .join("workflows")
            .join(format!("{name}.yaml"));
        std::fs::write(&path, text).expect("write workflow");
        path
    }

    /// A `plumb` command in this project.
    pub fn cmd(&self, args: &[&str]) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(plumb_bin());
        cmd.arg("--project").arg(self.dir.path()).args(args);
        cmd.env("NO_COLOR", "1").env_remove("PLUMB_PROJECT");
        cmd.kill_on_drop(true);
        cmd
    }

    /// Runs `plumb` to completion.
    pub async fn run(&self, args: &[&str]) -> Output {
        let out = self.cmd(args).output().await.expect("run plumb");
        Output {
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Starts `plumb` in the background and waits for the run id, which is
    /// printed before any step executes.
    pub async fn start(&self, args: &[&str]) -> Started {
        let mut child = self
            .cmd(args)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("spawn plumb");
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = tokio::io::BufReader::new(stdout);
        let mut first = String::new();
        tokio::io::AsyncBufReadExt::read_line(&mut lines, &mut first)
            .await
            .expect("read the first line");
        Started {
            run_id: run_id_of(&first),
            child,
            stdout: lines,
        }
    }

    /// `plumb secrets set NAME`, the value on stdin as a user would pipe it.
    pub async fn set_secret(&self, name: &str, value: &str) -> Output {
        self.set_secret_with("set", name, value).await
    }

    /// `plumb secrets <verb> NAME` (`set` or `rotate`), the value on stdin.
    pub async fn set_secret_with(&self, verb: &str, name: &str, value: &str) -> Output {
        use tokio::io::AsyncWriteExt;
        let mut child = self
            .cmd(&["secrets", verb, name])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn plumb secrets set");
        let mut stdin = child.stdin.take().expect("stdin");
        stdin
            .write_all(value.as_bytes())
            .await
            .expect("write stdin");
        drop(stdin);
        let out = child.wait_with_output().await.expect("secrets set");
        Output {
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// The SQLite store file (`plumb.db` unless plumb.yaml says otherwise).
    pub fn store_file(&self) -> PathBuf {
        self.dir.path().join("plumb.db")
    }

    /// `plumb runs show ID --json`.
    pub async fn show(&self, run_id: &str) -> Value {
        let out = self.run(&["runs", "show", run_id, "--json"]).await;
        assert_eq!(out.code, Some(0), "runs show failed: {out}");
        serde_json::from_str(&out.stdout).expect("runs show --json is JSON")
    }
}

/// A `plumb run` still running.
pub struct Started {
    pub run_id: String,
    pub child: tokio::process::Child,
    pub stdout: tokio::io::BufReader<tokio::process::ChildStdout>,
}

impl Started {
    /// The rest of stdout, once the process has exited.
    pub async fn rest(&mut self) -> String {
        let mut rest = String::new();
        tokio::io::AsyncReadExt::read_to_string(&mut self.stdout, &mut rest)
            .await
            .expect("read stdout");
        rest
    }
}

/// A finished `plumb` process.
pub struct Output {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl std::fmt::Display for Output {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {:?}\n--- stdout\n{}\n--- stderr\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

/// The run id from `plumb run` output (first line: `run <id> · …`).
pub fn run_id_of(stdout: &str) -> String {
    stdout
        .lines()
        .find_map(|l| {
            l.strip_prefix("run ")
                .or_else(|| l.strip_prefix("resuming run "))
        })
        .and_then(|rest| rest.split_whitespace().next())
        .expect("a `run <id>` line")
        .to_owned()
}

/// One request the receiver got.
#[derive(Clone, Debug)]
pub struct Hit {
    pub path: String,
    pub key: Option<String>,
    pub at: Instant,
    pub body: Value,
    pub headers: HashMap<String, String>,
    pub query: HashMap<String, String>,
}

#[derive(Default)]
struct Inner {
    /// `/kill` SIGKILLs this process.
    victim: Option<u32>,
    hits: Vec<Hit>,
    /// Requests seen so far per (path, key), for scripted failures.
    seen: HashMap<(String, String), u32>,
    in_flight: u32,
    max_in_flight: u32,
    /// `/feed` serves records `0..feed`.
    feed: usize,
    /// `/feed` answers 503 while set.
    feed_down: bool,
}

/// A local HTTP receiver. Routes (all methods):
/// * `/ok/<name>`: 200 `{"ok": true, "key": …}` after `?delay_ms=` ms;
/// * `/flaky/<status>/<n>`: answers `<status>` with `Retry-After: 1` to the
///   first `n` requests of each idempotency key, then 200;
/// * `/status/<code>`: always answers `<code>` with a JSON error body;
/// * `/text`: 200 with a `text/plain` body (a proxy's maintenance page);
/// * `/echo`: 200 with the request body and headers, and the request's
///   `Authorization` in `X-Echo-Authorization`;
/// * `/echo-fail/<code>[?pad=N]`: answers `<code>` with the request's
///   `Authorization` in the error message, after N filler characters;
/// * `/redirect?to=URL`: 302 to `URL`;
/// * `/deep/<n>`: 200 with a JSON document nested `n` levels deep;
/// * `/kill`: SIGKILLs the process named by [`Receiver::set_victim`] (the
///   plumb executing the step), then answers 200 to no one;
/// * `/pages/<style>`: a paginated API over `?total=` records (default
///   250) `{id, name}`, 100 per page (`?limit=`), in the four styles people
///   meet (see [`page_of`]); `?kill_at=<page index>` SIGKILLs the victim
///   the first time that page is asked for (by idempotency key);
/// * `/feed[?since=N]`: `{items: [{id, name}, …]}`, the records set by
///   [`Receiver::set_feed`] from id N on; 503 while
///   [`Receiver::set_feed_down`].
#[derive(Clone)]
pub struct Receiver {
    inner: Arc<Mutex<Inner>>,
    pub base_url: String,
}

impl Receiver {
    pub async fn start() -> Self {
        Self::start_on("127.0.0.1").await
    }

    /// A receiver on another loopback address (`127.0.0.2`): another host
    /// as far as a URL's origin is concerned.
    pub async fn start_on(ip: &str) -> Self {
        let inner = Arc::new(Mutex::new(Inner::default()));
        let app = Router::new()
            .route("/{*rest}", any(handle))
            .with_state(Arc::clone(&inner));
        let listener = tokio::net::TcpListener::bind(format!("{ip}:0"))
            .await
            .expect("bind receiver");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move { axum::serve(listener, app).await });
        Self {
            inner,
            base_url: format!("http://{addr}"),
        }
    }

    pub fn hits(&self) -> Vec<Hit> {
        self.inner.lock().expect("lock").hits.clone()
    }

    pub fn max_in_flight(&self) -> u32 {
        self.inner.lock().expect("lock").max_in_flight
    }

    pub fn clear(&self) {
        let mut inner = self.inner.lock().expect("lock");
        *inner = Inner::default();
    }

    /// `/feed` serves records `0..n` from now on.
    pub fn set_feed(&self, n: usize) {
        self.inner.lock().expect("lock").feed = n;
    }

    /// `/feed` answers 503 while `down`.
    pub fn set_feed_down(&self, down: bool) {
        self.inner.lock().expect("lock").feed_down = down;
    }

    /// The process `/kill` kills.
    pub fn set_victim(&self, pid: Option<u32>) {
        self.inner.lock().expect("lock").victim = pid;
    }
}

struct InFlight(Arc<Mutex<Inner>>);

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Ok(mut inner) = self.0.lock() {
            inner.in_flight -= 1;
        }
    }
}

async fn handle(
    State(inner): State<Arc<Mutex<Inner>>>,
    UrlPath(rest): UrlPath<String>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: String,
) -> Response {
    let key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body: Value = serde_json::from_str(&body).unwrap_or(Value::String(body));
    let header_map: HashMap<String, String> = headers
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_owned(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let path = format!("/{rest}");
    let count = {
        let mut i = inner.lock().expect("lock");
        i.hits.push(Hit {
            path: path.clone(),
            key: key.clone(),
            at: Instant::now(),
            body: body.clone(),
            headers: header_map.clone(),
            query: query.clone(),
        });
        i.in_flight += 1;
        i.max_in_flight = i.max_in_flight.max(i.in_flight);
        let c = i
            .seen
            .entry((path.clone(), key.clone().unwrap_or_default()))
            .or_insert(0);
        *c += 1;
        *c
    };
    let _guard = InFlight(Arc::clone(&inner));
    if let Some(ms) = query.get("delay_ms").and_then(|v| v.parse::<u64>().ok()) {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let parts: Vec<&str> = rest.split('/').collect();
    match parts.as_slice() {
        ["ok", ..] => axum::Json(json!({"ok": true, "key": key, "path": path})).into_response(),
        ["flaky", status, n] => {
            let status: u16 = status.parse().unwrap_or(503);
            let n: u32 = n.parse().unwrap_or(2);
            if count <= n {
                (
                    StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE),
                    [(header::RETRY_AFTER, "1")],
                    axum::Json(json!({"error": "try later", "attempt": count})),
                )
                    .into_response()
            } else {
                axum::Json(json!({"ok": true, "attempt": count})).into_response()
            }
        }
        ["status", code] => {
            let code: u16 = code.parse().unwrap_or(500);
            (
                StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
                axum::Json(json!({"error": "invalid order: field `total` is required"})),
            )
                .into_response()
        }
        ["text"] => "down for maintenance".into_response(),
        ["echo"] => {
            // Echoes the credential back in a response header too, as some
            // upstreams do in debug modes.
            let auth = header_map.get("authorization").cloned().unwrap_or_default();
            (
                [("x-echo-authorization", auth)],
                axum::Json(json!({"body": body, "headers": header_map})),
            )
                .into_response()
        }
        ["echo-fail", code] => {
            let code: u16 = code.parse().unwrap_or(400);
            let auth = header_map.get("authorization").cloned().unwrap_or_default();
            // `?pad=N` puts N characters first, to move the credential to
            // where an error message is cut.
            let pad = "x".repeat(query.get("pad").and_then(|p| p.parse().ok()).unwrap_or(0));
            (
                StatusCode::from_u16(code).unwrap_or(StatusCode::BAD_REQUEST),
                axum::Json(json!({"error": format!("{pad}rejected credential {auth}")})),
            )
                .into_response()
        }
        ["deep", n] => {
            let n: usize = n.parse().unwrap_or(1);
            let text = "[".repeat(n) + &"]".repeat(n);
            ([(header::CONTENT_TYPE, "application/json")], text).into_response()
        }
        ["kill"] => {
            let victim = inner.lock().expect("lock").victim;
            if let Some(pid) = victim {
                let _ = std::process::Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .status();
            }
            axum::Json(json!({"killed": victim})).into_response()
        }
        ["feed"] => {
            let (total, down) = {
                let i = inner.lock().expect("lock");
                (i.feed, i.feed_down)
            };
            if down {
                return (
                    StatusCode::SERVICE_UNAVAILABLE,
                    axum::Json(json!({"error": "feed down"})),
                )
                    .into_response();
            }
            let since = query
                .get("since")
                .and_then(|s| s.parse::<usize>().ok())
                .unwrap_or(0);
            axum::Json(json!({"items": page_records(since.min(total), total)})).into_response()
        }
        ["pages", style] => {
            let Some((index, page)) = page_of(style, &query) else {
                return (StatusCode::BAD_REQUEST, "bad page request").into_response();
            };
            if count == 1 && query.get("kill_at").and_then(|k| k.parse().ok()) == Some(index) {
                let victim = inner.lock().expect("lock").victim;
                if let Some(pid) = victim {
                    let _ = std::process::Command::new("kill")
                        .args(["-KILL", &pid.to_string()])
                        .status();
                }
            }
            page
        }
        ["redirect"] => {
            let to = query.get("to").cloned().unwrap_or_default();
            (StatusCode::FOUND, [(header::LOCATION, to)]).into_response()
        }
        _ => (StatusCode::NOT_FOUND, "no such route").into_response(),
    }
}

/// The records of the paginated mock API.
pub fn page_records(from: usize, to: usize) -> Vec<Value> {
    (from..to)
        .map(|i| json!({"id": i, "name": format!("record {i}")}))
        .collect()
}

/// One page of `/pages/<style>` and its index (from 0):
/// * `number`: `?page=N` (from 1) → `{items, page}`;
/// * `cursor`: `?cursor=<opaque>` → `{data, next_cursor}` (null at the end);
/// * `offset`: `?offset=O&limit=L` → `{items, total}`;
/// * `link`: `?page=N` → `{items}` with `Link: <…>; rel="next"` (relative,
///   GitHub style) until the last page.
///
/// `?since=N` starts at record N (a watermark), in every style.
pub fn page_of(style: &str, query: &HashMap<String, String>) -> Option<(usize, Response)> {
    let number = |name: &str, default: usize| -> Option<usize> {
        query.get(name).map_or(Some(default), |v| v.parse().ok())
    };
    let total = number("total", 250)?;
    let limit = number("limit", 100)?.clamp(1, 1000);
    // `?since=N`: only records from id N on (a watermark).
    let since = number("since", 0)?;
    let offset = since
        + match style {
            "number" | "link" => (number("page", 1)?.max(1) - 1) * limit,
            "offset" => number("offset", 0)?,
            "cursor" => match query.get("cursor") {
                None => 0,
                // Opaque to the client: the offset, reversed and prefixed.
                Some(c) => c
                    .strip_prefix("cur_")?
                    .chars()
                    .rev()
                    .collect::<String>()
                    .parse::<usize>()
                    .ok()?
                    .checked_sub(since)?,
            },
            _ => return None,
        };
    let end = (offset + limit).min(total);
    let items = page_records(offset.min(end), end);
    let index = (offset - since) / limit;
    let more = end < total;
    let response = match style {
        "number" => axum::Json(json!({"items": items, "page": index + 1})).into_response(),
        "offset" => axum::Json(json!({"items": items, "total": total})).into_response(),
        "cursor" => {
            let next =
                more.then(|| format!("cur_{}", end.to_string().chars().rev().collect::<String>()));
            axum::Json(json!({"data": items, "next_cursor": next})).into_response()
        }
        _ => {
            let mut link = format!("</pages/link?page=1&total={total}>; rel=\"first\"");
            if more {
                link = format!(
                    "</pages/link?page={}&total={total}>; rel=\"next\", {link}",
                    index + 2
                );
            }
            ([(header::LINK, link)], axum::Json(json!({"items": items}))).into_response()
        }
    };
    Some((index, response))
}

/// The first line a started `plumb` prints (what it listens on), within
/// 20 s, and the rest of its stdout.
pub async fn first_line(
    child: &mut tokio::process::Child,
) -> (String, tokio::io::BufReader<tokio::process::ChildStdout>) {
    let stdout = child.stdout.take().expect("stdout is piped");
    let mut reader = tokio::io::BufReader::new(stdout);
    let mut first = String::new();
    tokio::time::timeout(
        Duration::from_secs(20),
        tokio::io::AsyncBufReadExt::read_line(&mut reader, &mut first),
    )
    .await
    .expect("plumb starts within 20 s")
    .expect("read the first line");
    (first, reader)
}

/// A `plumb serve` (or `plumb worker`) process.
pub struct Server {
    pub child: tokio::process::Child,
    pub base_url: String,
    pub stdout: tokio::io::BufReader<tokio::process::ChildStdout>,
}

impl Project {
    /// Starts `plumb serve --listen ADDR` and waits until it listens.
    pub async fn serve(&self, listen: &str) -> Server {
        self.serve_with_env(listen, &[]).await
    }

    /// Like [`Project::serve`], with extra environment variables.
    pub async fn serve_with_env(&self, listen: &str, env: &[(&str, &str)]) -> Server {
        let token = self.admin_token().await;
        let mut cmd = self.cmd(&["serve", "--listen", listen]);
        cmd.envs(env.iter().copied());
        let mut child = cmd
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("spawn plumb serve");
        let (first, reader) = first_line(&mut child).await;
        let base_url = first
            .split_whitespace()
            .find(|w| w.starts_with("http://"))
            .unwrap_or_else(|| panic!("no address in {first:?}"))
            .to_owned();
        {
            let mut tokens = TOKENS.lock().unwrap_or_else(|e| e.into_inner());
            tokens.retain(|(base, _)| base != &base_url);
            tokens.push((base_url.clone(), token));
        }
        Server {
            child,
            base_url,
            stdout: reader,
        }
    }

    /// Starts `plumb worker`.
    pub async fn worker(&self) -> tokio::process::Child {
        let mut child = self
            .cmd(&["worker"])
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn plumb worker");
        let (first, mut reader) = first_line(&mut child).await;
        assert!(first.contains("worker started"), "{first}");
        // Keep draining so the worker never blocks on a full pipe.
        tokio::spawn(async move {
            let mut sink = tokio::io::sink();
            let _ = tokio::io::copy(&mut reader, &mut sink).await;
        });
        child
    }
}

impl Server {
    /// Sends a signal by name (`TERM`, `HUP`, `STOP`, `CONT`, `KILL`).
    pub fn signal(&self, name: &str) {
        let pid = self.child.id().expect("running").to_string();
        let ok = std::process::Command::new("kill")
            .args([&format!("-{name}"), &pid])
            .status()
            .expect("kill");
        assert!(ok.success(), "kill -{name} {pid}");
    }

    /// SIGKILL and reap.
    pub async fn kill(mut self) {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
    }

    /// SIGTERM, and the exit code once it stopped.
    pub async fn stop(mut self) -> Option<i32> {
        self.signal("TERM");
        let status = tokio::time::timeout(Duration::from_secs(20), self.child.wait())
            .await
            .expect("stops within 20 s after SIGTERM")
            .expect("wait");
        status.code()
    }
}

/// The server's `/metrics` text.
pub async fn metrics(base: &str) -> String {
    http()
        .get(format!("{base}/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text")
}

/// A JSON HTTP client for the tests.
pub fn http() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client")
}

/// POSTs JSON; returns status and body.
pub async fn post_json(url: &str, body: &Value) -> (u16, Value) {
    let mut req = http().post(url).json(body);
    if let Some(token) = token_for(url) {
        req = req.bearer_auth(token);
    }
    let r = req.send().await.expect("request");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// GETs JSON.
pub async fn get_json(url: &str) -> Value {
    let mut req = http().get(url);
    if let Some(token) = token_for(url) {
        req = req.bearer_auth(token);
    }
    req.send()
        .await
        .expect("request")
        .json()
        .await
        .expect("json body")
}

/// GETs JSON, or `None` when the server does not answer (it is being
/// killed or restarted).
pub async fn try_get_json(url: &str) -> Option<Value> {
    let mut req = http().get(url);
    if let Some(token) = token_for(url) {
        req = req.bearer_auth(token);
    }
    req.send().await.ok()?.json().await.ok()
}

/// Polls `GET /api/v1/runs/{id}` until the run has ended.
pub async fn wait_run(base: &str, run_id: &str, within: Duration) -> Value {
    let deadline = Instant::now() + within;
    loop {
        let doc = get_json(&format!("{base}/api/v1/runs/{run_id}")).await;
        let status = doc["run"]["status"].as_str().unwrap_or("");
        if matches!(status, "succeeded" | "failed" | "cancelled") {
            return doc;
        }
        assert!(
            Instant::now() < deadline,
            "run {run_id} still {status} after {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A free loopback port (bound and released).
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

/// CPU time (user + system) a process has used so far.
pub fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("read /proc stat");
    let after_name = &stat[stat.rfind(')').expect("stat format") + 2..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // Fields 14 and 15 (utime, stime) are the 12th and 13th after the name.
    let ticks: u64 =
        fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime");
    let hz = std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(100);
    Duration::from_micros(ticks * 1_000_000 / hz)
}

/// A JSON array nested `depth` levels deep, as text.
pub fn nested_json(depth: usize) -> String {
    "[".repeat(depth) + &"]".repeat(depth)
}

/// POSTs raw bytes with a content type; returns status and JSON body.
pub async fn post_raw(url: &str, content_type: &str, body: Vec<u8>) -> (u16, Value) {
    let mut req = http()
        .post(url)
        .header("content-type", content_type)
        .body(body);
    if let Some(token) = token_for(url) {
        req = req.bearer_auth(token);
    }
    let r = req.send().await.expect("request");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// Webhook senders that behave like real ones: each event is posted until
/// it gets a `202`, whatever happens to the server meanwhile.
pub struct Senders {
    /// Event number → the run id its `202` named.
    pub acked: Arc<Mutex<HashMap<usize, String>>>,
    /// Sends that were refused or aborted (and retried).
    pub refused: Arc<std::sync::atomic::AtomicUsize>,
    handles: Vec<tokio::task::JoinHandle<()>>,
}

impl Senders {
    /// Starts `concurrency` senders posting events `0..events` to `hook` as
    /// `{"event": "e-N", "n": N}`.
    pub fn start(hook: &str, events: usize, concurrency: usize) -> Self {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let next = Arc::new(AtomicUsize::new(0));
        let acked: Arc<Mutex<HashMap<usize, String>>> = Arc::default();
        let refused = Arc::new(AtomicUsize::new(0));
        let mut handles = Vec::new();
        for _ in 0..concurrency {
            let (next, acked, refused, hook) = (
                Arc::clone(&next),
                Arc::clone(&acked),
                Arc::clone(&refused),
                hook.to_owned(),
            );
            handles.push(tokio::spawn(async move {
                let client = http();
                loop {
                    let n = next.fetch_add(1, Ordering::SeqCst);
                    if n >= events {
                        return;
                    }
                    loop {
                        let sent = client
                            .post(&hook)
                            .json(&json!({"event": format!("e-{n}"), "n": n}))
                            .timeout(Duration::from_secs(10))
                            .send()
                            .await;
                        match sent {
                            Ok(r) if r.status().as_u16() == 202 => {
                                let body: Value = r.json().await.unwrap_or(Value::Null);
                                let id = body["run_id"]
                                    .as_str()
                                    .expect("202 carries a run id")
                                    .to_owned();
                                acked.lock().expect("lock").insert(n, id);
                                break;
                            }
                            Ok(r) => {
                                assert!(
                                    !r.status().is_success(),
                                    "a 2xx other than 202: {}",
                                    r.status()
                                );
                                refused.fetch_add(1, Ordering::SeqCst);
                            }
                            Err(_) => {
                                refused.fetch_add(1, Ordering::SeqCst);
                            }
                        }
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            }));
        }
        Self {
            acked,
            refused,
            handles,
        }
    }

    /// How many events were acknowledged so far.
    pub fn acked_count(&self) -> usize {
        self.acked.lock().expect("lock").len()
    }

    /// Waits until at least `n` events are acknowledged (or `within` ends).
    pub async fn wait_acked(&self, n: usize, within: Duration) {
        let deadline = Instant::now() + within;
        while self.acked_count() < n && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Waits for every sender; returns event number → run id.
    pub async fn finish(self) -> HashMap<usize, String> {
        for h in self.handles {
            h.await.expect("sender");
        }
        self.acked.lock().expect("lock").clone()
    }
}

/// What the receiver got for acknowledged runs whose step `step` POSTed
/// with the key `<run_id>:<step>`: the acknowledged events with no
/// delivery, the re-sends of an acknowledged key (an in-flight step sent
/// again with its key), and the keys of runs no `202` named (a sender's
/// answer lost in a kill; the sender sent the event again).
pub fn deliveries(
    rx: &Receiver,
    acked: &HashMap<usize, String>,
    step: &str,
) -> (Vec<usize>, usize, usize) {
    let suffix = format!(":{step}");
    let mut per_key: HashMap<String, usize> = HashMap::new();
    for h in rx.hits() {
        let key = h.key.clone().expect("key");
        if key.ends_with(&suffix) {
            *per_key.entry(key).or_default() += 1;
        }
    }
    let acked_keys: std::collections::HashSet<String> =
        acked.values().map(|r| format!("{r}:{step}")).collect();
    let missing = acked
        .iter()
        .filter(|(_, run)| !per_key.contains_key(&format!("{run}:{step}")))
        .map(|(n, _)| *n)
        .collect();
    let resent = per_key
        .iter()
        .filter(|(k, _)| acked_keys.contains(*k))
        .map(|(_, n)| n - 1)
        .sum();
    let unacked = per_key.keys().filter(|k| !acked_keys.contains(*k)).count();
    (missing, resent, unacked)
}

/// libfaketime, when installed (the retention and clock tests need it;
/// `.ci/run` installs it). Preloaded into `plumb` directly rather than
/// through the `faketime` program, which would run plumb as its child: a
/// SIGKILL of the process the test started must reach plumb itself.
pub fn faketime_lib() -> Option<PathBuf> {
    let arch = std::env::consts::ARCH;
    [
        format!("/usr/lib/{arch}-linux-gnu/faketime/libfaketime.so.1"),
        "/usr/lib/faketime/libfaketime.so.1".to_owned(),
        "/usr/local/lib/faketime/libfaketime.so.1".to_owned(),
    ]
    .into_iter()
    .map(PathBuf::from)
    .find(|p| p.is_file())
}

/// Whether a wall clock can be moved for a `plumb` process here.
pub fn faketime_works() -> bool {
    faketime_lib().is_some()
}

/// `plumb --project DIR ARGS` with its wall clock moved by `offset`
/// (faketime's `+1h`, `-40d`); its monotonic clock (timers) is left alone.
pub fn plumb_at(project: &Path, offset: &str, args: &[&str]) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(plumb_bin());
    cmd.arg("--project")
        .arg(project)
        .args(args)
        .env("LD_PRELOAD", faketime_lib().unwrap_or_default())
        .env("FAKETIME", offset)
        .env("DONT_FAKE_MONOTONIC", "1")
        .env("NO_COLOR", "1")
        .kill_on_drop(true);
    cmd
}

impl Project {
    /// Starts `plumb serve --listen ADDR` with its wall clock moved by
    /// `offset` (faketime's `-40d`), waits until it listens.
    pub async fn serve_at(&self, listen: &str, offset: &str) -> Server {
        let token = self.admin_token().await;
        let mut child = plumb_at(self.path(), offset, &["serve", "--listen", listen])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("spawn plumb serve with a moved clock");
        let (_first, reader) = first_line(&mut child).await;
        let base_url = format!("http://{listen}");
        {
            let mut tokens = TOKENS.lock().unwrap_or_else(|e| e.into_inner());
            tokens.retain(|(base, _)| base != &base_url);
            tokens.push((base_url.clone(), token));
        }
        Server {
            child,
            base_url,
            stdout: reader,
        }
    }
}

/// Retention with real processes, on the store `config` names: runs made
/// 40 days ago (a server under faketime) are purged by a server started
/// now — killed with SIGKILL in the middle of its purge and started again —
/// except those of a workflow that keeps runs 60 days (their payloads are
/// blanked); runs made now keep everything.
#[allow(clippy::print_stderr)] // a skipped test says why
pub async fn retention_purges_old_runs_through_a_sigkill(config: &str) {
    if !faketime_works() {
        eprintln!("skipped: `faketime` is not installed (apt-get install faketime)");
        return;
    }
    const OLD: usize = 1200;
    const KEPT: usize = 30;
    const YOUNG: usize = 20;
    let head = "owner: qa@example.com\ndescription: test workflow\n";
    let listen = format!("127.0.0.1:{}", free_port());
    let project = Project::new(&format!("listen: {listen}\n{config}"));
    project.workflow(
        "ingest",
        &format!("name: ingest\n{head}trigger:\n  webhook: {{ path: ingest }}\nsteps:\n  - id: shape\n    jq: '{{n: .trigger.body.n}}'\n"),
    );
    project.workflow(
        "keep",
        &format!("name: keep\n{head}retention: {{ runs: 60d }}\ntrigger:\n  webhook: {{ path: keep }}\nsteps:\n  - id: shape\n    jq: '{{n: .trigger.body.n}}'\n"),
    );
    let base = format!("http://{listen}");
    let drained = |base: String| async move {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let status = get_json(&format!("{base}/api/v1/status")).await;
            let pending: u64 = status["workflows"]
                .as_array()
                .map(|ws| {
                    ws.iter()
                        .map(|w| {
                            w["queued"].as_u64().unwrap_or(0) + w["running"].as_u64().unwrap_or(0)
                        })
                        .sum()
                })
                .unwrap_or(1);
            if pending == 0 {
                return;
            }
            assert!(Instant::now() < deadline, "runs still pending: {status}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };

    // Forty days ago.
    let past = project.serve_at(&listen, "-40d").await;
    let client = http();
    for (path, count) in [("ingest", OLD), ("keep", KEPT)] {
        for n in 0..count {
            let r = client
                .post(format!("{base}/hooks/{path}"))
                .json(&json!({"n": n}))
                .send()
                .await
                .expect("POST");
            assert_eq!(r.status().as_u16(), 202);
        }
    }
    drained(base.clone()).await;
    past.kill().await;

    // Now: young runs, then a purge killed in the middle, then another.
    let now = project.serve(&listen).await;
    let mut young = Vec::new();
    for n in 0..YOUNG {
        let (code, body) = post_json(&format!("{base}/hooks/ingest"), &json!({"n": n})).await;
        assert_eq!(code, 202, "{body}");
        young.push(body["run_id"].as_str().expect("run id").to_owned());
    }
    drained(base.clone()).await;
    tokio::time::sleep(Duration::from_millis(5100)).await;
    now.kill().await;
    let again = project.serve(&listen).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    let ingest = loop {
        let listed = get_json(&format!("{base}/api/v1/runs?workflow=ingest&limit=200")).await;
        let runs = listed["runs"].as_array().cloned().unwrap_or_default();
        if runs.len() == YOUNG {
            break runs;
        }
        assert!(
            Instant::now() < deadline,
            "old runs of `ingest` still there: {} runs",
            runs.len()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let ids: Vec<&str> = ingest.iter().filter_map(|r| r["id"].as_str()).collect();
    for id in &young {
        assert!(ids.contains(&id.as_str()), "young run {id} kept");
    }
    let shown = get_json(&format!("{base}/api/v1/runs/{}", young[0])).await;
    assert_eq!(
        shown["run"]["trigger"]["body"]["n"], 0,
        "a young run keeps its payload: {shown}"
    );
    assert!(shown["steps"][0]["output"].is_object(), "{shown}");
    // `keep` keeps its 40-day-old runs (60 days) but not their payloads (7).
    let kept = get_json(&format!("{base}/api/v1/runs?workflow=keep&limit=200")).await;
    let kept = kept["runs"].as_array().cloned().unwrap_or_default();
    assert_eq!(kept.len(), KEPT, "runs of `keep` are kept");
    let one = kept[0]["id"].as_str().expect("id");
    let shown = get_json(&format!("{base}/api/v1/runs/{one}")).await;
    assert!(
        shown["run"]["trigger"].is_null(),
        "payload blanked: {shown}"
    );
    assert_eq!(shown["run"]["status"], "succeeded");
    let status = get_json(&format!("{base}/api/v1/status")).await;
    assert!(
        status["store"]["bytes"].as_u64().unwrap_or(0) > 0,
        "{status}"
    );
    again.kill().await;
}
