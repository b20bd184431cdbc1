//! The hard-coded secrets lint against a corpus: every listed key format,
//! literal credentials where credentials go, and the project's own example
//! files, which must pass. Fake tokens are built here at run time, so this
//! repository holds no token-shaped strings for secret scanners to trip on.

use plumb_core::lint::{LintAllow, fingerprint, lint};
use plumb_core::{SourceFile, load_config, load_workflow, yaml};
use proptest::prelude::*;

/// Deterministic filler from an alphabet: random-looking, reproducible.
fn filler(alphabet: &str, len: usize, seed: u64) -> String {
    let chars: Vec<char> = alphabet.chars().collect();
    let mut state = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
    (0..len)
        .map(|_| {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            let index = usize::try_from(state >> 33).unwrap_or(0) % chars.len();
            chars[index]
        })
        .collect()
}

const UPPER_DIGITS: &str = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
const ALNUM: &str = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
const B64URL: &str = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_";

/// One fake credential of each listed format, with the name the lint
/// gives it.
fn corpus() -> Vec<(&'static str, String)> {
    let join = |parts: &[&str]| parts.concat();
    vec![
        (
            "an AWS access key id",
            join(&["AK", "IA", &filler(UPPER_DIGITS, 16, 1)]),
        ),
        (
            "an AWS secret access key",
            join(&[
                "aws_secret_access_key = ",
                &filler(&format!("{ALNUM}/+"), 40, 2),
            ]),
        ),
        (
            "a Google API key",
            join(&["AI", "za", &filler(B64URL, 35, 3)]),
        ),
        ("a GitHub token", join(&["gh", "p_", &filler(ALNUM, 36, 4)])),
        (
            "a GitHub fine-grained token",
            join(&[
                "github",
                "_pat_",
                &filler(ALNUM, 22, 5),
                "_",
                &filler(ALNUM, 59, 6),
            ]),
        ),
        (
            "a GitLab token",
            join(&["gl", "pat-", &filler(ALNUM, 20, 7)]),
        ),
        (
            "a Slack token",
            join(&[
                "xo",
                "xb-",
                &filler("0123456789", 12, 8),
                "-",
                &filler(ALNUM, 24, 9),
            ]),
        ),
        (
            "a Slack webhook URL",
            join(&[
                "https://hooks.",
                "slack.com/services/T",
                &filler(UPPER_DIGITS, 8, 10),
                "/B",
                &filler(UPPER_DIGITS, 8, 11),
                "/",
                &filler(ALNUM, 24, 12),
            ]),
        ),
        (
            "a Stripe secret key",
            join(&["sk", "_live_", &filler(ALNUM, 24, 13)]),
        ),
        (
            "a webhook signing secret",
            join(&["wh", "sec_", &filler(ALNUM, 32, 14)]),
        ),
        ("an npm token", join(&["np", "m_", &filler(ALNUM, 36, 15)])),
        (
            "a SendGrid API key",
            join(&[
                "S",
                "G.",
                &filler(B64URL, 22, 16),
                ".",
                &filler(B64URL, 43, 17),
            ]),
        ),
        (
            "an OpenAI or Anthropic API key",
            join(&["sk", "-ant-", &filler(B64URL, 40, 18)]),
        ),
        (
            "a JSON Web Token",
            join(&[
                "ey",
                "JhbGciOiJIUzI1NiJ9.",
                "ey",
                "JzdWIiOiIxMjM0In0.",
                &filler(B64URL, 43, 19),
            ]),
        ),
        (
            "a PEM private key",
            join(&["-----BEGIN ", "RSA PRIVATE", " KEY-----"]),
        ),
    ]
}

fn config(extra: &str) -> plumb_core::ProjectConfig {
    load_config(&SourceFile {
        path: "plumb.yaml".into(),
        text: format!(
            "connections:\n  crm:\n    http: {{ base_url: 'https://api.example' }}\n{extra}"
        ),
    })
    .expect("config")
}

fn workflow_with(step: &str) -> String {
    format!("name: w\nowner: o@example.com\ndescription: d\nsteps:\n  - id: a\n    jq: '1'\n{step}")
}

fn problems(text: &str, config: &plumb_core::ProjectConfig) -> Vec<plumb_core::Diagnostic> {
    match load_workflow(
        &SourceFile {
            path: "workflows/w.yaml".into(),
            text: text.to_owned(),
        },
        config,
    ) {
        Ok(_) => Vec::new(),
        Err(d) => d.0,
    }
}

#[test]
fn every_known_key_format_is_found_anywhere_with_its_line_and_the_fix() {
    let config = config("");
    for (what, token) in corpus() {
        // Inside a jq string literal: not a header or auth field, so only
        // the format itself can give it away.
        let escaped = token.replace('\'', "''");
        let text = workflow_with(&format!("  - id: b\n    jq: '\"{escaped}\"'\n"));
        let found = problems(&text, &config);
        assert_eq!(found.len(), 1, "{what}: {found:?}");
        let d = &found[0];
        assert_eq!(d.file, "workflows/w.yaml");
        assert_eq!(d.line, Some(8), "{what}: {d}");
        assert!(d.message.starts_with(what), "{what}: {}", d.message);
        assert!(
            !d.to_string().contains(&token),
            "a finding does not repeat the credential: {d}"
        );
        let help = d.help.as_deref().unwrap_or("");
        assert!(help.contains("plumb secrets set NAME"), "{help}");
        assert!(
            help.contains(&fingerprint(&format!("\"{token}\""))),
            "{help}"
        );
    }
}

#[test]
fn literal_credentials_in_headers_auth_fields_and_urls_are_found() {
    let config = config("");
    let random = filler(ALNUM, 32, 40);
    let cases = [
        (
            "Authorization header",
            "  - id: b\n    http: { connection: crm, path: /x, headers: { Authorization: 'Bearer hunter2hunter2' } }\n".to_owned(),
        ),
        (
            "custom credential header",
            "  - id: b\n    http: { connection: crm, path: /x, headers: { X-Api-Key: 'abc123def456' } }\n".to_owned(),
        ),
        (
            "random token in a header",
            format!(
                "  - id: b\n    http: {{ connection: crm, path: /x, headers: {{ X-Trace: '{random}' }} }}\n"
            ),
        ),
        (
            "random token in a URL path",
            format!("  - id: b\n    http: {{ connection: crm, path: '/hook/{random}' }}\n"),
        ),
        (
            "credential-named field in a body",
            "  - id: b\n    http: { connection: crm, method: POST, path: /login, body: { user: svc, password: 'correct-horse' } }\n".to_owned(),
        ),
    ];
    for (label, step) in cases {
        let found = problems(&workflow_with(&step), &config);
        assert_eq!(found.len(), 1, "{label}: {found:?}");
        assert_eq!(found[0].line, Some(8), "{label}");
    }
    // Userinfo in a connection URL, in plumb.yaml.
    let err = load_config(&SourceFile {
        path: "plumb.yaml".into(),
        text:
            "connections:\n  crm:\n    http: { base_url: 'https://svc:s3cretpass@api.example' }\n"
                .into(),
    })
    .expect_err("userinfo is a credential");
    assert_eq!(err.0.len(), 1, "{err}");
    assert_eq!(err.0[0].line, Some(3));
}

#[test]
fn ordinary_configuration_values_are_not_findings() {
    // Database names with test suffixes, hostnames, UUIDs, paths, buckets,
    // service names, dated file names, and SPEC's own secret references:
    // what real projects hold, none of it a credential.
    let text = "connections:\n  crm:\n    http:\n      base_url: https://api.example.com/v2/accounts/acme_corp_eu_2024\n      headers: { X-Request-Id: 0f8fad5b-d9cb-469f-a165-70867728950e, X-Tenant: plumb_acc_chaos_0539635c }\n  warehouse:\n    postgres: { url: { secret: warehouse_dsn } }\n  ledger:\n    postgres: { url: 'postgres://plumb@db-prod-01.eu-west-1.rds.amazonaws.com:5432/plumb_acc_chaos_0539635c', password: { secret: ledger_db_password } }\n  lake:\n    http: { base_url: 'https://my-company-data-lake-prod-eu-west-1.s3.amazonaws.com/exports/2024-11-30/report_final_v2_2024_11_30.csv' }\n  svc:\n    http: { base_url: 'http://payments-api.default.svc.cluster.local:8080/internal/v1' }\n  events:\n    amqp: { url: { secret: rabbit_url } }\n";
    let doc = yaml::parse(text).expect("yaml");
    assert_eq!(lint("plumb.yaml", &doc, &[]), Vec::new());
    let steps = workflow_with(
        "  - id: b\n    http: { connection: crm, path: '/repos/octo-org/octo-repo/issues/12345/comments/plumb_e2e_run_20241130_0539635c' }\n",
    );
    let doc = yaml::parse(&steps).expect("yaml");
    assert_eq!(lint("workflows/w.yaml", &doc, &[]), Vec::new());
    // A word-joined value with a long random part is still a token.
    let random = filler(ALNUM, 24, 41);
    let text = format!(
        "connections:\n  crm:\n    http: {{ base_url: 'https://api.example.com/hooks/token_{random}' }}\n"
    );
    let doc = yaml::parse(&text).expect("yaml");
    assert_eq!(lint("plumb.yaml", &doc, &[]).len(), 1);
}

#[test]
fn expressions_and_secret_names_are_not_findings() {
    let config = config("");
    let text = workflow_with(
        "  - id: b\n    http: { connection: crm, path: '/orders/${{ .trigger.body.id }}', headers: { Authorization: 'Bearer ${{ .steps.a }}', Accept: application/json } }\n",
    );
    assert_eq!(problems(&text, &config), Vec::new());
}

#[test]
fn an_allowed_fingerprint_passes_and_only_that_one() {
    let token = corpus()
        .into_iter()
        .find(|(what, _)| *what == "a Stripe secret key")
        .map(|(_, t)| t)
        .expect("stripe");
    let scalar = format!("\"{token}\"");
    let allowed = config(&format!(
        "lint:\n  allow:\n    - {{ fingerprint: {}, reason: \"Stripe's public docs test key\" }}\n",
        fingerprint(&scalar)
    ));
    let text = workflow_with(&format!("  - id: b\n    jq: '{scalar}'\n"));
    assert_eq!(problems(&text, &allowed), Vec::new());
    let other = workflow_with(&format!("  - id: b\n    jq: '\"{token}x\"'\n"));
    assert_eq!(problems(&other, &allowed).len(), 1);
    // An entry without a reason is itself refused.
    let err = load_config(&SourceFile {
        path: "plumb.yaml".into(),
        text: format!(
            "lint:\n  allow:\n    - {{ fingerprint: {} }}\n",
            fingerprint(&scalar)
        ),
    })
    .expect_err("a reason is required");
    assert!(err.to_string().contains("reason"), "{err}");
}

/// The project's own examples: the README's YAML blocks.
#[test]
fn the_readme_examples_pass_the_lint() {
    let readme = include_str!("../../../README.md");
    let mut blocks = 0;
    let mut rest = readme;
    while let Some(start) = rest.find("```yaml\n") {
        let body = &rest[start + 8..];
        let end = body.find("```").expect("closed block");
        let doc = yaml::parse(&body[..end]).expect("README YAML parses");
        let found = lint("README.md", &doc, &[]);
        assert!(found.is_empty(), "README block {blocks}: {found:?}");
        blocks += 1;
        rest = &body[end..];
    }
    assert!(blocks >= 2, "found {blocks} YAML blocks");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, .. ProptestConfig::default() })]

    /// Random bytes, read as YAML, never make the lint panic.
    #[test]
    fn the_lint_never_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
        let text = String::from_utf8_lossy(&bytes);
        if let Ok(doc) = yaml::parse(&text) {
            let _ = lint("w.yaml", &doc, &[]);
        }
    }

    /// Credential-shaped values in every place the lint looks never make it
    /// panic, whatever characters they hold.
    #[test]
    fn the_lint_never_panics_on_odd_values(
        key in prop_oneof![
            Just("Authorization".to_owned()),
            Just("password".to_owned()),
            Just("base_url".to_owned()),
            Just("token".to_owned()),
            "[a-zA-Z_-]{1,12}",
        ],
        value in any::<String>(),
    ) {
        let quoted = serde_json::to_string(&value).unwrap_or_default();
        let text = format!("headers:\n  {key}: {quoted}\nauth:\n  {key}: {quoted}\nurl: {quoted}\n");
        if let Ok(doc) = yaml::parse(&text) {
            let _ = lint("w.yaml", &doc, &[LintAllow { fingerprint: fingerprint(&value), reason: "test".into() }]);
        }
    }
}

#[test]
fn a_credential_pasted_where_a_secret_name_goes_is_never_repeated() {
    let token = corpus()
        .into_iter()
        .find(|(what, _)| *what == "a GitHub token")
        .map(|(_, t)| t)
        .expect("github");
    for value in [token.as_str(), "hunter 2 with spaces!"] {
        let err = load_config(&SourceFile {
            path: "plumb.yaml".into(),
            text: format!(
                "connections:\n  crm:\n    http:\n      base_url: 'https://api.example'\n      auth: {{ bearer: {{ secret: '{value}' }} }}\n"
            ),
        })
        .expect_err("refused");
        assert!(!err.is_empty());
        let text = err.to_string();
        assert!(!text.contains(value), "the value is repeated: {text}");
        assert!(text.contains("plumb.yaml:5:"), "{text}");
    }
}

#[test]
fn with_known_secrets_a_pasted_credential_is_named_by_fingerprint_and_real_names_pass() {
    let token = corpus()
        .into_iter()
        .find(|(what, _)| *what == "a Slack token")
        .map(|(_, t)| t)
        .expect("slack");
    let config = SourceFile {
        path: "plumb.yaml".into(),
        text: "connections:\n  crm:\n    http:\n      base_url: 'https://api.example'\n      auth: { bearer: { secret: github_app_private_key_2024 } }\n".into(),
    };
    let workflow = SourceFile {
        path: "workflows/w.yaml".into(),
        text: format!(
            "name: w\nowner: o@example.com\ndescription: d\ntrigger:\n  webhook: {{ path: w, auth: {{ preset: slack, secret: '{token}' }} }}\nsteps:\n  - id: a\n    jq: '1'\n"
        ),
    };
    let known: std::collections::BTreeSet<String> =
        ["github_app_private_key_2024".to_owned()].into();
    let err =
        plumb_core::load::load_project_checking_secrets(&config, &[workflow], &[], Some(&known))
            .expect_err("the pasted token is refused");
    let text = err.to_string();
    assert!(!text.contains(&token), "the token is repeated: {text}");
    assert!(
        err.0.iter().all(|d| d.file == "workflows/w.yaml"),
        "a long snake_case secret name is not a finding: {text}"
    );
    assert!(text.contains(&fingerprint(&token)), "{text}");
}
