//! ISO 8601 durations (`PT1S`, `P1DT2H30M`, `PT0.5S`) as node configuration JSON spells them.
//!
//! Only the exact units are accepted: weeks, days, hours, minutes and seconds. Years and months
//! have no fixed length and are rejected with an error that says so.

use std::time::Duration;

/// Why a string is not an ISO 8601 duration this protocol accepts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{input:?} is not an ISO 8601 duration: {reason}")]
pub struct DurationError {
    /// The string given.
    pub input: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

/// Formats a duration in the largest exact units, as the reference controller writes node
/// configurations: `PT0S`, `PT1M`, `PT1M30S`, `P1DT2H`, `P2W`, `PT0.25S` (a fraction only on
/// the seconds, only when needed). Years and months are never written: they have no fixed
/// length, and [`parse`] refuses them.
pub fn format(duration: Duration) -> String {
    if duration.is_zero() {
        return "PT0S".to_owned();
    }
    let mut secs = duration.as_secs();
    let nanos = duration.subsec_nanos();
    let mut out = String::from("P");
    for (unit, length) in [('W', 7 * 86_400), ('D', 86_400)] {
        if secs >= length {
            out.push_str(&format!("{}{unit}", secs / length));
            secs %= length;
        }
    }
    if secs == 0 && nanos == 0 {
        return out;
    }
    out.push('T');
    for (unit, length) in [('H', 3_600), ('M', 60)] {
        if secs >= length {
            out.push_str(&format!("{}{unit}", secs / length));
            secs %= length;
        }
    }
    if nanos != 0 {
        let frac = format!("{nanos:09}");
        out.push_str(&format!("{secs}.{}S", frac.trim_end_matches('0')));
    } else if secs != 0 {
        out.push_str(&format!("{secs}S"));
    }
    out
}

/// Parses `P[nW][nD][T[nH][nM][n[.f]S]]`.
pub fn parse(input: &str) -> Result<Duration, DurationError> {
    let fail = |reason| DurationError {
        input: input.to_owned(),
        reason,
    };
    let rest = input
        .strip_prefix('P')
        .ok_or_else(|| fail("it must start with 'P'"))?;
    if rest.is_empty() {
        return Err(fail("it has no components"));
    }
    let (date, time) = match rest.split_once('T') {
        Some((_, "")) => return Err(fail("'T' must be followed by a time component")),
        Some((date, time)) => (date, Some(time)),
        None => (rest, None),
    };

    let mut total = Duration::ZERO;
    let mut add = |value: Duration| -> Result<(), DurationError> {
        total = total
            .checked_add(value)
            .ok_or_else(|| fail("it is too long"))?;
        Ok(())
    };
    for (number, unit) in components(date).map_err(fail)? {
        let secs_per_unit: u64 = match unit {
            'W' => 7 * 86_400,
            'D' => 86_400,
            'Y' | 'M' => return Err(fail("years and months have no fixed length")),
            _ => return Err(fail("unknown date unit")),
        };
        add(scaled(number, secs_per_unit).ok_or_else(|| fail("bad number"))?)?;
    }
    if let Some(time) = time {
        for (number, unit) in components(time).map_err(fail)? {
            let secs_per_unit: u64 = match unit {
                'H' => 3_600,
                'M' => 60,
                'S' => 1,
                _ => return Err(fail("unknown time unit")),
            };
            add(scaled(number, secs_per_unit).ok_or_else(|| fail("bad number"))?)?;
        }
    }
    Ok(total)
}

/// Splits `1H30M` into `[("1", 'H'), ("30", 'M')]`.
fn components(s: &str) -> Result<Vec<(&str, char)>, &'static str> {
    let mut out = Vec::new();
    let mut start = 0;
    for (i, c) in s.char_indices() {
        if c.is_ascii_alphabetic() {
            if i == start {
                return Err("a unit has no number before it");
            }
            out.push((&s[start..i], c));
            start = i + c.len_utf8();
        } else if !(c.is_ascii_digit() || c == '.' || c == ',') {
            return Err("it contains a character that is neither digit nor unit");
        }
    }
    if start != s.len() {
        return Err("a number has no unit after it");
    }
    Ok(out)
}

/// `number` (decimal, `.` or `,` as separator) times `unit` seconds.
fn scaled(number: &str, unit: u64) -> Option<Duration> {
    let number = number.replace(',', ".");
    let (int, frac) = number.split_once('.').unwrap_or((&number, ""));
    if int.is_empty() || frac.contains('.') || frac.len() > 9 {
        return None;
    }
    let whole = int.parse::<u64>().ok()?.checked_mul(unit)?;
    let frac_nanos = if frac.is_empty() {
        0
    } else {
        let digits: u64 = frac.parse().ok()?;
        digits * 10u64.pow(9 - u32::try_from(frac.len()).ok()?)
    };
    let frac_total = u128::from(frac_nanos) * u128::from(unit);
    let extra_secs = u64::try_from(frac_total / 1_000_000_000).ok()?;
    let nanos = u32::try_from(frac_total % 1_000_000_000).ok()?;
    Some(Duration::new(whole.checked_add(extra_secs)?, nanos))
}

/// `#[serde(with = "...")]` for a `Duration` spelled as an ISO 8601 string.
pub mod serde_duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer, de::Error as _};

    /// Writes `PT<seconds>S`.
    pub fn serialize<S: Serializer>(value: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::format(*value))
    }

    /// Reads an ISO 8601 duration, failing with a message that names the bad string.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        super::parse(&text).map_err(D::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_spellings_node_configs_use() {
        assert_eq!(parse("PT1S"), Ok(Duration::from_secs(1)));
        assert_eq!(parse("PT0.5S"), Ok(Duration::from_millis(500)));
        assert_eq!(parse("PT1M30S"), Ok(Duration::from_secs(90)));
        assert_eq!(parse("P1DT2H"), Ok(Duration::from_secs(86_400 + 7_200)));
        assert_eq!(parse("P2W"), Ok(Duration::from_secs(14 * 86_400)));
        assert_eq!(parse("PT0,25S"), Ok(Duration::from_millis(250)));
        assert_eq!(parse("PT0.5M"), Ok(Duration::from_secs(30)));
    }

    #[test]
    fn rejects_what_is_not_a_fixed_duration() {
        for bad in [
            "", "P", "PT", "1S", "PTS", "PT1", "P1M", "P1Y", "PT1X", "PT-1S", "PT1.2.3S",
        ] {
            let err = parse(bad).expect_err(bad);
            assert_eq!(err.input, bad);
        }
    }

    #[test]
    fn format_then_parse_is_identity() {
        for d in [
            Duration::ZERO,
            Duration::from_secs(1),
            Duration::from_millis(1500),
            Duration::from_nanos(1),
            Duration::from_secs(86_400 * 3 + 5),
        ] {
            assert_eq!(parse(&format(d)), Ok(d), "{}", format(d));
        }
        assert_eq!(format(Duration::from_secs(1)), "PT1S");
        assert_eq!(format(Duration::ZERO), "PT0S");
        assert_eq!(format(Duration::from_secs(60)), "PT1M");
        assert_eq!(format(Duration::from_secs(61)), "PT1M1S");
        assert_eq!(format(Duration::from_secs(86_400 + 7_200)), "P1DT2H");
        assert_eq!(format(Duration::from_secs(14 * 86_400)), "P2W");
        assert_eq!(format(Duration::new(60, 32_000)), "PT1M0.000032S");
        assert_eq!(format(Duration::from_millis(250)), "PT0.25S");
    }
}
