//! Retention: which snapshots a `[retention]` policy keeps, with restic's `forget` semantics.
//!
//! Snapshots are sorted newest first. Each rule (`last`, `hourly`, `daily`, `weekly`, `monthly`,
//! `yearly`) has a count and a bucket function on the snapshot's time *in the configured time zone*
//! (hour, calendar day, ISO week, month, year; `last` puts every snapshot in its own bucket). Walking
//! the list, a rule keeps a snapshot when the snapshot opens a bucket the rule has not seen yet and
//! the rule has count left; the count then goes down by one. So each rule keeps the newest snapshot
//! of each of its N most recent buckets that hold a snapshot. Like restic, when a rule still has
//! count left at the oldest snapshot, that snapshot is kept too ("oldest daily"), so a young store
//! keeps its full history. A snapshot is kept when any rule keeps it; the reasons list every rule
//! that did. `-1` means "no limit" for a rule, `0` turns it off, and a policy whose rules are all
//! off keeps everything (it never deletes every snapshot). Ties (equal times) are ordered by id.
//!
//! Nothing here needs the identity: times come from the plaintext `summary.json`, or from the id.

use std::fmt;

use chrono::{DateTime, Datelike, TimeZone, Timelike, Utc};
use chrono_tz::Tz;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// `[retention]`: how many snapshots of each kind `forget` (and the agent after each backup) keeps.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetentionConfig {
    /// The N most recent snapshots.
    pub keep_last: i32,
    /// The newest snapshot of each of the N most recent hours that have one.
    pub keep_hourly: i32,
    /// … of each of the N most recent days.
    pub keep_daily: i32,
    /// … of each of the N most recent ISO weeks (Monday to Sunday).
    pub keep_weekly: i32,
    /// … of each of the N most recent months.
    pub keep_monthly: i32,
    /// … of each of the N most recent years.
    pub keep_yearly: i32,
    /// IANA time zone whose hours, days, weeks, months and years the rules count ("Europe/Berlin");
    /// empty means the `[schedule] timezone`.
    pub timezone: String,
    /// `forget --keep-within`: every snapshot less than this before the newest one (not a config
    /// key).
    #[serde(skip)]
    pub keep_within: Option<Within>,
}

/// restic's `--keep-within` duration: years, months, days and hours (`1y6m`, `7d`, `2d12h`),
/// counted back from the newest snapshot's time in calendar terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Within {
    pub years: u32,
    pub months: u32,
    pub days: u32,
    pub hours: u32,
}

impl std::str::FromStr for Within {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Within, String> {
        let bad = || format!("{s:?} is not a duration like 7d, 2d12h or 1y6m (y, m, d, h)");
        let mut w = Within::default();
        let mut digits = String::new();
        for c in s.chars() {
            if c.is_ascii_digit() {
                digits.push(c);
                continue;
            }
            let n: u32 = digits.parse().map_err(|_| bad())?;
            digits.clear();
            match c {
                'y' => w.years += n,
                'm' => w.months += n,
                'd' => w.days += n,
                'h' => w.hours += n,
                _ => return Err(bad()),
            }
        }
        if !digits.is_empty() || w == Within::default() {
            return Err(bad());
        }
        Ok(w)
    }
}

impl fmt::Display for Within {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (n, u) in [
            (self.years, 'y'),
            (self.months, 'm'),
            (self.days, 'd'),
            (self.hours, 'h'),
        ] {
            if n > 0 {
                write!(f, "{n}{u}")?;
            }
        }
        Ok(())
    }
}

impl Within {
    /// The oldest time still within this duration before `newest`.
    fn since<T: TimeZone>(&self, newest: &DateTime<T>) -> DateTime<T> {
        let months = chrono::Months::new(self.years * 12 + self.months);
        newest
            .clone()
            .checked_sub_months(months)
            .and_then(|t| t.checked_sub_signed(chrono::Duration::days(self.days.into())))
            .and_then(|t| t.checked_sub_signed(chrono::Duration::hours(self.hours.into())))
            .unwrap_or_else(|| newest.clone())
    }
}

impl Default for RetentionConfig {
    fn default() -> Self {
        RetentionConfig {
            keep_last: 0,
            keep_hourly: 0,
            keep_daily: 7,
            keep_weekly: 4,
            keep_monthly: 6,
            keep_yearly: 0,
            timezone: String::new(),
            keep_within: None,
        }
    }
}

impl RetentionConfig {
    /// Checks that need no I/O.
    pub(crate) fn validate(&self) -> Result<()> {
        for (name, n) in self.counts() {
            if n < -1 {
                return Err(Error::Config(format!(
                    "[retention] keep_{name} = {n}: use a count, 0 (off) or -1 (no limit)"
                )));
            }
        }
        if !self.timezone.is_empty() {
            parse_timezone(&self.timezone, "[retention] timezone")?;
        }
        Ok(())
    }

    fn counts(&self) -> [(&'static str, i32); 6] {
        [
            ("last", self.keep_last),
            ("hourly", self.keep_hourly),
            ("daily", self.keep_daily),
            ("weekly", self.keep_weekly),
            ("monthly", self.keep_monthly),
            ("yearly", self.keep_yearly),
        ]
    }

    /// No rule is on: everything is kept.
    pub fn is_empty(&self) -> bool {
        self.counts().iter().all(|(_, n)| *n == 0) && self.keep_within.is_none()
    }

    /// "keep 7 daily, 4 weekly, 6 monthly snapshots (Europe/Berlin)".
    pub(crate) fn describe(&self, tz: Tz) -> String {
        if self.is_empty() {
            return "keep all snapshots (no [retention] rule is set)".into();
        }
        let mut parts: Vec<String> = self
            .counts()
            .iter()
            .filter(|(_, n)| *n != 0)
            .map(|(name, n)| {
                if *n == -1 {
                    format!("all {name}")
                } else {
                    format!("{n} {name}")
                }
            })
            .collect();
        if let Some(w) = self.keep_within {
            parts.push(format!("all within {w} of the newest"));
        }
        format!("keep {} snapshots ({tz})", parts.join(", "))
    }
}

/// Parse an IANA zone name ("UTC", "Europe/Berlin"); `what` names the key for the error.
pub(crate) fn parse_timezone(name: &str, what: &str) -> Result<Tz> {
    name.parse::<Tz>().map_err(|_| {
        Error::Config(format!(
            "{what} {name:?} is not an IANA time zone name (like \"UTC\" or \"Europe/Berlin\")"
        ))
    })
}

/// One rule of a policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Rule {
    Last,
    Hourly,
    Daily,
    Weekly,
    Monthly,
    Yearly,
    /// `--keep-within`.
    Within,
}

impl Rule {
    const ALL: [Rule; 6] = [
        Rule::Last,
        Rule::Hourly,
        Rule::Daily,
        Rule::Weekly,
        Rule::Monthly,
        Rule::Yearly,
    ];

    /// The bucket of a snapshot at local time `t`, `nr`-th in the newest-first list.
    fn bucket<T: TimeZone>(self, t: &DateTime<T>, nr: usize) -> i64 {
        let (y, m, d, h) = (
            t.year() as i64,
            t.month() as i64,
            t.day() as i64,
            t.hour() as i64,
        );
        match self {
            Rule::Last => nr as i64,
            Rule::Hourly => ((y * 100 + m) * 100 + d) * 100 + h,
            Rule::Daily => (y * 100 + m) * 100 + d,
            Rule::Weekly => {
                let w = t.iso_week();
                w.year() as i64 * 100 + w.week() as i64
            }
            Rule::Monthly => y * 100 + m,
            Rule::Yearly => y,
            Rule::Within => 0,
        }
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Rule::Last => "last",
            Rule::Hourly => "hourly",
            Rule::Daily => "daily",
            Rule::Weekly => "weekly",
            Rule::Monthly => "monthly",
            Rule::Yearly => "yearly",
            Rule::Within => "within",
        })
    }
}

/// Why a rule keeps a snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Reason {
    pub rule: Rule,
    /// Kept as the oldest snapshot while the rule still had count left.
    pub oldest: bool,
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.oldest {
            write!(f, "oldest {}", self.rule)
        } else {
            write!(f, "{}", self.rule)
        }
    }
}

/// A snapshot to decide on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub id: String,
    pub time: DateTime<Utc>,
}

/// The decision for one snapshot.
#[derive(Debug, Clone, Serialize)]
pub struct Decision {
    pub id: String,
    pub time: DateTime<Utc>,
    pub keep: bool,
    /// Empty when the snapshot goes (or when the policy is empty and everything stays).
    pub reasons: Vec<Reason>,
}

impl Decision {
    /// "daily, weekly" or "-".
    pub fn reasons_text(&self) -> String {
        if self.reasons.is_empty() {
            return if self.keep {
                "no policy".into()
            } else {
                "-".into()
            };
        }
        self.reasons
            .iter()
            .map(|r| r.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Apply `policy` in zone `tz`: one decision per candidate, newest first.
pub fn apply(candidates: &[Candidate], policy: &RetentionConfig, tz: Tz) -> Vec<Decision> {
    let mut list: Vec<&Candidate> = candidates.iter().collect();
    list.sort_by(|a, b| b.time.cmp(&a.time).then_with(|| b.id.cmp(&a.id)));
    if policy.is_empty() {
        return list
            .into_iter()
            .map(|c| Decision {
                id: c.id.clone(),
                time: c.time,
                keep: true,
                reasons: Vec::new(),
            })
            .collect();
    }
    let mut counts: Vec<i32> = policy.counts().iter().map(|(_, n)| *n).collect();
    let mut last: [Option<i64>; 6] = [None; 6];
    let n = list.len();
    let since = match (policy.keep_within, list.first()) {
        (Some(w), Some(newest)) => Some(w.since(&newest.time.with_timezone(&tz))),
        _ => None,
    };
    let mut out = Vec::with_capacity(n);
    for (nr, c) in list.into_iter().enumerate() {
        let local = c.time.with_timezone(&tz);
        let mut reasons = Vec::new();
        if since.as_ref().is_some_and(|s| local >= *s) {
            reasons.push(Reason {
                rule: Rule::Within,
                oldest: false,
            });
        }
        for (i, rule) in Rule::ALL.iter().enumerate() {
            if counts[i] == 0 {
                continue;
            }
            let val = rule.bucket(&local, nr);
            let oldest = nr == n - 1;
            if last[i] != Some(val) || oldest {
                reasons.push(Reason {
                    rule: *rule,
                    oldest: oldest && last[i] == Some(val),
                });
                last[i] = Some(val);
                if counts[i] > 0 {
                    counts[i] -= 1;
                }
            }
        }
        out.push(Decision {
            id: c.id.clone(),
            time: c.time,
            keep: !reasons.is_empty(),
            reasons,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s)
            .unwrap_or_else(|e| panic!("{s}: {e}"))
            .with_timezone(&Utc)
    }

    fn policy(
        last: i32,
        hourly: i32,
        daily: i32,
        weekly: i32,
        monthly: i32,
        yearly: i32,
    ) -> RetentionConfig {
        RetentionConfig {
            keep_last: last,
            keep_hourly: hourly,
            keep_daily: daily,
            keep_weekly: weekly,
            keep_monthly: monthly,
            keep_yearly: yearly,
            timezone: String::new(),
            keep_within: None,
        }
    }

    /// Candidates named by their (UTC) times.
    fn snaps(times: &[&str]) -> Vec<Candidate> {
        times
            .iter()
            .map(|s| Candidate {
                id: s.to_string(),
                time: t(s),
            })
            .collect()
    }

    /// The kept ids (newest first) with their reasons, as "id: reasons".
    fn kept(times: &[&str], p: &RetentionConfig, tz: &str) -> Vec<String> {
        apply(&snaps(times), p, tz.parse().unwrap())
            .into_iter()
            .filter(|d| d.keep)
            .map(|d| format!("{}: {}", d.id, d.reasons_text()))
            .collect()
    }

    /// restic's own test data style: a run of snapshots over several years, irregular.
    const HISTORY: [&str; 22] = [
        "2014-09-01T10:20:30Z",
        "2014-09-02T10:20:30Z",
        "2014-09-05T10:20:30Z",
        "2014-09-06T10:20:30Z",
        "2014-09-08T10:20:30Z",
        "2014-09-09T10:20:30Z",
        "2014-09-10T10:20:30Z",
        "2014-09-11T10:20:30Z",
        "2014-09-20T10:20:30Z",
        "2014-09-22T10:20:30Z",
        "2014-08-08T10:20:30Z",
        "2014-08-10T10:20:30Z",
        "2014-08-12T10:20:30Z",
        "2014-08-13T10:20:30Z",
        "2014-08-13T10:20:30.1Z",
        "2014-08-15T10:20:30Z",
        "2014-08-18T10:20:30Z",
        "2014-08-20T10:20:30Z",
        "2014-08-21T10:20:30Z",
        "2014-08-22T10:20:30Z",
        "2014-10-01T10:20:30Z",
        "2014-10-02T10:20:30Z",
    ];

    /// `--keep-within`: everything less than the duration before the newest snapshot (months in
    /// calendar terms), besides what the other rules keep; a bad duration names the syntax.
    #[test]
    fn keep_within_keeps_what_is_close_to_the_newest() {
        let times = [
            "2026-03-31T10:00:00Z",
            "2026-03-30T11:00:00Z",
            "2026-03-24T11:00:00Z",
            "2026-02-28T10:00:00Z",
            "2026-01-01T00:00:00Z",
        ];
        let mut p = policy(0, 0, 0, 0, 0, 0);
        p.keep_within = Some("1d".parse().unwrap());
        assert_eq!(
            kept(&times, &p, "UTC"),
            [
                "2026-03-31T10:00:00Z: within",
                "2026-03-30T11:00:00Z: within"
            ]
        );
        p.keep_within = Some("1m3d".parse().unwrap());
        p.keep_last = 1;
        let k = kept(&times, &p, "UTC");
        assert_eq!(k.len(), 4, "{k:?}");
        assert_eq!(k[0], "2026-03-31T10:00:00Z: within, last");
        assert_eq!(k[3], "2026-02-28T10:00:00Z: within");
        assert_eq!(
            p.describe(Tz::UTC),
            "keep 1 last, all within 1m3d of the newest snapshots (UTC)"
        );
        for bad in ["", "7", "d", "7w", "-1d"] {
            let e = bad.parse::<Within>().unwrap_err();
            assert!(e.contains("7d, 2d12h or 1y6m"), "{bad}: {e}");
        }
        assert_eq!("2d12h".parse::<Within>().unwrap().to_string(), "2d12h");
    }

    #[test]
    fn table() {
        struct Case {
            name: &'static str,
            times: &'static [&'static str],
            policy: RetentionConfig,
            tz: &'static str,
            expect: &'static [&'static str],
        }
        let cases = [
            Case {
                name: "keep_last 3",
                times: &HISTORY,
                policy: policy(3, 0, 0, 0, 0, 0),
                tz: "UTC",
                expect: &[
                    "2014-10-02T10:20:30Z: last",
                    "2014-10-01T10:20:30Z: last",
                    "2014-09-22T10:20:30Z: last",
                ],
            },
            Case {
                name: "keep_last larger than the list keeps all once",
                times: &["2020-01-01T00:00:00Z", "2020-01-02T00:00:00Z"],
                policy: policy(5, 0, 0, 0, 0, 0),
                tz: "UTC",
                expect: &["2020-01-02T00:00:00Z: last", "2020-01-01T00:00:00Z: last"],
            },
            Case {
                name: "daily 3: newest of each of the 3 newest days",
                times: &[
                    "2020-03-10T23:00:00Z",
                    "2020-03-10T08:00:00Z",
                    "2020-03-09T12:00:00Z",
                    "2020-03-07T12:00:00Z",
                    "2020-03-07T01:00:00Z",
                    "2020-03-01T12:00:00Z",
                ],
                policy: policy(0, 0, 3, 0, 0, 0),
                tz: "UTC",
                expect: &[
                    "2020-03-10T23:00:00Z: daily",
                    "2020-03-09T12:00:00Z: daily",
                    "2020-03-07T12:00:00Z: daily",
                ],
            },
            Case {
                name: "daily with count left keeps the oldest too (restic)",
                times: &[
                    "2020-03-10T23:00:00Z",
                    "2020-03-10T08:00:00Z",
                    "2020-03-09T12:00:00Z",
                ],
                policy: policy(0, 0, 7, 0, 0, 0),
                tz: "UTC",
                expect: &["2020-03-10T23:00:00Z: daily", "2020-03-09T12:00:00Z: daily"],
            },
            Case {
                name: "oldest kept while the rule has count left, in the same bucket",
                times: &["2020-03-10T23:00:00Z", "2020-03-10T08:00:00Z"],
                policy: policy(0, 0, 7, 0, 0, 0),
                tz: "UTC",
                expect: &[
                    "2020-03-10T23:00:00Z: daily",
                    "2020-03-10T08:00:00Z: oldest daily",
                ],
            },
            Case {
                name: "hourly boundaries: 10:59:59 and 11:00:00 are different hours",
                times: &[
                    "2020-03-10T11:00:00Z",
                    "2020-03-10T10:59:59Z",
                    "2020-03-10T10:00:00Z",
                    "2020-03-10T09:30:00Z",
                ],
                policy: policy(0, 2, 0, 0, 0, 0),
                tz: "UTC",
                expect: &["2020-03-10T11:00:00Z: hourly", "2020-03-10T10:59:59Z: hourly"],
            },
            Case {
                name: "daily boundary at local midnight, not UTC midnight (Europe/Berlin, winter +01:00)",
                // 23:30Z on the 9th is 00:30 on the 10th in Berlin: same local day as 08:00Z on the 10th.
                times: &[
                    "2020-01-10T08:00:00Z",
                    "2020-01-09T23:30:00Z",
                    "2020-01-09T22:30:00Z",
                    "2020-01-08T12:00:00Z",
                ],
                policy: policy(0, 0, 2, 0, 0, 0),
                tz: "Europe/Berlin",
                expect: &["2020-01-10T08:00:00Z: daily", "2020-01-09T22:30:00Z: daily"],
            },
            Case {
                name: "the same snapshots in UTC",
                times: &[
                    "2020-01-10T08:00:00Z",
                    "2020-01-09T23:30:00Z",
                    "2020-01-09T22:30:00Z",
                    "2020-01-08T12:00:00Z",
                ],
                policy: policy(0, 0, 2, 0, 0, 0),
                tz: "UTC",
                expect: &["2020-01-10T08:00:00Z: daily", "2020-01-09T23:30:00Z: daily"],
            },
            Case {
                name: "daily in a zone west of UTC (America/New_York, -05:00)",
                // 03:00Z on the 10th is 22:00 on the 9th in New York.
                times: &[
                    "2020-01-10T06:00:00Z",
                    "2020-01-10T03:00:00Z",
                    "2020-01-09T20:00:00Z",
                ],
                policy: policy(0, 0, 2, 0, 0, 0),
                tz: "America/New_York",
                expect: &["2020-01-10T06:00:00Z: daily", "2020-01-10T03:00:00Z: daily"],
            },
            Case {
                name: "hourly across the DST fall-back hour (Europe/Berlin 2020-10-25: 02:xx twice)",
                // 00:30Z = 02:30 CEST, 01:30Z = 02:30 CET: the same local hour, one bucket.
                times: &[
                    "2020-10-25T02:10:00Z",
                    "2020-10-25T01:30:00Z",
                    "2020-10-25T00:30:00Z",
                    "2020-10-24T23:30:00Z",
                ],
                policy: policy(0, 3, 0, 0, 0, 0),
                tz: "Europe/Berlin",
                expect: &[
                    "2020-10-25T02:10:00Z: hourly",
                    "2020-10-25T01:30:00Z: hourly",
                    "2020-10-24T23:30:00Z: hourly",
                ],
            },
            Case {
                name: "weekly uses ISO weeks: Sunday and the next Monday differ, Mon..Sun share",
                times: &[
                    "2020-03-16T12:00:00Z", // Monday, week 12
                    "2020-03-15T12:00:00Z", // Sunday, week 11
                    "2020-03-09T12:00:00Z", // Monday, week 11
                    "2020-03-08T12:00:00Z", // Sunday, week 10
                ],
                policy: policy(0, 0, 0, 3, 0, 0),
                tz: "UTC",
                expect: &[
                    "2020-03-16T12:00:00Z: weekly",
                    "2020-03-15T12:00:00Z: weekly",
                    "2020-03-08T12:00:00Z: weekly",
                ],
            },
            Case {
                name: "ISO week-year boundary: 2020-12-31 and 2021-01-03 are both 2020-W53",
                times: &[
                    "2021-01-04T12:00:00Z", // 2021-W01
                    "2021-01-03T12:00:00Z", // 2020-W53
                    "2020-12-31T12:00:00Z", // 2020-W53
                    "2020-12-27T12:00:00Z", // 2020-W52
                ],
                policy: policy(0, 0, 0, 2, 0, 0),
                tz: "UTC",
                expect: &["2021-01-04T12:00:00Z: weekly", "2021-01-03T12:00:00Z: weekly"],
            },
            Case {
                name: "monthly boundary in a zone: 2020-01-31T23:30Z is February in Berlin",
                times: &[
                    "2020-02-10T12:00:00Z",
                    "2020-01-31T23:30:00Z",
                    "2020-01-31T12:00:00Z",
                    "2019-12-31T12:00:00Z",
                ],
                policy: policy(0, 0, 0, 0, 2, 0),
                tz: "Europe/Berlin",
                expect: &["2020-02-10T12:00:00Z: monthly", "2020-01-31T12:00:00Z: monthly"],
            },
            Case {
                name: "yearly: New Year's Eve in Auckland is already next year",
                times: &[
                    "2021-06-01T00:00:00Z",
                    "2020-12-31T12:00:00Z", // 2021-01-01 01:00 NZDT
                    "2020-06-01T00:00:00Z",
                    "2019-06-01T00:00:00Z",
                ],
                policy: policy(0, 0, 0, 0, 0, 2),
                tz: "Pacific/Auckland",
                expect: &["2021-06-01T00:00:00Z: yearly", "2020-06-01T00:00:00Z: yearly"],
            },
            Case {
                name: "combined rules share snapshots and list every reason",
                times: &[
                    "2020-03-10T23:00:00Z",
                    "2020-03-10T08:00:00Z",
                    "2020-03-09T12:00:00Z",
                    "2020-03-02T12:00:00Z",
                    "2020-02-20T12:00:00Z",
                    "2020-01-20T12:00:00Z",
                ],
                policy: policy(1, 0, 2, 2, 3, 0),
                tz: "UTC",
                expect: &[
                    "2020-03-10T23:00:00Z: last, daily, weekly, monthly",
                    "2020-03-09T12:00:00Z: daily",
                    "2020-03-02T12:00:00Z: weekly",
                    "2020-02-20T12:00:00Z: monthly",
                    "2020-01-20T12:00:00Z: monthly",
                ],
            },
            Case {
                name: "defaults (7 daily, 4 weekly, 6 monthly) over the history",
                times: &HISTORY,
                policy: RetentionConfig::default(),
                tz: "UTC",
                expect: &[
                    "2014-10-02T10:20:30Z: daily, weekly, monthly",
                    "2014-10-01T10:20:30Z: daily",
                    "2014-09-22T10:20:30Z: daily, weekly, monthly", // Monday: ISO week 39
                    "2014-09-20T10:20:30Z: daily, weekly",          // Saturday: week 38
                    "2014-09-11T10:20:30Z: daily, weekly",
                    "2014-09-10T10:20:30Z: daily",
                    "2014-09-09T10:20:30Z: daily",
                    "2014-08-22T10:20:30Z: monthly",
                    "2014-08-08T10:20:30Z: oldest monthly",
                ],
            },
            Case {
                name: "unlimited (-1) daily keeps one per day, all days",
                times: &[
                    "2020-03-10T23:00:00Z",
                    "2020-03-10T08:00:00Z",
                    "2020-03-09T12:00:00Z",
                    "2019-03-09T12:00:00Z",
                ],
                policy: policy(0, 0, -1, 0, 0, 0),
                tz: "UTC",
                expect: &[
                    "2020-03-10T23:00:00Z: daily",
                    "2020-03-09T12:00:00Z: daily",
                    "2019-03-09T12:00:00Z: daily",
                ],
            },
            Case {
                name: "empty policy keeps everything",
                times: &["2020-03-10T23:00:00Z", "2020-03-10T08:00:00Z"],
                policy: policy(0, 0, 0, 0, 0, 0),
                tz: "UTC",
                expect: &[
                    "2020-03-10T23:00:00Z: no policy",
                    "2020-03-10T08:00:00Z: no policy",
                ],
            },
            Case {
                name: "no snapshots",
                times: &[],
                policy: RetentionConfig::default(),
                tz: "UTC",
                expect: &[],
            },
        ];
        for c in &cases {
            let got = kept(c.times, &c.policy, c.tz);
            assert_eq!(got, c.expect, "case {:?}", c.name);
        }
    }

    #[test]
    fn ties_are_broken_by_id_newest_id_wins() {
        let time = t("2020-03-10T12:00:00Z");
        let cands = vec![
            Candidate {
                id: "20200310T120000Z-aaaaaaaa".into(),
                time,
            },
            Candidate {
                id: "20200310T120000Z-ffffffff".into(),
                time,
            },
            Candidate {
                id: "20200310T120000Z-55555555".into(),
                time,
            },
        ];
        let d = apply(&cands, &policy(1, 0, 0, 0, 0, 0), Tz::UTC);
        let ids: Vec<(&str, bool)> = d.iter().map(|d| (d.id.as_str(), d.keep)).collect();
        assert_eq!(
            ids,
            [
                ("20200310T120000Z-ffffffff", true),
                ("20200310T120000Z-aaaaaaaa", false),
                ("20200310T120000Z-55555555", false),
            ]
        );
        // Whatever order they come in, the decision is the same.
        let mut rev = cands.clone();
        rev.reverse();
        let d2 = apply(&rev, &policy(1, 0, 0, 0, 0, 0), Tz::UTC);
        assert_eq!(
            d2.iter().map(|d| (&d.id, d.keep)).collect::<Vec<_>>(),
            d.iter().map(|d| (&d.id, d.keep)).collect::<Vec<_>>()
        );
    }

    #[test]
    fn newest_is_always_kept_by_a_non_empty_policy() {
        for p in [
            policy(1, 0, 0, 0, 0, 0),
            policy(0, 1, 0, 0, 0, 0),
            policy(0, 0, 0, 0, 0, 1),
            RetentionConfig::default(),
        ] {
            let d = apply(&snaps(&HISTORY), &p, Tz::UTC);
            assert!(d[0].keep, "{p:?}");
            assert_eq!(d[0].id, "2014-10-02T10:20:30Z");
            assert_eq!(d.len(), HISTORY.len());
        }
    }

    #[test]
    fn validation_and_description() {
        assert!(policy(-2, 0, 0, 0, 0, 0).validate().is_err());
        let mut p = RetentionConfig::default();
        p.validate().unwrap();
        p.timezone = "Mars/Olympus".into();
        assert!(p.validate().is_err());
        assert_eq!(
            RetentionConfig::default().describe(Tz::Europe__Berlin),
            "keep 7 daily, 4 weekly, 6 monthly snapshots (Europe/Berlin)"
        );
        assert_eq!(
            policy(-1, 0, 0, 0, 0, 0).describe(Tz::UTC),
            "keep all last snapshots (UTC)"
        );
    }
}
