//! Whatever JSON the engine hands the store, it is either refused at once
//! (`StoreError::Rejected`) or stored so that it reads back equal: the
//! store never holds a record that a later claim, listing or resume could
//! not read.

use plumb_store::prelude::*;
use plumb_store::{
    Lease, NewRun, RunFilter, SqliteStore, StepRecord, StepStatus, Store, StoreError, Synchronous,
    WorkflowVersion, now_ms,
};
use proptest::prelude::*;
use serde_json::{Map, Number, Value};

fn scalar() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter_map("finite", Number::from_f64)
            .prop_map(Value::Number),
        "\\PC{0,12}".prop_map(Value::String),
        // Text that looks like JSON structure, escapes and all.
        "[\\[\\]{}\"\\\\:,]{0,12}".prop_map(Value::String),
    ]
}

/// Shallow, wide documents.
fn document() -> impl Strategy<Value = Value> {
    scalar().prop_recursive(6, 64, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            proptest::collection::vec(("\\PC{0,8}", inner), 0..6)
                .prop_map(|kv| Value::Object(kv.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

/// A chain of arrays and objects `depth` levels deep around `leaf`.
fn nested(depth: usize, objects: bool, leaf: Value) -> Value {
    let mut v = leaf;
    for i in 0..depth {
        v = if objects && i % 2 == 0 {
            let mut m = Map::new();
            m.insert("k".into(), v);
            Value::Object(m)
        } else {
            Value::Array(vec![v])
        };
    }
    v
}

async fn store() -> (tempfile::TempDir, SqliteStore) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = SqliteStore::open(&dir.path().join("plumb.db"), Synchronous::Normal)
        .await
        .expect("open");
    store
        .put_workflow_version(&WorkflowVersion {
            hash: "v1".into(),
            workflow: "w".into(),
            file: "workflows/w.yaml".into(),
            source: "name: w".into(),
            created_at: now_ms(),
        })
        .await
        .expect("version");
    (dir, store)
}

/// Stores `value` as a trigger and as a step output; each either is
/// refused or reads back equal, and the run listing keeps working.
async fn round_trip(store: &SqliteStore, n: usize, value: &Value) -> Result<(), String> {
    let id = format!("r{n}");
    let run = NewRun {
        id: id.clone(),
        workflow: "w".into(),
        version: "v1".into(),
        trigger: value.clone(),
        lease: Some(Lease {
            owner: "t".into(),
            ttl_ms: 60_000,
        }),
        max_concurrency: None,
        deadline: None,
        dedupe: None,
    };
    match store.create_run(&run).await {
        Ok(()) => {
            let back = store
                .run(&id)
                .await
                .map_err(|e| e.to_string())?
                .ok_or("the run is gone")?;
            if back.unreadable.is_some() || &back.trigger != value {
                return Err(format!("trigger did not read back: {:?}", back.unreadable));
            }
        }
        Err(StoreError::Rejected(_)) => return Ok(()),
        Err(e) => return Err(format!("create_run: {e}")),
    }
    let record = StepRecord {
        run_id: id.clone(),
        step_id: "s".into(),
        item: None,
        status: StepStatus::Succeeded,
        attempt: 1,
        state: Some(value.clone()),
        output: Some(value.clone()),
        error: None,
        status_code: None,
        started_at: now_ms(),
        finished_at: Some(now_ms()),
    };
    match store.record_step("t#1", &record).await {
        Ok(()) => {
            let journal = store.journal(&id).await.map_err(|e| e.to_string())?;
            if journal.first().and_then(|r| r.output.as_ref()) != Some(value) {
                return Err("output did not read back".into());
            }
        }
        Err(StoreError::Rejected(_)) => {}
        Err(e) => return Err(format!("record_step: {e}")),
    }
    store
        .list_runs(&RunFilter::default())
        .await
        .map_err(|e| format!("listing: {e}"))?;
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, .. ProptestConfig::default() })]

    #[test]
    fn documents_read_back_or_are_refused(
        value in document(),
        depth in 0usize..160,
        objects in any::<bool>(),
        leaf in scalar(),
    ) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        let deep = nested(depth, objects, leaf);
        let outcome = runtime.block_on(async {
            let (_dir, store) = store().await;
            round_trip(&store, 1, &value).await?;
            let deep_outcome = round_trip(&store, 2, &deep).await;
            store.close().await;
            deep_outcome
        });
        prop_assert!(outcome.is_ok(), "{outcome:?}");
    }
}
