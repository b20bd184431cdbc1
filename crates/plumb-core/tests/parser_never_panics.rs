//! Whatever bytes a workflow file holds, loading it returns a value or
//! diagnostics: it never panics.

use plumb_core::{SourceFile, load_config, load_workflow};
use proptest::prelude::*;

fn config() -> plumb_core::ProjectConfig {
    load_config(&SourceFile {
        path: "plumb.yaml".into(),
        text: "connections:\n  crm:\n    http: { base_url: 'https://api.example' }\n".into(),
    })
    .expect("config")
}

/// Pieces of plausible workflow files, so the generator reaches the
/// validation code and not only the YAML parser.
fn fragment() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("name: w\n".to_owned()),
        Just("owner: o\n".to_owned()),
        Just("description: d\n".to_owned()),
        Just("steps:\n".to_owned()),
        Just("  - id: a\n".to_owned()),
        Just("    jq: '.steps.a'\n".to_owned()),
        Just("    http: { connection: crm, path: '/${{ .x }}' }\n".to_owned()),
        Just("    if: '${{ true }}'\n    then:\n      - id: b\n        jq: '1'\n".to_owned()),
        Just("    for_each: '${{ [1,2] }}'\n    concurrency: 0\n".to_owned()),
        Just("    sleep: 1s\n".to_owned()),
        Just("    assert: { condition: '${{ .a }}' }\n".to_owned()),
        Just("trigger: { schedule: { cron: '* * * * *' } }\n".to_owned()),
        Just("retry: { attempts: 0, initial: 5m, max: 1s }\n".to_owned()),
        Just("${{ }}}}${{".to_owned()),
        Just("    http: { connection: crm, path: '/x/${{ .a == “b” }}' }\n".to_owned()),
        Just("    sleep: 1e300\n".to_owned()),
        Just("    sleep: -5\n".to_owned()),
        "[ -~]{0,20}\n".prop_map(|s| s),
        any::<String>(),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, .. ProptestConfig::default() })]

    #[test]
    fn arbitrary_text_never_panics(text in any::<String>()) {
        let _ = load_workflow(&SourceFile { path: "w.yaml".into(), text: text.clone() }, &config());
        let _ = load_config(&SourceFile { path: "plumb.yaml".into(), text });
    }

    #[test]
    fn shuffled_workflow_fragments_never_panic(parts in proptest::collection::vec(fragment(), 0..12)) {
        let text = parts.concat();
        let _ = load_workflow(&SourceFile { path: "w.yaml".into(), text }, &config());
    }
}

/// Loads a file on a thread with the stack a reload gets (a tokio worker's
/// 2 MiB): a file nested past any sane depth must become a diagnostic, not
/// a stack overflow that takes the server down.
fn load_on_small_stack(text: String) -> Result<(), String> {
    std::thread::Builder::new()
        .stack_size(2 * 1024 * 1024)
        .spawn(move || {
            load_workflow(
                &SourceFile {
                    path: "w.yaml".into(),
                    text,
                },
                &config(),
            )
            .map(|_| ())
            .map_err(|d| d.to_string())
        })
        .expect("spawn")
        .join()
        .expect("no panic")
}

#[test]
fn deeply_nested_yaml_is_a_diagnostic() {
    let head = "name: w\nowner: o\ndescription: d\nsteps:\n  - id: a\n    jq: '1'\nextra: ";
    for depth in [100, 10_000, 200_000] {
        let flow = format!("{head}{}{}\n", "[".repeat(depth), "]".repeat(depth));
        let err = load_on_small_stack(flow).expect_err("too deep");
        assert!(err.contains("nest"), "{depth}: {err}");
    }
    let mut block =
        String::from("name: w\nowner: o\ndescription: d\nsteps:\n  - id: a\n    jq: '1'\nextra:\n");
    for level in 1..2000 {
        block.push_str(&" ".repeat(level));
        block.push_str("k:\n");
    }
    let err = load_on_small_stack(block).expect_err("too deep");
    assert!(err.contains("nest"), "{err}");
}
