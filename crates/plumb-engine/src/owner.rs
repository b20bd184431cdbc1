//! Who holds a run's lease, and whether that holder is still alive.
//!
//! A lease expires on its own (30 s after the last heartbeat), which is the
//! only safe rule across machines. On one machine we can do better: an owner
//! id carries the host, the pid and the process start time, so a process on
//! the same host can tell that the holder is gone (the pid no longer exists,
//! or now belongs to a process started at another time) and take the run at
//! once instead of waiting for the lease to run out. This is what lets
//! `plumb run --resume` continue a run right after the process running it was
//! killed.

use std::fmt;

/// A lease owner: `<role>:<host>:<pid>:<start time>:<nonce>`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Owner(String);

impl Owner {
    /// An owner id for this process.
    #[must_use]
    pub fn this_process(role: &str) -> Self {
        let pid = std::process::id();
        let start = process_start_time(pid).unwrap_or_default();
        let nonce = uuid::Uuid::now_v7().simple().to_string();
        Self(format!(
            "{role}:{}:{pid}:{start}:{}",
            hostname(),
            &nonce[nonce.len() - 8..]
        ))
    }

    /// The owner id as stored.
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Owner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Whether the process named by a stored owner id is certainly gone.
///
/// `false` means "alive, or cannot tell" (another host, an id we did not
/// write, a platform without `/proc`): the caller must then wait for the
/// lease to expire.
#[must_use]
pub fn is_certainly_dead(owner: &str) -> bool {
    let parts: Vec<&str> = owner.split(':').collect();
    let [_role, host, pid, start, _nonce] = parts.as_slice() else {
        return false;
    };
    if *host != hostname() {
        return false;
    }
    let Ok(pid) = pid.parse::<u32>() else {
        return false;
    };
    if !std::path::Path::new("/proc/self/stat").exists() {
        return false;
    }
    match process_start_time(pid) {
        None => true,
        Some(now_start) => now_start != *start,
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .ok()
        .filter(|s| !s.is_empty() && !s.contains(':'))
        .unwrap_or_else(|| "localhost".to_owned())
}

/// Field 22 of `/proc/<pid>/stat`: the process start time in clock ticks
/// since boot. Together with the pid it names one process, even after the
/// pid is reused.
fn process_start_time(pid: u32) -> Option<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces.
    let after_name = &stat[stat.rfind(')')? + 1..];
    after_name.split_whitespace().nth(19).map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_alive() {
        let me = Owner::this_process("cli");
        assert!(!is_certainly_dead(me.as_str()), "{me}");
    }

    #[test]
    fn a_finished_child_process_is_dead() {
        let mut child = std::process::Command::new("true").spawn().expect("spawn");
        let pid = child.id();
        let start = process_start_time(pid).unwrap_or_default();
        child.wait().expect("wait");
        let owner = format!("cli:{}:{pid}:{start}:abcd", hostname());
        assert!(is_certainly_dead(&owner), "{owner}");
    }

    #[test]
    fn other_hosts_and_foreign_ids_are_never_judged_dead() {
        assert!(!is_certainly_dead("cli:some-other-host:1:1:abcd"));
        assert!(!is_certainly_dead("worker-7"));
    }
}
