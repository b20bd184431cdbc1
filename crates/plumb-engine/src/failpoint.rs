//! Named points where a crash test can make this process fail on purpose,
//! the way a real crash or bug would (the Meilisearch-style breakpoints of
//! STYLE.md). `PLUMB_FAILPOINT=name` aborts the process at `name` (no
//! destructor, no flush: like SIGKILL); `name=panic` panics there instead.
//! Several points are separated by commas. Only tests set the variable; a
//! process without it pays one cached lookup per point.

use std::sync::OnceLock;

/// Fails here if `PLUMB_FAILPOINT` names this point.
pub fn hit(name: &str) {
    static POINTS: OnceLock<Option<String>> = OnceLock::new();
    let Some(points) = POINTS.get_or_init(|| std::env::var("PLUMB_FAILPOINT").ok()) else {
        return;
    };
    for point in points.split(',') {
        let (point, action) = point.split_once('=').unwrap_or((point, "abort"));
        if point.trim() != name {
            continue;
        }
        tracing::error!(
            failpoint = name,
            action,
            "Failing here on purpose (PLUMB_FAILPOINT)."
        );
        if action == "panic" {
            panic!("failpoint {name}");
        }
        std::process::abort();
    }
}
