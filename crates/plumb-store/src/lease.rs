//! Who holds a run: process identities and claim tokens.
//!
//! Every process that executes runs has an [`OwnerId`]. Each time it claims
//! a run, the store records a [`ClaimToken`] — the owner id and the claim's
//! number — as the run's lease holder, and every fenced write of that
//! execution carries the token. Two executions of one run, even in one
//! process, never hold the same token, so a stale one is always fenced off.
//!
//! This module is the only place these ids are built, parsed and compared;
//! every store backend and the engine's liveness check use it, so all of
//! them agree on what "the same holder" means.
//!
//! Deciding that a holder is *dead* is the engine's job (it needs the
//! operating system); the fields here carry what that decision needs: the
//! host, its boot, the PID namespace and user the pid is valid in, and the
//! process start time that tells a reused pid from the original.

use std::fmt;

/// A process that holds leases:
/// `<role>:<host>:<boot id>:<pid namespace>:<uid>:<pid>:<start time>:<nonce>`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct OwnerId {
    /// `serve`, `worker`, `cli`, `demo`.
    pub role: String,
    /// Host name (never contains `:`).
    pub host: String,
    /// The kernel's boot id: the same host after a reboot is another boot.
    pub boot: String,
    /// Inode of the PID namespace the pid is valid in.
    pub pid_ns: String,
    /// User the process runs as (`/proc` may hide other users' processes).
    pub uid: u32,
    /// Process id, in `pid_ns`.
    pub pid: u32,
    /// Start time of the process (clock ticks since boot), telling a reused
    /// pid from the original.
    pub start: String,
    /// Random, so two owners are never equal by accident.
    pub nonce: String,
}

impl fmt::Display for OwnerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}:{}:{}:{}:{}:{}",
            self.role,
            self.host,
            self.boot,
            self.pid_ns,
            self.uid,
            self.pid,
            self.start,
            self.nonce
        )
    }
}

impl OwnerId {
    /// Parses an owner id; `None` for anything else (an id written by an
    /// older plumb, a hand-made one), which callers must treat as "alive,
    /// as far as anyone can tell".
    #[must_use]
    pub fn parse(text: &str) -> Option<Self> {
        let parts: Vec<&str> = text.split(':').collect();
        let [role, host, boot, pid_ns, uid, pid, start, nonce] = parts.as_slice() else {
            return None;
        };
        if [role, host, boot, pid_ns, start, nonce]
            .iter()
            .any(|p| p.is_empty() || p.contains('#'))
        {
            return None;
        }
        Some(Self {
            role: (*role).to_owned(),
            host: (*host).to_owned(),
            boot: (*boot).to_owned(),
            pid_ns: (*pid_ns).to_owned(),
            uid: uid.parse().ok()?,
            pid: pid.parse().ok()?,
            start: (*start).to_owned(),
            nonce: (*nonce).to_owned(),
        })
    }
}

/// One claim of a run: `<owner id>#<claim number>`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ClaimToken {
    /// The claiming process's owner id, as stored.
    pub owner: String,
    /// The run's claim count after this claim (1 for the first).
    pub claim: u32,
}

impl ClaimToken {
    /// The token of claim number `claim` by `owner`.
    #[must_use]
    pub fn new(owner: &str, claim: u32) -> Self {
        Self {
            owner: owner.to_owned(),
            claim,
        }
    }

    /// Parses a stored lease holder; `None` if it is not a claim token.
    #[must_use]
    pub fn parse(text: &str) -> Option<Self> {
        let (owner, claim) = text.rsplit_once('#')?;
        Some(Self {
            owner: owner.to_owned(),
            claim: claim.parse().ok()?,
        })
    }

    /// The holder's owner id, if it is one this version of plumb wrote.
    #[must_use]
    pub fn owner_id(&self) -> Option<OwnerId> {
        OwnerId::parse(&self.owner)
    }
}

impl fmt::Display for ClaimToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}#{}", self.owner, self.claim)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owner() -> OwnerId {
        OwnerId {
            role: "serve".into(),
            host: "box".into(),
            boot: "8c0f7a1e-3b1d-4c5e-9f00-123456789abc".into(),
            pid_ns: "4026531836".into(),
            uid: 1000,
            pid: 4242,
            start: "123456".into(),
            nonce: "a1b2c3d4".into(),
        }
    }

    #[test]
    fn owner_ids_and_tokens_round_trip() {
        let o = owner();
        assert_eq!(OwnerId::parse(&o.to_string()), Some(o.clone()));
        let t = ClaimToken::new(&o.to_string(), 3);
        let parsed = ClaimToken::parse(&t.to_string()).expect("a token");
        assert_eq!(parsed, t);
        assert_eq!(parsed.owner_id(), Some(o));
    }

    #[test]
    fn foreign_ids_parse_as_unknown_owners() {
        // An id written before boot and namespace were recorded.
        let old = ClaimToken::parse("serve:box:4242:123456:a1b2c3d4#2").expect("a token");
        assert_eq!(old.claim, 2);
        assert_eq!(old.owner_id(), None);
        assert_eq!(ClaimToken::parse("worker-7"), None);
        assert_eq!(OwnerId::parse("a:b:c:d:not-a-uid:1:2:3"), None);
    }
}
