//! Kubernetes quantities (`resource.Quantity`), as `split.smi-spec.io/v1alpha1` weights
//! are written, in exact integer milli-units.

use serde_json::Value;

/// Longest quantity text read: far beyond any weight, short enough to bound the work.
const MAX_LEN: usize = 64;

/// A quantity's value in milli-units (`500m` → 500, `1` → 1000, `1.5` → 1500, `2k` →
/// 2,000,000), exactly: an error when the value is negative, finer than a milli-unit
/// (`1u`, `0.0001`) or larger than an `i64` holds.
///
/// `text` follows the Kubernetes grammar: an optionally signed decimal number (`1`,
/// `1.5`, `.5`, `5.`) and a suffix: none, a decimal SI one (`n u m k M G T P E`), a
/// binary SI one (`Ki Mi Gi Ti Pi Ei`) or a decimal exponent (`e3`, `E-2`).
pub fn parse_milli(text: &str) -> Result<i64, String> {
    let not_a_quantity = || format!("{text:?} is not a quantity (such as 1, 500m or 1.5)");
    if text.is_empty() || text.len() > MAX_LEN {
        return Err(not_a_quantity());
    }
    let (negative, rest) = match text.as_bytes()[0] {
        b'+' => (false, &text[1..]),
        b'-' => (true, &text[1..]),
        _ => (false, text),
    };
    let number_end = rest
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(rest.len());
    let (number, suffix) = rest.split_at(number_end);
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    if (whole.is_empty() && fraction.is_empty()) || fraction.contains('.') {
        return Err(not_a_quantity());
    }
    // The value is digits × 10^exp10 × 2^exp2; in milli-units 10^(exp10 + 3).
    let (exp10, exp2): (i64, u32) = match suffix {
        "" => (0, 0),
        "n" => (-9, 0),
        "u" => (-6, 0),
        "m" => (-3, 0),
        "k" => (3, 0),
        "M" => (6, 0),
        "G" => (9, 0),
        "T" => (12, 0),
        "P" => (15, 0),
        "E" => (18, 0),
        "Ki" => (0, 10),
        "Mi" => (0, 20),
        "Gi" => (0, 30),
        "Ti" => (0, 40),
        "Pi" => (0, 50),
        "Ei" => (0, 60),
        _ => match suffix.strip_prefix(['e', 'E']) {
            Some(exponent) if is_signed_integer(exponent) => {
                (exponent.parse::<i64>().map_err(|_| not_a_quantity())?, 0)
            }
            _ => return Err(not_a_quantity()),
        },
    };
    let mut digits: u128 = 0;
    let mut overflowed = false;
    for d in whole.bytes().chain(fraction.bytes()) {
        match digits
            .checked_mul(10)
            .and_then(|v| v.checked_add(u128::from(d - b'0')))
        {
            Some(v) => digits = v,
            None => overflowed = true,
        }
    }
    let too_large = || format!("{text} is too large a weight");
    if digits == 0 {
        return Ok(0);
    }
    if negative {
        return Err(format!("{text} is negative; weights are 0 or more"));
    }
    if overflowed {
        return Err(too_large());
    }
    let scale = exp10 + 3 - i64::try_from(fraction.len()).map_err(|_| not_a_quantity())?;
    let milli = if scale >= 0 {
        u32::try_from(scale)
            .ok()
            .and_then(|s| 10u128.checked_pow(s))
            .and_then(|p| digits.checked_mul(p))
            .ok_or_else(too_large)?
    } else {
        let divisor = u32::try_from(-scale)
            .ok()
            .and_then(|s| 10u128.checked_pow(s));
        match divisor {
            Some(d) if digits.is_multiple_of(d) => digits / d,
            _ => {
                return Err(format!(
                    "{text} is finer than a milli-unit (1m), the finest weight Weft reads"
                ));
            }
        }
    };
    let milli = milli.checked_mul(1u128 << exp2).ok_or_else(too_large)?;
    i64::try_from(milli).map_err(|_| too_large())
}

fn is_signed_integer(s: &str) -> bool {
    let digits = s.strip_prefix(['+', '-']).unwrap_or(s);
    !digits.is_empty() && digits.len() <= 18 && digits.bytes().all(|b| b.is_ascii_digit())
}

/// A JSON weight (a string, or a number as YAML and JSON write `1` or `0.5`) in
/// milli-units.
pub fn value_milli(value: &Value) -> Result<i64, String> {
    match value {
        Value::String(s) => parse_milli(s),
        Value::Number(n) => parse_milli(&n.to_string()),
        other => Err(format!(
            "{other} is not a quantity (such as 1, 500m or 1.5)"
        )),
    }
}

/// The canonical quantity of `milli` milli-units, as a string: `"3"` for 3000,
/// `"500m"` for 500, `"0"` for 0.
pub fn canonical(milli: i64) -> Value {
    if milli % 1000 == 0 {
        Value::String((milli / 1000).to_string())
    } else {
        Value::String(format!("{milli}m"))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn quantities_in_milli_units() {
        for (text, milli) in [
            ("500m", 500),
            ("1500m", 1500),
            ("1", 1000),
            ("0", 0),
            ("0m", 0),
            ("-0", 0),
            ("+2", 2000),
            ("1.5", 1500),
            (".5", 500),
            ("5.", 5000),
            ("0.001", 1),
            ("1000000n", 1),
            ("1000u", 1),
            ("2k", 2_000_000),
            ("1M", 1_000_000_000),
            ("1Ki", 1_024_000),
            ("1e3", 1_000_000),
            ("1E3", 1_000_000),
            ("15e-1", 1500),
            ("1e-3", 1),
            ("100", 100_000),
        ] {
            assert_eq!(parse_milli(text), Ok(milli), "{text}");
        }
    }

    #[test]
    fn what_is_not_an_exact_weight_is_refused_with_a_reason() {
        for (text, why) in [
            ("", "not a quantity"),
            ("abc", "not a quantity"),
            ("1.2.3", "not a quantity"),
            (".", "not a quantity"),
            ("1x", "not a quantity"),
            ("1e", "not a quantity"),
            ("1e1.5", "not a quantity"),
            ("1 ", "not a quantity"),
            ("-1", "negative"),
            ("-500m", "negative"),
            ("1u", "finer than a milli-unit"),
            ("0.0001", "finer than a milli-unit"),
            ("1e-4", "finer than a milli-unit"),
            ("10E", "too large"),
            ("99999999999999999999999999999999999999999", "too large"),
            ("1e100", "too large"),
        ] {
            let err = parse_milli(text).unwrap_err();
            assert!(err.contains(why), "{text}: {err}");
        }
        assert!(parse_milli(&"1".repeat(65)).is_err());
    }

    #[test]
    fn canonical_form_reads_back_to_the_same_value() {
        for milli in [0, 1, 500, 999, 1000, 1500, 80_000, 1_000_000, i64::MAX] {
            let c = canonical(milli);
            assert_eq!(value_milli(&c), Ok(milli), "{c}");
        }
        assert_eq!(canonical(500), Value::from("500m"));
        assert_eq!(canonical(3000), Value::from("3"));
        assert_eq!(value_milli(&serde_json::json!(0.5)), Ok(500));
        assert_eq!(value_milli(&serde_json::json!(3)), Ok(3000));
        assert!(value_milli(&Value::Null).is_err());
    }
}
