//! Whatever jq program a workflow holds, evaluating it under a budget ends:
//! with a value, an error, or stopped when the budget is cancelled. It
//! never panics, never overflows the stack and never outlives its budget.

use std::time::{Duration, Instant};

use jaq_json::Val;
use plumb_core::expr::{Budget, Program, json_to_val};
use proptest::prelude::*;
use serde_json::json;

/// Pieces of jq, loops and recursion among them, so generated programs
/// reach the evaluator's hard cases rather than only the parser.
fn fragment() -> impl Strategy<Value = &'static str> {
    prop_oneof![
        Just("."),
        Just(".a"),
        Just(".items[]"),
        Just("[.]"),
        Just("{x: .}"),
        Just("repeat(.)"),
        Just("last(repeat(1))"),
        Just("range(1e12)"),
        Just("range(0; 1e15; 3)"),
        Just("def f: f; f"),
        Just("def f: [f]; f"),
        Just("def f: 1 + f; f"),
        Just("reduce range(100000) as $i (null; [.])"),
        Just("until(false; .)"),
        Just("recurse(.[]?)"),
        Just("recurse(. + 1; true)"),
        Just("limit(5; repeat(2))"),
        Just("first(range(10))"),
        Just("tojson"),
        Just("tostring"),
        Just("fromjson?"),
        Just("error(\"boom\")"),
        Just("try error(\"x\") catch ."),
        Just("\"x\" * 1000"),
        Just("[range(1000)] | sort"),
        Just("paths"),
        Just("..?"),
        Just("input"),
        Just("env"),
        Just("$__loc__"),
        Just("@base64"),
        Just("splits(\"a\")"),
        Just("to_entries"),
        Just("length"),
        Just("keys?"),
        Just("(.a // 1)"),
        Just("if . then 1 else [] end"),
        Just("label $out | repeat(break $out)"),
    ]
}

fn joiner() -> impl Strategy<Value = &'static str> {
    prop_oneof![Just(" | "), Just(", "), Just(" + "), Just(" as $v | ")]
}

/// Evaluates `code` the way the engine does (a thread with a 256 MiB
/// stack, 64 MiB of it for the evaluator), with a budget cancelled after
/// `limit`; returns how long the evaluation took. A program that does not
/// compile takes no time.
fn evaluate(code: &str, input: &Val, limit: Duration) -> Duration {
    let Ok(program) = Program::compile(code) else {
        return Duration::ZERO;
    };
    let input = input.clone();
    std::thread::Builder::new()
        .stack_size(256 * 1024 * 1024)
        .spawn(move || {
            let budget = Budget::new(64 * 1024 * 1024);
            let started = Instant::now();
            let done = std::sync::atomic::AtomicBool::new(false);
            std::thread::scope(|scope| {
                scope.spawn(|| {
                    while !done.load(std::sync::atomic::Ordering::Relaxed)
                        && started.elapsed() < limit
                    {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    budget.cancel("the test's time is up");
                });
                let _ = program.eval(&input, &budget);
                done.store(true, std::sync::atomic::Ordering::Relaxed);
            });
            started.elapsed()
        })
        .expect("spawn")
        .join()
        .expect("the evaluation never panics")
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, .. ProptestConfig::default() })]

    #[test]
    fn generated_programs_end_within_their_budget(
        parts in proptest::collection::vec((fragment(), joiner()), 1..5),
    ) {
        let mut code = String::new();
        for (i, (part, join)) in parts.iter().enumerate() {
            if i > 0 {
                code.push_str(join);
            }
            code.push_str(part);
        }
        let input = json_to_val(&json!({"a": [1, {"b": "c"}], "items": [1, 2, 3]}));
        let took = evaluate(&code, &input, Duration::from_millis(50));
        prop_assert!(
            took < Duration::from_secs(2),
            "`{code}` ran for {took:?} after its budget was cancelled at 50 ms"
        );
    }

    #[test]
    fn arbitrary_text_never_panics_the_compiler_or_the_evaluator(code in "\\PC{0,40}") {
        let _ = evaluate(&code, &Val::Null, Duration::from_millis(20));
    }
}
