//! Delays between attempts.

use std::time::Duration;

use backon::{BackoffBuilder, ConstantBuilder, ExponentialBuilder};
use plumb_core::model::{Backoff, RetryPolicy};

/// The wait before attempt `failed_attempt + 1`, given that attempt
/// `failed_attempt` (1-based) just failed. Never longer than `policy.max`.
#[must_use]
pub fn delay_after(policy: &RetryPolicy, failed_attempt: u32) -> Duration {
    let n = usize::try_from(failed_attempt.max(1)).unwrap_or(usize::MAX);
    let delay = match policy.backoff {
        Backoff::Exponential => {
            let mut builder = ExponentialBuilder::default()
                .with_min_delay(policy.initial)
                .with_max_delay(policy.max)
                .with_factor(2.0)
                .without_max_times();
            if policy.jitter {
                builder = builder.with_jitter();
            }
            builder.build().nth(n - 1)
        }
        Backoff::Fixed => {
            let mut builder = ConstantBuilder::default()
                .with_delay(policy.initial)
                .without_max_times();
            if policy.jitter {
                builder = builder.with_jitter();
            }
            builder.build().nth(n - 1)
        }
    };
    delay.unwrap_or(policy.max).min(policy.max)
}

/// How long a run waits before it is claimed again after an execution
/// stopped without ending it (`strikes` such executions so far): 1 s, 2 s,
/// 4 s … up to a minute, so a run that crashes its worker does not take the
/// worker down again at once.
#[must_use]
pub fn crash_backoff(strikes: u32) -> Duration {
    let doublings = strikes.saturating_sub(1).min(6);
    Duration::from_secs(1u64 << doublings).min(Duration::from_secs(60))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crash_backoff_doubles_up_to_a_minute() {
        let waits: Vec<u64> = (0..10).map(|s| crash_backoff(s).as_secs()).collect();
        assert_eq!(waits, vec![1, 1, 2, 4, 8, 16, 32, 60, 60, 60]);
    }

    fn policy(backoff: Backoff, jitter: bool) -> RetryPolicy {
        RetryPolicy {
            attempts: 10,
            backoff,
            initial: Duration::from_millis(100),
            max: Duration::from_millis(1000),
            jitter,
        }
    }

    #[test]
    fn exponential_doubles_up_to_max() {
        let p = policy(Backoff::Exponential, false);
        let delays: Vec<u128> = (1..=6).map(|n| delay_after(&p, n).as_millis()).collect();
        assert_eq!(delays, vec![100, 200, 400, 800, 1000, 1000]);
    }

    #[test]
    fn jitter_stays_between_the_base_delay_and_max() {
        let p = policy(Backoff::Exponential, true);
        for _ in 0..100 {
            let d = delay_after(&p, 2);
            assert!(
                d >= Duration::from_millis(200) && d <= Duration::from_millis(1000),
                "{d:?}"
            );
        }
    }

    #[test]
    fn fixed_is_constant() {
        let p = policy(Backoff::Fixed, false);
        assert_eq!(delay_after(&p, 1), Duration::from_millis(100));
        assert_eq!(delay_after(&p, 7), Duration::from_millis(100));
    }
}
