//! `trigger.schedule`: a cron expression (5 fields, or 6 with seconds) read
//! in an IANA timezone, and what to do about slots missed while no
//! scheduler ran.

use serde::Deserialize;
use serde_json::Value;

use super::TriggerKind;
use crate::load::Checker;
use crate::model::Trigger;
use crate::spec::CatchUp;
use crate::yaml::FieldPath;

pub(super) const KIND: TriggerKind = TriggerKind {
    name: "schedule",
    check,
};

/// `trigger.schedule`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleSpec {
    /// Cron expression (5 fields, or 6 with seconds).
    pub cron: String,
    /// IANA timezone the cron expression is read in; UTC when omitted.
    pub timezone: Option<String>,
    /// What to fire for slots missed while plumb was down.
    pub catch_up: Option<CatchUp>,
}

fn check(cx: &mut Checker<'_>, raw: &Value, path: &FieldPath) -> Option<Trigger> {
    let s: ScheduleSpec = cx.deserialize(raw, path)?;
    let parser = croner::parser::CronParser::builder()
        .seconds(croner::parser::Seconds::Optional)
        .build();
    if let Err(e) = parser.parse(&s.cron) {
        cx.error_at_value(
            &path.key("cron"),
            format!("invalid cron expression `{}`: {e}", s.cron),
        )
        .help = Some("use five fields `minute hour day month weekday`, e.g. `*/5 * * * *`".into());
    }
    let timezone = s.timezone.unwrap_or_else(|| "UTC".to_owned());
    if timezone.parse::<chrono_tz::Tz>().is_err() {
        cx.error_at_value(
            &path.key("timezone"),
            format!("unknown timezone `{timezone}`"),
        )
        .help = Some("use an IANA name such as `Europe/Berlin` or `UTC`".into());
    }
    Some(Trigger::Schedule {
        cron: s.cron,
        timezone,
        catch_up: s.catch_up.unwrap_or_default(),
    })
}
