//! Time as the control plane sees it: Unix milliseconds from a [`Clock`] that tests can
//! move, calendar arithmetic for budget periods and usage groups (UTC, proleptic Gregorian),
//! and parsing of the dates admins type.

use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const MS_PER_SECOND: i64 = 1_000;
const MS_PER_HOUR: i64 = 3_600_000;
const MS_PER_DAY: i64 = 86_400_000;

/// Where "now" comes from.
pub trait Clock: Send + Sync + 'static {
    /// Unix time in milliseconds.
    fn now_ms(&self) -> i64;

    /// Now as a monotonic instant, for ages and idle times measured inside the process (the
    /// key cache's entries, budget leases). The system clock answers [`Instant::now`].
    fn instant(&self) -> Instant {
        Instant::now()
    }
}

/// The system's wall clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> i64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
            .unwrap_or(0)
    }
}

/// A clock that moves only when told: for tests of expiry, budget periods, retention, the key
/// cache's time to live and idle leases.
#[derive(Debug)]
pub struct ManualClock {
    now_ms: AtomicI64,
    /// The Unix time and the instant at which the clock was made: its instants are this one
    /// moved by as much as its Unix time has moved since.
    origin_ms: i64,
    origin: Instant,
}

impl ManualClock {
    /// A clock stopped at `now_ms`.
    pub fn new(now_ms: i64) -> Self {
        ManualClock {
            now_ms: AtomicI64::new(now_ms),
            origin_ms: now_ms,
            origin: Instant::now(),
        }
    }

    /// Moves the clock forward by `ms` (back when negative).
    pub fn advance_ms(&self, ms: i64) {
        self.now_ms.fetch_add(ms, Ordering::SeqCst);
    }
}

impl Default for ManualClock {
    /// A clock stopped at the Unix epoch.
    fn default() -> Self {
        ManualClock::new(0)
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> i64 {
        self.now_ms.load(Ordering::SeqCst)
    }

    fn instant(&self) -> Instant {
        let moved = self.now_ms().saturating_sub(self.origin_ms);
        let by = Duration::from_millis(moved.unsigned_abs());
        let at = if moved >= 0 {
            self.origin.checked_add(by)
        } else {
            self.origin.checked_sub(by)
        };
        // Out of `Instant`'s range only after centuries of advancing: stay at the origin.
        at.unwrap_or(self.origin)
    }
}

/// A calendar date and time in UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Civil {
    pub(crate) year: i64,
    pub(crate) month: i64,
    pub(crate) day: i64,
    pub(crate) ms_of_day: i64,
}

/// Days since 1970-01-01 to a (year, month, day), after Howard Hinnant's `civil_from_days`.
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// The inverse of [`civil_from_days`].
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = if month > 2 { month - 3 } else { month + 9 };
    let doy = (153 * m + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

pub(crate) fn civil(ms: i64) -> Civil {
    let (year, month, day) = civil_from_days(ms.div_euclid(MS_PER_DAY));
    Civil {
        year,
        month,
        day,
        ms_of_day: ms.rem_euclid(MS_PER_DAY),
    }
}

/// Unix milliseconds of midnight UTC on the given date.
pub(crate) fn midnight_ms(year: i64, month: i64, day: i64) -> i64 {
    days_from_civil(year, month, day).saturating_mul(MS_PER_DAY)
}

/// The start of the hour holding `ms`.
pub(crate) fn hour_start(ms: i64) -> i64 {
    ms - ms.rem_euclid(MS_PER_HOUR)
}

/// The start of the UTC day holding `ms`.
pub(crate) fn day_start(ms: i64) -> i64 {
    ms - ms.rem_euclid(MS_PER_DAY)
}

/// The start of the UTC month holding `ms`.
pub(crate) fn month_start(ms: i64) -> i64 {
    let c = civil(ms);
    midnight_ms(c.year, c.month, 1)
}

/// The start of the UTC month after the one holding `ms`.
pub(crate) fn next_month_start(ms: i64) -> i64 {
    let c = civil(ms);
    if c.month == 12 {
        midnight_ms(c.year + 1, 1, 1)
    } else {
        midnight_ms(c.year, c.month + 1, 1)
    }
}

pub(crate) const HOUR_MS: i64 = MS_PER_HOUR;
pub(crate) const DAY_MS: i64 = MS_PER_DAY;

/// `2026-05-20T13:04:05.123Z`.
pub fn format_rfc3339_ms(ms: i64) -> String {
    let c = civil(ms);
    let secs = c.ms_of_day / MS_PER_SECOND;
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        c.year,
        c.month,
        c.day,
        secs / 3600,
        secs / 60 % 60,
        secs % 60,
        c.ms_of_day % MS_PER_SECOND
    )
}

/// `2026-05-20`.
pub(crate) fn format_date(ms: i64) -> String {
    let c = civil(ms);
    format!("{:04}-{:02}-{:02}", c.year, c.month, c.day)
}

/// `2026-05-20T13`.
pub(crate) fn format_hour(ms: i64) -> String {
    let c = civil(ms);
    format!(
        "{:04}-{:02}-{:02}T{:02}",
        c.year,
        c.month,
        c.day,
        c.ms_of_day / MS_PER_HOUR
    )
}

/// Parses what an admin types for a point in time: Unix milliseconds (`1760000000000`), a
/// date (`2026-05-20`, midnight UTC) or a UTC time (`2026-05-20T13:04:05Z`, optional
/// fraction of a second).
pub fn parse_time_ms(text: &str) -> Result<i64, String> {
    let text = text.trim();
    if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        return text
            .parse::<i64>()
            .map_err(|_| format!("`{text}` is too large for a time in milliseconds"));
    }
    let bad = || {
        format!(
            "`{text}` is not a date (YYYY-MM-DD), a UTC time (YYYY-MM-DDTHH:MM:SSZ) or Unix milliseconds"
        )
    };
    let (date, time) = match text.split_once(['T', 't', ' ']) {
        Some((d, t)) => (d, Some(t)),
        None => (text, None),
    };
    let mut parts = date.split('-');
    let (Some(y), Some(m), Some(d), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(bad());
    };
    let number = |s: &str, len: usize| -> Option<i64> {
        (s.len() == len && s.bytes().all(|b| b.is_ascii_digit()))
            .then(|| s.parse().ok())
            .flatten()
    };
    let (Some(year), Some(month), Some(day)) = (number(y, 4), number(m, 2), number(d, 2)) else {
        return Err(bad());
    };
    if !(1..=12).contains(&month) || day < 1 || day > days_in_month(year, month) {
        return Err(bad());
    }
    let mut ms = midnight_ms(year, month, day);
    if let Some(time) = time {
        let time = time
            .strip_suffix('Z')
            .or_else(|| time.strip_suffix('z'))
            .ok_or_else(|| format!("`{text}`: a time must be in UTC and end with `Z`"))?;
        let (hms, fraction) = match time.split_once('.') {
            Some((hms, fraction)) => (hms, Some(fraction)),
            None => (time, None),
        };
        let mut parts = hms.split(':');
        let (Some(h), Some(mi), Some(s), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(bad());
        };
        let (Some(h), Some(mi), Some(s)) = (number(h, 2), number(mi, 2), number(s, 2)) else {
            return Err(bad());
        };
        if h > 23 || mi > 59 || s > 59 {
            return Err(bad());
        }
        ms += (h * 3600 + mi * 60 + s) * MS_PER_SECOND;
        if let Some(fraction) = fraction {
            if fraction.is_empty() || !fraction.bytes().all(|b| b.is_ascii_digit()) {
                return Err(bad());
            }
            let millis: String = fraction.chars().chain("000".chars()).take(3).collect();
            ms += millis.parse::<i64>().map_err(|_| bad())?;
        }
    }
    Ok(ms)
}

fn days_in_month(year: i64, month: i64) -> i64 {
    let next = if month == 12 {
        days_from_civil(year + 1, 1, 1)
    } else {
        days_from_civil(year, month + 1, 1)
    };
    next - days_from_civil(year, month, 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_round_trips_over_four_centuries() {
        // Every 7th day across 400 years, the Gregorian cycle, both sides of the epoch.
        let mut days = -73_000;
        while days < 73_000 {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days, "{y}-{m}-{d}");
            days += 7;
        }
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
    }

    #[test]
    fn formats_and_parses() {
        let ms = parse_time_ms("2026-05-20T13:04:05.120Z").unwrap();
        assert_eq!(format_rfc3339_ms(ms), "2026-05-20T13:04:05.120Z");
        assert_eq!(format_date(ms), "2026-05-20");
        assert_eq!(format_hour(ms), "2026-05-20T13");
        assert_eq!(parse_time_ms("1970-01-02").unwrap(), DAY_MS);
        assert_eq!(parse_time_ms("1234").unwrap(), 1234);
        for bad in [
            "",
            "2026-13-01",
            "2026-02-30",
            "2026-5-20",
            "2026-05-20T25:00:00Z",
            "2026-05-20T10:00:00",
            "yesterday",
            "2026-05-20T10:00:00.Z",
        ] {
            assert!(parse_time_ms(bad).is_err(), "{bad}");
        }
        assert!(parse_time_ms("2024-02-29").is_ok());
    }

    #[test]
    fn period_starts() {
        let ms = parse_time_ms("2026-12-31T23:59:59Z").unwrap();
        assert_eq!(month_start(ms), parse_time_ms("2026-12-01").unwrap());
        assert_eq!(next_month_start(ms), parse_time_ms("2027-01-01").unwrap());
        assert_eq!(day_start(ms), parse_time_ms("2026-12-31").unwrap());
        assert_eq!(
            hour_start(ms),
            parse_time_ms("2026-12-31T23:00:00Z").unwrap()
        );
    }

    #[test]
    fn manual_clock_moves_when_told() {
        let clock = ManualClock::new(10);
        let start = clock.instant();
        clock.advance_ms(5);
        assert_eq!(clock.now_ms(), 15);
        assert_eq!(clock.instant() - start, Duration::from_millis(5));
        clock.advance_ms(-3);
        assert_eq!(clock.instant() - start, Duration::from_millis(2));
        assert!(SystemClock.now_ms() > 1_600_000_000_000);
    }
}
