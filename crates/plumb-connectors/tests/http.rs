//! The HTTP connector against real local servers.

use std::time::Duration;

use axum::Router;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use plumb_connectors::ActionError;
use plumb_connectors::http::{HttpClient, HttpRequest};
use serde_json::json;
use url::Url;

async fn serve(app: Router) -> Url {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await });
    Url::parse(&format!("http://{addr}")).expect("url")
}

fn request(url: Url) -> HttpRequest {
    HttpRequest {
        method: "GET".into(),
        url,
        headers: vec![("Idempotency-Key".into(), "r:s".into())],
        body: None,
        timeout: Duration::from_secs(5),
        expect_status: None,
        credential_header: None,
        scrub: None,
    }
}

#[tokio::test]
async fn json_success_becomes_status_headers_body() {
    let base = serve(Router::new().route(
        "/echo",
        post(|headers: HeaderMap, body: String| async move {
            let key = headers.get("idempotency-key").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
            axum::Json(json!({"key": key, "got": serde_json::from_str::<serde_json::Value>(&body).unwrap_or_default()}))
        }),
    ))
    .await;
    let client = HttpClient::new().expect("client");
    let mut req = request(base.join("/echo").expect("join"));
    req.method = "POST".into();
    req.body = Some(json!({"n": 1}));
    let resp = client.send(req).await.expect("success");
    assert_eq!(resp.status, 200);
    assert_eq!(resp.body, json!({"key": "r:s", "got": {"n": 1}}));
    assert!(resp.headers.contains_key("content-type"));
}

#[tokio::test]
async fn statuses_are_classified_retryable_or_permanent() {
    let base = serve(
        Router::new()
            .route(
                "/503",
                get(|| async {
                    (
                        StatusCode::SERVICE_UNAVAILABLE,
                        [(header::RETRY_AFTER, "1")],
                        "down",
                    )
                }),
            )
            .route("/429", get(|| async { StatusCode::TOO_MANY_REQUESTS }))
            .route(
                "/400",
                get(|| async { (StatusCode::BAD_REQUEST, "{\"error\":\"bad field\"}") }),
            )
            .route("/404", get(|| async { StatusCode::NOT_FOUND }))
            .route("/201", get(|| async { StatusCode::CREATED })),
    )
    .await;
    let client = HttpClient::new().expect("client");
    let send = |p: &str| client.send(request(base.join(p).expect("join")));
    match send("/503").await {
        Err(ActionError::Retryable {
            status,
            retry_after,
            message,
        }) => {
            assert_eq!(status, Some(503));
            assert_eq!(retry_after, Some(Duration::from_secs(1)));
            assert!(
                message.contains("503") && message.contains("down"),
                "{message}"
            );
        }
        other => panic!("503 must be retryable: {other:?}"),
    }
    assert!(send("/429").await.expect_err("429").is_retryable());
    let e = send("/400").await.expect_err("400");
    assert!(!e.is_retryable());
    assert!(e.to_string().contains("bad field"), "{e}");
    assert!(!send("/404").await.expect_err("404").is_retryable());
    assert_eq!(send("/201").await.expect("201").status, 201);
    let mut strict = request(base.join("/201").expect("join"));
    strict.expect_status = Some(vec![200]);
    assert!(
        !client
            .send(strict)
            .await
            .expect_err("201 not expected")
            .is_retryable()
    );
}

#[tokio::test]
async fn connection_refused_and_timeouts_are_retryable() {
    let client = HttpClient::new().expect("client");
    // Bind then drop a listener to get a port nobody listens on.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let refused = client
        .send(request(
            Url::parse(&format!("http://127.0.0.1:{port}/")).expect("url"),
        ))
        .await
        .expect_err("refused");
    assert!(refused.is_retryable(), "{refused}");
    let base = serve(Router::new().route(
        "/slow",
        get(|| async {
            tokio::time::sleep(Duration::from_secs(5)).await;
            "late"
        }),
    ))
    .await;
    let mut req = request(base.join("/slow").expect("join"));
    req.timeout = Duration::from_millis(200);
    let e = client.send(req).await.expect_err("timeout");
    assert!(e.is_retryable());
    assert!(e.to_string().contains("timed out after 200ms"), "{e}");
}

#[tokio::test]
async fn redirects_off_the_connection_origin_are_refused() {
    let other = serve(Router::new().route(
        "/steal",
        get(|headers: HeaderMap| async move { format!("{:?}", headers.get("authorization")) }),
    ))
    .await;
    let target = other.join("/steal").expect("join").to_string();
    let base = serve(
        Router::new()
            .route(
                "/away",
                get(move || {
                    let target = target.clone();
                    async move { (StatusCode::FOUND, [(header::LOCATION, target)]).into_response() }
                }),
            )
            .route(
                "/here",
                get(|| async { (StatusCode::FOUND, [(header::LOCATION, "/ok")]).into_response() }),
            )
            .route("/ok", get(|| async { "fine" })),
    )
    .await;
    let client = HttpClient::new().expect("client");
    let e = client
        .send(request(base.join("/away").expect("join")))
        .await
        .expect_err("off-origin redirect");
    assert!(!e.is_retryable());
    assert!(
        e.to_string().contains("outside the connection's host"),
        "{e}"
    );
    let ok = client
        .send(request(base.join("/here").expect("join")))
        .await
        .expect("same-origin redirect");
    assert_eq!(ok.body, json!("fine"));
}

#[tokio::test]
async fn oversized_responses_are_refused() {
    let base = serve(Router::new().route(
        "/big",
        get(|| async { vec![b'x'; plumb_connectors::http::MAX_RESPONSE_BYTES + 1] }),
    ))
    .await;
    let client = HttpClient::new().expect("client");
    let e = client
        .send(request(base.join("/big").expect("join")))
        .await
        .expect_err("too big");
    assert!(!e.is_retryable());
    assert!(e.to_string().contains("larger than"), "{e}");
}

#[tokio::test]
async fn an_overloaded_upstream_with_a_huge_error_page_stays_retryable() {
    let base = serve(Router::new().route(
        "/big503",
        get(|| async {
            (
                StatusCode::SERVICE_UNAVAILABLE,
                vec![b'x'; plumb_connectors::http::MAX_RESPONSE_BYTES + 1],
            )
        }),
    ))
    .await;
    let client = HttpClient::new().expect("client");
    let e = client
        .send(request(base.join("/big503").expect("join")))
        .await
        .expect_err("503");
    assert!(e.is_retryable(), "{e}");
    assert_eq!(e.status(), Some(503));
}
