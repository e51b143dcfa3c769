//! The one grammar for durations that an operator writes: a flag of mesh-init (istio-iptables'
//! `--probe-timeout`), a field of mesh-proxy's config, a flag of mesh-pilot.
//!
//! It is Go's `time.ParseDuration`, because that is what istio-iptables' flags and Istio's
//! resources (`timeout: 1.5s`, `baseEjectionTime: 1m30s`) are written in: one or more decimal
//! numbers, each with a unit (`ns`, `us` or `µs`, `ms`, `s`, `m`, `h`), summed. A bare number is
//! refused (the unit is never guessed), except `0`, as in Go. Negative durations are refused:
//! nothing here has a use for them.

use core::{fmt, time::Duration};

/// Why a duration did not parse; `Display` says what is expected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DurationError {
    /// Nothing but white space.
    Empty,
    /// A number without its unit (`5`).
    MissingUnit,
    /// A unit that is not one of Go's.
    UnknownUnit,
    /// Not a decimal number where one was due (`1..5s`, `s`, `-1s`).
    InvalidNumber,
    /// More than `u64::MAX` nanoseconds (584 years).
    TooLong,
}

impl fmt::Display for DurationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match self {
            Self::Empty => "empty",
            Self::MissingUnit => "a number needs its unit",
            Self::UnknownUnit => "unknown unit",
            Self::InvalidNumber => "not a non-negative decimal number",
            Self::TooLong => "too long",
        };
        write!(f, "{what}: expected numbers with units ns, us, ms, s, m or h, e.g. 250ms, 1.5s or 1m30s")
    }
}

/// Parses a duration: see the [module](self) for the grammar.
pub fn parse(s: &str) -> Result<Duration, DurationError> {
    let s = s.trim();
    if s.is_empty() {
        return Err(DurationError::Empty);
    }
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    let mut rest = s;
    let mut total: u128 = 0;
    while !rest.is_empty() {
        let number_len = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(rest.len());
        let (number, after) = rest.split_at(number_len);
        let unit_len = after.find(|c: char| c.is_ascii_digit() || c == '.').unwrap_or(after.len());
        let (unit, after) = after.split_at(unit_len);
        if number.is_empty() {
            return Err(DurationError::InvalidNumber);
        }
        let unit_nanos: u128 = match unit {
            "" => return Err(DurationError::MissingUnit),
            "ns" => 1,
            "us" | "µs" | "μs" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            _ => return Err(DurationError::UnknownUnit),
        };
        total = total.checked_add(nanos(number, unit_nanos)?).ok_or(DurationError::TooLong)?;
        rest = after;
    }
    let total = u64::try_from(total).map_err(|_| DurationError::TooLong)?;
    Ok(Duration::from_nanos(total))
}

/// `number` (`12`, `1.5`, `.5`, `3.`) times `unit_nanos`, fractions below a nanosecond dropped
/// as Go drops them.
fn nanos(number: &str, unit_nanos: u128) -> Result<u128, DurationError> {
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    if (whole.is_empty() && fraction.is_empty()) || fraction.contains('.') {
        return Err(DurationError::InvalidNumber);
    }
    let mut value: u128 = 0;
    for d in whole.bytes() {
        value =
            value.checked_mul(10).and_then(|v| v.checked_add(u128::from(d - b'0'))).ok_or(DurationError::TooLong)?;
    }
    let mut value = value.checked_mul(unit_nanos).ok_or(DurationError::TooLong)?;
    // Digits past the nanosecond cannot change the result: at most 20 are looked at.
    let mut scale = unit_nanos;
    for d in fraction.bytes().take(20) {
        scale /= 10;
        value += u128::from(d - b'0') * scale;
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_go_durations() {
        let ms = Duration::from_millis;
        for (text, want) in [
            ("0", Duration::ZERO),
            ("0s", Duration::ZERO),
            ("250ms", ms(250)),
            ("1s", ms(1000)),
            ("1.5s", ms(1500)),
            (".5s", ms(500)),
            ("3.s", ms(3000)),
            ("2m", ms(120_000)),
            ("1h", ms(3_600_000)),
            ("1m30s", ms(90_000)),
            ("1h2m3s4ms", ms(3_723_004)),
            ("300us", Duration::from_micros(300)),
            ("300µs", Duration::from_micros(300)),
            ("7ns", Duration::from_nanos(7)),
            ("1.0000000001s", ms(1000)),
            (" 5s ", ms(5000)),
        ] {
            assert_eq!(parse(text), Ok(want), "{text:?}");
        }
    }

    #[test]
    fn refuses_what_go_refuses() {
        for (text, want) in [
            ("", DurationError::Empty),
            ("5", DurationError::MissingUnit),
            ("1s5", DurationError::MissingUnit),
            ("5 s", DurationError::UnknownUnit),
            ("5d", DurationError::UnknownUnit),
            ("-1s", DurationError::InvalidNumber),
            ("s", DurationError::InvalidNumber),
            (".s", DurationError::InvalidNumber),
            ("1.2.3s", DurationError::InvalidNumber),
            ("9999999999999h", DurationError::TooLong),
        ] {
            assert_eq!(parse(text), Err(want), "{text:?}");
        }
    }
}
