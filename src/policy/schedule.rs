//! When the agent backs up: a cron expression in a time zone, and the clock it is read against.
//!
//! `[schedule] cron` takes `@yearly`, `@monthly`, `@weekly`, `@daily`, `@hourly`, 5-field
//! (`minute hour day-of-month month day-of-week`) and 6-field (`second minute …`) expressions, read
//! by the `croner` crate in `[schedule] timezone`. Across daylight-saving changes a time that does not
//! exist that day (02:30 on a spring-forward night) runs in the hour after the gap, and a time that
//! happens twice runs once. Runs never overlap: a run that is still going when the next time comes
//! makes the agent skip that time, and it computes the next one after the run ends.
//!
//! Every computation takes `now` from a [`Clock`], so tests drive it with a [`ManualClock`].

use std::str::FromStr;
use std::sync::Mutex;

use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use croner::Cron;
use serde::Deserialize;

use crate::error::{Error, Result};
use crate::policy::retention::parse_timezone;

/// `[schedule]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ScheduleConfig {
    /// When `run` backs up: `@daily`, `@hourly`, or a 5- or 6-field cron expression.
    pub cron: String,
    /// IANA time zone the expression is read in (and, by default, the retention rules count in).
    pub timezone: String,
    /// Back up as soon as `run` starts, then follow the schedule.
    pub backup_on_start: bool,
}

impl Default for ScheduleConfig {
    fn default() -> Self {
        ScheduleConfig {
            cron: "@daily".into(),
            timezone: "UTC".into(),
            backup_on_start: false,
        }
    }
}

impl ScheduleConfig {
    pub(crate) fn validate(&self) -> Result<()> {
        Schedule::from_config(self).map(|_| ())
    }
}

/// A parsed schedule.
#[derive(Debug, Clone)]
pub struct Schedule {
    expr: String,
    cron: Cron,
    tz: Tz,
}

impl Schedule {
    /// Parse `expr` to be read in zone `tz` (an IANA name).
    pub fn parse(expr: &str, tz: &str) -> Result<Schedule> {
        Schedule::parse_as("[schedule] cron", expr, tz)
    }

    /// Parse `expr`, the value of config key `key` (named in errors), to be read in zone `tz`.
    pub fn parse_as(key: &str, expr: &str, tz: &str) -> Result<Schedule> {
        let tz = parse_timezone(tz, "[schedule] timezone")?;
        let fields = expr.split_whitespace().count();
        if !expr.trim_start().starts_with('@') && !(5..=6).contains(&fields) {
            return Err(Error::Config(format!(
                "{key} {expr:?} has {fields} fields; use 5 (minute hour day month weekday), 6 (second first), or @daily/@hourly"
            )));
        }
        let cron = Cron::from_str(expr).map_err(|e| {
            Error::Config(format!(
                "{key} {expr:?}: {e}; examples: \"@daily\", \"30 3 * * *\" (03:30 every day), \"0 */6 * * *\""
            ))
        })?;
        // A pattern that never matches (e.g. 30 February) would stop the agent silently.
        let s = Schedule {
            expr: expr.trim().to_string(),
            cron,
            tz,
        };
        if s.next_after(Utc::now()).is_none() {
            return Err(Error::Config(format!(
                "{key} {expr:?} never matches a date"
            )));
        }
        Ok(s)
    }

    pub(crate) fn from_config(cfg: &ScheduleConfig) -> Result<Schedule> {
        Schedule::parse(&cfg.cron, &cfg.timezone)
    }

    /// The first scheduled time strictly after `t`.
    pub(crate) fn next_after(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let local = t.with_timezone(&self.tz);
        self.cron
            .find_next_occurrence(&local, false)
            .ok()
            .map(|n| n.with_timezone(&Utc))
    }

    pub(crate) fn expr(&self) -> &str {
        &self.expr
    }

    pub fn tz(&self) -> Tz {
        self.tz
    }
}

/// Where "now" comes from.
pub trait Clock: Send + Sync {
    fn now(&self) -> DateTime<Utc>;
}

/// The system's wall clock.
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }
}

/// A clock that only moves when told to (tests).
pub struct ManualClock(Mutex<DateTime<Utc>>);

impl ManualClock {
    pub fn new(t: DateTime<Utc>) -> ManualClock {
        ManualClock(Mutex::new(t))
    }

    pub fn set(&self, t: DateTime<Utc>) {
        *self.0.lock().expect("not poisoned") = t;
    }
}

impl Clock for ManualClock {
    fn now(&self) -> DateTime<Utc> {
        *self.0.lock().expect("not poisoned")
    }
}

/// Decides when the agent's next backup starts.
#[derive(Debug, Clone)]
pub struct Planner {
    schedule: Schedule,
    backup_on_start: bool,
    first: bool,
}

impl Planner {
    pub fn new(schedule: Schedule, backup_on_start: bool) -> Planner {
        Planner {
            schedule,
            backup_on_start,
            first: true,
        }
    }

    /// When the next backup starts, asked at `clock.now()` (the start, or the end of the last run):
    /// right away for the first run with `backup_on_start`, else the next scheduled time. Times
    /// missed while a run was going are skipped, not queued.
    pub fn next(&mut self, clock: &dyn Clock) -> Option<DateTime<Utc>> {
        let now = clock.now();
        if std::mem::take(&mut self.first) && self.backup_on_start {
            return Some(now);
        }
        self.schedule.next_after(now)
    }

    pub fn schedule(&self) -> &Schedule {
        &self.schedule
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn next(expr: &str, tz: &str, after: &str) -> String {
        Schedule::parse(expr, tz)
            .unwrap()
            .next_after(t(after))
            .unwrap()
            .to_rfc3339()
    }

    #[test]
    fn next_run_table() {
        let cases = [
            // (expression, zone, now, expected next run in UTC)
            (
                "@daily",
                "UTC",
                "2026-03-10T12:00:00Z",
                "2026-03-11T00:00:00+00:00",
            ),
            (
                "@daily",
                "UTC",
                "2026-03-10T23:59:59Z",
                "2026-03-11T00:00:00+00:00",
            ),
            (
                "@daily",
                "UTC",
                "2026-03-11T00:00:00Z",
                "2026-03-12T00:00:00+00:00",
            ), // strictly after
            (
                "@hourly",
                "UTC",
                "2026-03-10T12:00:01Z",
                "2026-03-10T13:00:00+00:00",
            ),
            (
                "@weekly",
                "UTC",
                "2026-03-10T12:00:00Z",
                "2026-03-15T00:00:00+00:00",
            ), // Sunday
            (
                "@monthly",
                "UTC",
                "2026-03-10T12:00:00Z",
                "2026-04-01T00:00:00+00:00",
            ),
            (
                "@yearly",
                "UTC",
                "2026-03-10T12:00:00Z",
                "2027-01-01T00:00:00+00:00",
            ),
            (
                "30 3 * * *",
                "UTC",
                "2026-03-10T12:00:00Z",
                "2026-03-11T03:30:00+00:00",
            ),
            (
                "0 */6 * * *",
                "UTC",
                "2026-03-10T12:00:00Z",
                "2026-03-10T18:00:00+00:00",
            ),
            (
                "0 2 * * 1-5",
                "UTC",
                "2026-03-13T03:00:00Z",
                "2026-03-16T02:00:00+00:00",
            ), // Fri → Mon
            (
                "15 4 1 * *",
                "UTC",
                "2026-01-31T00:00:00Z",
                "2026-02-01T04:15:00+00:00",
            ),
            // Six fields: seconds first.
            (
                "*/5 * * * * *",
                "UTC",
                "2026-03-10T12:00:01Z",
                "2026-03-10T12:00:05+00:00",
            ),
            (
                "30 0 3 * * *",
                "UTC",
                "2026-03-10T12:00:00Z",
                "2026-03-11T03:00:30+00:00",
            ),
            // Zones: @daily is local midnight.
            (
                "@daily",
                "Europe/Berlin",
                "2026-01-10T12:00:00Z",
                "2026-01-10T23:00:00+00:00",
            ),
            (
                "@daily",
                "Europe/Berlin",
                "2026-07-10T12:00:00Z",
                "2026-07-10T22:00:00+00:00",
            ),
            (
                "@daily",
                "America/New_York",
                "2026-01-10T12:00:00Z",
                "2026-01-11T05:00:00+00:00",
            ),
            (
                "30 2 * * *",
                "Asia/Kolkata",
                "2026-01-10T12:00:00Z",
                "2026-01-10T21:00:00+00:00",
            ),
            (
                "0 3 * * *",
                "Pacific/Auckland",
                "2026-01-10T12:00:00Z",
                "2026-01-10T14:00:00+00:00",
            ),
            // Daylight saving in Berlin: 2026-03-29 02:00 → 03:00; 2026-10-25 03:00 → 02:00.
            (
                "0 3 * * *",
                "Europe/Berlin",
                "2026-03-28T12:00:00Z",
                "2026-03-29T01:00:00+00:00",
            ),
            (
                "0 3 * * *",
                "Europe/Berlin",
                "2026-03-29T12:00:00Z",
                "2026-03-30T01:00:00+00:00",
            ),
            (
                "0 3 * * *",
                "Europe/Berlin",
                "2026-10-24T12:00:00Z",
                "2026-10-25T02:00:00+00:00",
            ),
            // 02:30 does not exist on 2026-03-29 in Berlin: it runs right after the gap, at 03:00 CEST.
            (
                "30 2 * * *",
                "Europe/Berlin",
                "2026-03-28T12:00:00Z",
                "2026-03-29T01:00:00+00:00",
            ),
            // 02:30 happens twice on 2026-10-25: it runs once, the first time (CEST).
            (
                "30 2 * * *",
                "Europe/Berlin",
                "2026-10-24T12:00:00Z",
                "2026-10-25T00:30:00+00:00",
            ),
            (
                "30 2 * * *",
                "Europe/Berlin",
                "2026-10-25T00:30:00Z",
                "2026-10-26T01:30:00+00:00",
            ),
        ];
        for (expr, tz, now, want) in cases {
            assert_eq!(next(expr, tz, now), want, "{expr} in {tz} after {now}");
        }
    }

    #[test]
    fn bad_expressions_and_zones_are_config_errors() {
        for (expr, tz) in [
            ("", "UTC"),
            ("* * * *", "UTC"),
            ("* * * * * * * *", "UTC"),
            ("61 * * * *", "UTC"),
            ("@sometimes", "UTC"),
            ("0 0 30 2 *", "UTC"),
            ("@daily", "Europe/Nowhere"),
            ("@daily", ""),
        ] {
            let e = Schedule::parse(expr, tz).err();
            assert!(
                matches!(e, Some(Error::Config(_))),
                "{expr:?} in {tz:?}: {e:?}"
            );
        }
    }

    #[test]
    fn planner_with_a_manual_clock() {
        let clock = ManualClock::new(t("2026-03-10T12:00:00Z"));
        let s = Schedule::parse("0 */6 * * *", "UTC").unwrap();

        // backup_on_start: first run now, then the schedule.
        let mut p = Planner::new(s.clone(), true);
        assert_eq!(p.next(&clock), Some(t("2026-03-10T12:00:00Z")));
        clock.set(t("2026-03-10T12:20:00Z")); // that run ended
        assert_eq!(p.next(&clock), Some(t("2026-03-10T18:00:00Z")));

        // Without it: the next scheduled time.
        let mut p = Planner::new(s, false);
        clock.set(t("2026-03-10T12:00:00Z"));
        assert_eq!(p.next(&clock), Some(t("2026-03-10T18:00:00Z")));
        // A run that went on past two slots: they are skipped, not queued.
        clock.set(t("2026-03-11T01:00:00Z"));
        assert_eq!(p.next(&clock), Some(t("2026-03-11T06:00:00Z")));
    }
}
