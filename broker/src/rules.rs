//! A pool's rules: data an admin writes (TOML), checked before they are
//! stored, and what they ask for at a given moment.
//!
//! ```toml
//! min_idle = 2            # started, unassigned VMs kept ready
//! max = 10                # VMs the pool may have, in any state
//! per_user = 1            # desktops one user may hold at once
//! stateless = true        # reset a VM's disk when its session ends
//! idle_timeout = "30m"    # reclaim a session nobody used for this long
//!
//! [[window]]              # the first window that holds overrides the above
//! days = "mon-fri"        # mon..sun, ranges and lists: "mon-fri", "sat,sun", "*"
//! from = "08:00"          # local time; `to` before `from` spans midnight
//! to = "18:00"
//! min_idle = 10
//! ```

use std::fmt;
use std::time::Duration;

use chrono::{Datelike, NaiveTime, Timelike, Weekday};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// A pool's rules.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rules {
    /// Started, unassigned VMs to keep ready.
    pub min_idle: u32,
    /// VMs the pool may have, in any state.
    pub max: u32,
    /// Desktops one user may hold at once.
    #[serde(default = "one")]
    pub per_user: u32,
    /// Reset a VM's disk when its session ends (else the VM stays the
    /// user's).
    #[serde(default)]
    pub stateless: bool,
    /// Reclaim a session unused for this long (`30m`, `2h`); none: never.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout: Option<String>,
    /// Time windows that override `min_idle` and `max`.
    #[serde(default, rename = "window", skip_serializing_if = "Vec::is_empty")]
    pub windows: Vec<Window>,
}

fn one() -> u32 {
    1
}

/// A time window of the week.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Window {
    /// Days: `mon-fri`, `sat,sun`, `*`.
    pub days: String,
    /// Start, `HH:MM` local time.
    pub from: String,
    /// End (exclusive), `HH:MM`; before `from` when the window spans
    /// midnight.
    pub to: String,
    /// `min_idle` inside the window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_idle: Option<u32>,
    /// `max` inside the window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<u32>,
}

/// What the rules ask for at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Limits {
    /// Idle VMs to keep.
    pub min_idle: u32,
    /// VMs at most.
    pub max: u32,
    /// Index of the window in force, if any.
    pub window: Option<usize>,
}

/// A moment of the week, local time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WeekTime {
    /// The day.
    pub day: Weekday,
    /// Minutes since midnight.
    pub minute: u32,
}

impl WeekTime {
    /// Now, in the machine's local time zone.
    pub fn now() -> WeekTime {
        let t = chrono::Local::now();
        WeekTime {
            day: t.weekday(),
            minute: t.hour() * 60 + t.minute(),
        }
    }
}

impl Rules {
    /// Parses and checks rules written as TOML.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] naming the field and what is wrong with it.
    pub fn from_toml(text: &str) -> Result<Rules> {
        let rules: Rules =
            toml::from_str(text).map_err(|e| Error::InvalidInput(format!("bad rules: {e}")))?;
        rules.check()?;
        Ok(rules)
    }

    /// The rules as TOML.
    pub fn to_toml(&self) -> String {
        // Plain data: serialising it cannot fail.
        toml::to_string_pretty(self).unwrap_or_default()
    }

    /// Checks that the rules can hold.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] naming the field.
    pub fn check(&self) -> Result<()> {
        let bad = |m: String| Err(Error::InvalidInput(format!("bad rules: {m}")));
        if self.max == 0 {
            return bad("max must be at least 1".into());
        }
        if self.min_idle > self.max {
            return bad(format!(
                "min_idle {} is above max {}: the pool could never hold it",
                self.min_idle, self.max
            ));
        }
        if self.per_user == 0 {
            return bad("per_user must be at least 1".into());
        }
        self.idle_timeout()?;
        for (i, w) in self.windows.iter().enumerate() {
            let n = i + 1;
            parse_days(&w.days)
                .map_err(|m| Error::InvalidInput(format!("bad rules: window {n}: {m}")))?;
            let from = parse_hhmm(&w.from)
                .map_err(|m| Error::InvalidInput(format!("bad rules: window {n}: from: {m}")))?;
            let to = parse_hhmm(&w.to)
                .map_err(|m| Error::InvalidInput(format!("bad rules: window {n}: to: {m}")))?;
            if from == to {
                return bad(format!("window {n}: from and to are both {}", w.from));
            }
            let min_idle = w.min_idle.unwrap_or(self.min_idle);
            let max = w.max.unwrap_or(self.max);
            if max == 0 {
                return bad(format!("window {n}: max must be at least 1"));
            }
            if min_idle > max {
                return bad(format!(
                    "window {n}: min_idle {min_idle} is above max {max}: the pool could never hold it"
                ));
            }
        }
        Ok(())
    }

    /// The idle timeout.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] for a duration that does not parse.
    pub fn idle_timeout(&self) -> Result<Option<Duration>> {
        self.idle_timeout
            .as_deref()
            .map(|s| {
                humantime::parse_duration(s).map_err(|e| {
                    Error::InvalidInput(format!(
                        "bad rules: idle_timeout {s:?}: {e} (e.g. 30m, 2h)"
                    ))
                })
            })
            .transpose()
    }

    /// What the rules ask for at `at`: the first window that holds, else
    /// the base values.
    pub fn limits(&self, at: WeekTime) -> Limits {
        for (i, w) in self.windows.iter().enumerate() {
            if w.holds(at) {
                return Limits {
                    min_idle: w.min_idle.unwrap_or(self.min_idle),
                    max: w.max.unwrap_or(self.max),
                    window: Some(i),
                };
            }
        }
        Limits {
            min_idle: self.min_idle,
            max: self.max,
            window: None,
        }
    }
}

impl Window {
    fn holds(&self, at: WeekTime) -> bool {
        let (Ok(days), Ok(from), Ok(to)) = (
            parse_days(&self.days),
            parse_hhmm(&self.from),
            parse_hhmm(&self.to),
        ) else {
            return false;
        };
        if from < to {
            days[at.day.num_days_from_monday() as usize] && (from..to).contains(&at.minute)
        } else {
            // Spans midnight: the evening belongs to the day it starts on,
            // the early morning to the day before.
            let yesterday = at.day.pred().num_days_from_monday() as usize;
            (days[at.day.num_days_from_monday() as usize] && at.minute >= from)
                || (days[yesterday] && at.minute < to)
        }
    }
}

impl fmt::Display for Limits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "min_idle {} max {}", self.min_idle, self.max)?;
        if let Some(w) = self.window {
            write!(f, " (window {})", w + 1)?;
        }
        Ok(())
    }
}

const DAYS: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];

fn day(s: &str) -> std::result::Result<usize, String> {
    let s = s.trim().to_ascii_lowercase();
    DAYS.iter()
        .position(|d| s.starts_with(d) && d.len() >= 3 && s.len() >= 3)
        .ok_or_else(|| format!("days: {s:?} is not a day (mon, tue, … sun)"))
}

/// `mon-fri`, `sat,sun`, `mon,wed-fri`, `*`: which days of the week.
fn parse_days(s: &str) -> std::result::Result<[bool; 7], String> {
    let mut out = [false; 7];
    if s.trim() == "*" {
        return Ok([true; 7]);
    }
    for part in s.split(',') {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (day(a)?, day(b)?);
                let mut d = a;
                loop {
                    out[d] = true;
                    if d == b {
                        break;
                    }
                    d = (d + 1) % 7;
                }
            }
            None => out[day(part)?] = true,
        }
    }
    Ok(out)
}

/// `HH:MM` as minutes since midnight; `24:00` is the end of the day.
fn parse_hhmm(s: &str) -> std::result::Result<u32, String> {
    if s.trim() == "24:00" {
        return Ok(24 * 60);
    }
    NaiveTime::parse_from_str(s.trim(), "%H:%M")
        .map(|t| t.hour() * 60 + t.minute())
        .map_err(|_| format!("{s:?} is not a time of day HH:MM"))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn at(day: Weekday, h: u32, m: u32) -> WeekTime {
        WeekTime {
            day,
            minute: h * 60 + m,
        }
    }

    const OFFICE: &str = r#"
min_idle = 2
max = 12
idle_timeout = "30m"
[[window]]
days = "mon-fri"
from = "08:00"
to = "18:00"
min_idle = 10
"#;

    #[test]
    fn a_window_overrides_inside_its_hours_only() {
        let r = Rules::from_toml(OFFICE).unwrap();
        assert_eq!(r.limits(at(Weekday::Tue, 9, 0)).min_idle, 10);
        assert_eq!(r.limits(at(Weekday::Tue, 8, 0)).min_idle, 10);
        assert_eq!(r.limits(at(Weekday::Tue, 18, 0)).min_idle, 2);
        assert_eq!(r.limits(at(Weekday::Tue, 7, 59)).min_idle, 2);
        assert_eq!(r.limits(at(Weekday::Sat, 9, 0)).min_idle, 2);
        assert_eq!(r.limits(at(Weekday::Fri, 17, 59)).window, Some(0));
        assert_eq!(r.limits(at(Weekday::Sun, 12, 0)).max, 12);
        assert_eq!(r.idle_timeout().unwrap(), Some(Duration::from_secs(1800)));
    }

    #[test]
    fn windows_over_midnight_and_day_lists() {
        let r = Rules::from_toml(
            "min_idle = 1\nmax = 4\n[[window]]\ndays = \"fri,sat\"\nfrom = \"22:00\"\nto = \"06:00\"\nmax = 2\nmin_idle = 0\n",
        )
        .unwrap();
        assert_eq!(r.limits(at(Weekday::Fri, 23, 0)).max, 2);
        assert_eq!(
            r.limits(at(Weekday::Sat, 5, 0)).max,
            2,
            "Friday night runs into Saturday"
        );
        assert_eq!(
            r.limits(at(Weekday::Sun, 5, 0)).max,
            2,
            "Saturday night runs into Sunday"
        );
        assert_eq!(r.limits(at(Weekday::Mon, 5, 0)).max, 4);
        assert_eq!(r.limits(at(Weekday::Thu, 23, 0)).max, 4);
        assert_eq!(
            parse_days("sat-mon").unwrap(),
            [true, false, false, false, false, true, true]
        );
        assert_eq!(parse_days("*").unwrap(), [true; 7]);
    }

    #[test]
    fn rules_that_cannot_hold_are_refused_naming_the_field() {
        let e = |t: &str| Rules::from_toml(t).unwrap_err().to_string();
        assert!(e("min_idle = 5\nmax = 2\n").contains("min_idle 5 is above max 2"));
        assert!(e("min_idle = 0\nmax = 0\n").contains("max must be at least 1"));
        assert!(e("min_idle = 1\nmax = 2\nper_user = 0\n").contains("per_user"));
        assert!(e("min_idle = 1\nmax = 2\nidle_timeout = \"soon\"\n").contains("idle_timeout"));
        assert!(e("min_idle = 1\nmax = 2\nmaxx = 3\n").contains("maxx"));
        assert!(e("min_idle = 1\n").contains("max"));
        let w = "min_idle = 1\nmax = 4\n[[window]]\ndays = \"mon-fri\"\nfrom = \"08:00\"\nto = \"18:00\"\n";
        assert!(e(&format!("{w}min_idle = 9\n")).contains("window 1: min_idle 9 is above max 4"));
        assert!(e(&w.replace("mon-fri", "monday-funday")).contains("window 1: days"));
        assert!(e(&w.replace("18:00", "25:00")).contains("window 1: to"));
        assert!(e(&w.replace("18:00", "08:00")).contains("from and to"));
    }

    #[test]
    fn rules_round_trip_through_toml() {
        let r = Rules::from_toml(OFFICE).unwrap();
        assert_eq!(Rules::from_toml(&r.to_toml()).unwrap(), r);
    }
}
