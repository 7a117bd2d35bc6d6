//! `portRange` / `--proxy-port-range`: the host ports proxy listeners may use.
//!
//! Syntax of apimachinery's `PortRange.Set`: `A-B`, `A` or `A+N` (meaning `A..=A+N`). Empty,
//! `0` or `0-0` means "let the kernel choose an ephemeral port", which is also the default and
//! the safest choice (thockin in kubernetes#7846: fixed ranges risk clashing with pod host
//! ports).

use std::fmt;
use std::ops::RangeInclusive;

/// Where proxy ports come from.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub enum PortRange {
    /// The kernel picks an ephemeral port for each listener.
    #[default]
    Ephemeral,
    /// Ports from this inclusive range.
    Range(RangeInclusive<u16>),
}

impl PortRange {
    /// Parses kube-proxy's syntax.
    ///
    /// # Errors
    /// Text that is not `A-B`, `A` or `A+N` with `0 < A <= B <= 65535`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if s.is_empty() || s == "0" || s == "0-0" {
            return Ok(PortRange::Ephemeral);
        }
        let num = |t: &str| -> Result<u32, String> {
            t.trim()
                .parse::<u32>()
                .map_err(|_| format!("{s:?} is not a port range (A-B, A or A+N)"))
        };
        let (lo, hi) = if let Some((a, b)) = s.split_once('-') {
            (num(a)?, num(b)?)
        } else if let Some((a, n)) = s.split_once('+') {
            let a = num(a)?;
            (a, a + num(n)?)
        } else {
            let a = num(s)?;
            (a, a)
        };
        if lo == 0 || hi > 65_535 {
            return Err(format!("{s:?}: ports must be between 1 and 65535"));
        }
        if hi < lo {
            return Err(format!("{s:?}: end of range is below its start"));
        }
        Ok(PortRange::Range(lo as u16..=hi as u16))
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PortRange::Ephemeral => Ok(()),
            PortRange::Range(r) => write!(f, "{}-{}", r.start(), r.end()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_form() {
        assert_eq!(PortRange::parse("").unwrap(), PortRange::Ephemeral);
        assert_eq!(PortRange::parse("0").unwrap(), PortRange::Ephemeral);
        assert_eq!(PortRange::parse("0-0").unwrap(), PortRange::Ephemeral);
        assert_eq!(
            PortRange::parse("20000-20999").unwrap(),
            PortRange::Range(20000..=20999)
        );
        assert_eq!(
            PortRange::parse("30000").unwrap(),
            PortRange::Range(30000..=30000)
        );
        assert_eq!(
            PortRange::parse("30000+9").unwrap(),
            PortRange::Range(30000..=30009)
        );
    }

    #[test]
    fn rejects_bad_ranges() {
        assert!(PortRange::parse("2000-1000")
            .unwrap_err()
            .contains("below its start"));
        assert!(PortRange::parse("1-70000").unwrap_err().contains("65535"));
        assert!(PortRange::parse("abc").is_err());
        assert!(PortRange::parse("65535+1").is_err());
    }
}
