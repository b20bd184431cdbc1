//! Who this process is, as a lease holder, and whether another holder is
//! certainly dead.
//!
//! A lease that is not renewed ends on its own: a watcher that sees it
//! unrenewed for a whole lease duration expires it (see
//! [`crate::worker`]). That is the only safe rule across machines, PID
//! namespaces and users. Within one, we can do better: a holder that is
//! *provably* gone — same host, same boot, same PID namespace, same user,
//! and its pid no longer exists or belongs to a process started at another
//! time — is taken over at once. This is what lets `plumb run --resume`
//! and a restarted `plumb serve` continue a run right after the process
//! running it was killed.
//!
//! Anything short of proof is "alive": a holder on another host, in another
//! PID namespace (a container, `unshare -p`), of another user (`hidepid`,
//! `ProtectProc` hide their processes), an id written by an older plumb, or
//! a `/proc` that cannot be read. Then the lease must run out.

use std::fmt;
use std::os::unix::fs::MetadataExt;

use plumb_store::{ClaimToken, OwnerId};

/// This process's lease owner id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Owner {
    id: OwnerId,
    text: String,
}

impl Owner {
    /// The owner id of this process, in `role` (`serve`, `worker`, `cli`).
    #[must_use]
    pub fn this_process(role: &str) -> Self {
        let here = Identity::read();
        let pid = std::process::id();
        let nonce = uuid::Uuid::now_v7().simple().to_string();
        let id = OwnerId {
            role: role.to_owned(),
            host: here.host,
            boot: here.boot.unwrap_or_else(|| "unknown".to_owned()),
            pid_ns: here.pid_ns.unwrap_or_else(|| "unknown".to_owned()),
            uid: here.uid.unwrap_or(u32::MAX),
            pid,
            start: process_start_time(pid)
                .ok()
                .flatten()
                .map_or_else(|| "unknown".to_owned(), |s| s.start),
            nonce: nonce[nonce.len() - 8..].to_owned(),
        };
        let text = id.to_string();
        Self { id, text }
    }

    /// The owner id as stored.
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Its parts: role, host, pid ….
    #[must_use]
    pub fn id(&self) -> &OwnerId {
        &self.id
    }

    /// Whether a lease holder (a claim token) is one of this process's own
    /// claims.
    #[must_use]
    pub fn holds(&self, holder: &str) -> bool {
        ClaimToken::parse(holder).is_some_and(|t| t.owner == self.text)
    }
}

impl fmt::Display for Owner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// Where this process runs, as far as telling processes apart goes.
struct Identity {
    host: String,
    boot: Option<String>,
    pid_ns: Option<String>,
    uid: Option<u32>,
}

impl Identity {
    fn read() -> Self {
        Self {
            host: hostname(),
            boot: std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
                .ok()
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty() && !s.contains([':', '#'])),
            pid_ns: pid_namespace(),
            uid: std::fs::metadata("/proc/self").ok().map(|m| m.uid()),
        }
    }
}

/// Whether the process holding `holder` (a claim token or an owner id) is
/// certainly gone. `false` means "alive, or cannot tell": the caller must
/// then let the lease run out.
#[must_use]
pub fn is_certainly_dead(holder: &str) -> bool {
    let Some(owner) = ClaimToken::parse(holder)
        .and_then(|t| t.owner_id())
        .or_else(|| OwnerId::parse(holder))
    else {
        return false;
    };
    let here = Identity::read();
    let same_place = owner.host == here.host
        && here.boot.as_deref() == Some(owner.boot.as_str())
        && here.pid_ns.as_deref() == Some(owner.pid_ns.as_str())
        && here.uid == Some(owner.uid);
    if !same_place || !proc_is_ours() {
        return false;
    }
    match process_start_time(owner.pid) {
        // No such process in our namespace, which is the holder's.
        Ok(None) => true,
        // The pid was reused by a process started later, or the holder is a
        // zombie: it has exited and can write nothing more.
        Ok(Some(stat)) => stat.start != owner.start || stat.zombie,
        // Permission, I/O: no proof either way.
        Err(_) => false,
    }
}

/// Whether `/proc` shows this process's PID namespace: a `/proc` mounted
/// from another namespace (a container given the host's, or the reverse)
/// names other processes by our pids, and "no such pid" proves nothing.
fn proc_is_ours() -> bool {
    std::fs::read_link("/proc/self")
        .ok()
        .and_then(|p| p.to_str().and_then(|s| s.parse::<u32>().ok()))
        == Some(std::process::id())
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .ok()
        .filter(|s| !s.is_empty() && !s.contains([':', '#']))
        .unwrap_or_else(|| "localhost".to_owned())
}

/// The inode of this process's PID namespace (`pid:[4026531836]`).
fn pid_namespace() -> Option<String> {
    let link = std::fs::read_link("/proc/self/ns/pid").ok()?;
    let text = link.to_str()?;
    let inode = text.strip_prefix("pid:[")?.strip_suffix(']')?;
    (!inode.is_empty() && inode.bytes().all(|b| b.is_ascii_digit())).then(|| inode.to_owned())
}

/// What `/proc/<pid>/stat` says about a process.
struct Stat {
    /// Field 22: start time in clock ticks since boot.
    start: String,
    /// Field 3 is `Z` (zombie) or `X` (dead).
    zombie: bool,
}

/// `Ok(None)` only when the process certainly does not exist (`ENOENT`).
fn process_start_time(pid: u32) -> std::io::Result<Option<Stat>> {
    let stat = match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    // The command name (field 2) is in parentheses and may hold spaces.
    let after_name = stat
        .rfind(')')
        .and_then(|i| stat.get(i + 1..))
        .ok_or_else(|| std::io::Error::other("unexpected /proc stat format"))?;
    let mut fields = after_name.split_whitespace();
    let state = fields.next().unwrap_or("");
    let start = fields
        .nth(18)
        .ok_or_else(|| std::io::Error::other("unexpected /proc stat format"))?;
    Ok(Some(Stat {
        start: start.to_owned(),
        zombie: matches!(state, "Z" | "X"),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owner_of(pid: u32, start: &str) -> String {
        let mut id = OwnerId::parse(Owner::this_process("cli").as_str()).expect("own id parses");
        id.pid = pid;
        id.start = start.to_owned();
        ClaimToken::new(&id.to_string(), 1).to_string()
    }

    #[test]
    fn this_process_is_alive() {
        let me = Owner::this_process("cli");
        assert!(!is_certainly_dead(me.as_str()), "{me}");
        let token = ClaimToken::new(me.as_str(), 3).to_string();
        assert!(!is_certainly_dead(&token));
        assert!(me.holds(&token));
        assert!(!Owner::this_process("cli").holds(&token), "another nonce");
    }

    #[test]
    fn a_finished_child_process_is_dead() {
        let mut child = std::process::Command::new("true").spawn().expect("spawn");
        let pid = child.id();
        let start = process_start_time(pid)
            .ok()
            .flatten()
            .map(|s| s.start)
            .unwrap_or_default();
        child.wait().expect("wait");
        assert!(is_certainly_dead(&owner_of(pid, &start)));
    }

    #[test]
    fn a_reused_pid_is_another_process() {
        let pid = std::process::id();
        assert!(is_certainly_dead(&owner_of(pid, "1")), "start time differs");
    }

    #[test]
    fn anything_short_of_proof_is_alive() {
        let me = Owner::this_process("cli");
        let mut id = OwnerId::parse(me.as_str()).expect("parses");
        // A pid that does not exist here, but named in another namespace,
        // boot, user or host: it may be alive there.
        id.pid = u32::MAX - 1;
        for change in [
            |i: &mut OwnerId| i.pid_ns = "1".into(),
            |i: &mut OwnerId| i.boot = "another-boot".into(),
            |i: &mut OwnerId| i.uid = i.uid.wrapping_add(1),
            |i: &mut OwnerId| i.host = "elsewhere".into(),
        ] {
            let mut other = id.clone();
            change(&mut other);
            assert!(!is_certainly_dead(&other.to_string()), "{other}");
        }
        assert!(is_certainly_dead(&id.to_string()), "the same place: gone");
        assert!(!is_certainly_dead("cli:some-other-host:1:1:abcd#1"));
        assert!(!is_certainly_dead("worker-7"));
    }
}
