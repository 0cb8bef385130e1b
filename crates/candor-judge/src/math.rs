//! `math`: the final answer of the response equals the prompt line's `reference` numerically.
//!
//! The answer is the content of the last `\boxed{...}` when the response has one (the
//! DeepSeek-R1 / MATH convention), else the last number in the response. Numbers are
//! integers, decimals or fractions (`-12`, `3.50`, `1,234`, `3/4`); the reference is read the
//! same way (so `"reference": "\\boxed{7}"`, `"7"` and `7` all work). Scores 1 when the two
//! agree to 1e-9 relative (absolute below 1), else 0 — also when the response has no number.

use crate::{Error, Judge, Result, Sample};

pub struct MathJudge;

/// The content of the last `\boxed{...}`, braces balanced.
fn last_boxed(text: &str) -> Option<&str> {
    let start = text.rfind("\\boxed{")? + "\\boxed{".len();
    let mut depth = 1usize;
    for (i, c) in text[start..].char_indices() {
        match c {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    return Some(&text[start..start + i]);
                }
            }
            _ => {}
        }
    }
    None
}

/// Every number in `text`, in order: an optional minus sign, digits with optional `,`
/// thousands separators, an optional decimal part, and an optional `/denominator`.
fn numbers(text: &str) -> Vec<f64> {
    let b = text.as_bytes();
    let mut out = vec![];
    let mut i = 0;
    while i < b.len() {
        if !b[i].is_ascii_digit() {
            i += 1;
            continue;
        }
        let negative = i > 0 && b[i - 1] == b'-' && (i < 2 || !b[i - 2].is_ascii_alphanumeric());
        let (value, end) = decimal(b, i);
        let mut value = value;
        let mut end = end;
        // a fraction: digits '/' digits
        if end + 1 < b.len() && b[end] == b'/' && b[end + 1].is_ascii_digit() {
            let (den, e) = decimal(b, end + 1);
            if den != 0.0 {
                value /= den;
            }
            end = e;
        }
        out.push(if negative { -value } else { value });
        i = end;
    }
    out
}

/// The unsigned decimal starting at `i` (digits, `,` between digit groups of three, `.`
/// then digits) and the index after it.
fn decimal(b: &[u8], mut i: usize) -> (f64, usize) {
    let mut s = String::new();
    while i < b.len() {
        let c = b[i];
        if c.is_ascii_digit() {
            s.push(c as char);
            i += 1;
        } else if c == b','
            && b.get(i + 1..i + 4)
                .is_some_and(|g| g.iter().all(u8::is_ascii_digit))
            && !b.get(i + 4).is_some_and(u8::is_ascii_digit)
        {
            i += 1; // thousands separator
        } else if c == b'.' && b.get(i + 1).is_some_and(u8::is_ascii_digit) && !s.contains('.') {
            s.push('.');
            i += 1;
        } else {
            break;
        }
    }
    (s.parse().unwrap_or(f64::NAN), i)
}

/// The answer a text gives: the last number inside its last `\boxed{}`, else its last number.
pub fn final_answer(text: &str) -> Option<f64> {
    let scope = last_boxed(text).unwrap_or(text);
    numbers(scope).last().copied().filter(|x| x.is_finite())
}

/// Equal to 1e-9 relative (absolute for magnitudes below 1).
pub fn same_number(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * b.abs().max(1.0)
}

impl Judge for MathJudge {
    fn name(&self) -> &str {
        "math"
    }

    fn needs(&self) -> &[&str] {
        &["reference"]
    }

    fn score(&self, sample: &Sample) -> Result<f64> {
        let reference = sample.text_field("reference").ok_or_else(|| {
            Error::Msg(
                "judge `math` needs a `reference` field (the expected number) on every prompt line"
                    .into(),
            )
        })?;
        let want = final_answer(&reference).ok_or_else(|| {
            Error::Msg(format!(
                "judge `math`: the reference `{reference}` holds no number"
            ))
        })?;
        Ok(match final_answer(sample.response) {
            Some(got) if same_number(got, want) => 1.0,
            _ => 0.0,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::score_with_reference as score;

    #[test]
    fn reads_the_last_number_or_the_last_box() {
        assert_eq!(final_answer("7"), Some(7.0));
        assert_eq!(final_answer("3 + 4 = 7."), Some(7.0));
        assert_eq!(final_answer("it is -12"), Some(-12.0));
        assert_eq!(final_answer("x-3"), Some(3.0)); // a hyphen after a letter is no sign
        assert_eq!(final_answer("about 1,234 apples"), Some(1234.0));
        assert_eq!(final_answer("1,2"), Some(2.0)); // not a thousands group
        assert_eq!(final_answer("3.50 dollars"), Some(3.5));
        assert_eq!(final_answer("half is 1/2"), Some(0.5));
        assert_eq!(final_answer("so \\boxed{42} and later 7"), Some(42.0));
        assert_eq!(final_answer("\\boxed{\\frac{3}{4}}"), Some(4.0)); // last number in the box
        assert_eq!(final_answer("\\boxed{1} then \\boxed{2}"), Some(2.0));
        assert_eq!(final_answer("no answer"), None);
        assert_eq!(final_answer("end."), None);
    }

    #[test]
    fn scores_numeric_agreement_with_the_reference() {
        let j = MathJudge;
        assert_eq!(score(&j, "What is 3 + 4?", "7", Some("7")).unwrap(), 1.0);
        assert_eq!(score(&j, "p", "The answer is 7.0", Some("7")).unwrap(), 1.0);
        assert_eq!(score(&j, "p", "\\boxed{0.75}", Some("3/4")).unwrap(), 1.0);
        assert_eq!(score(&j, "p", "8", Some("7")).unwrap(), 0.0);
        assert_eq!(score(&j, "p", "seven", Some("7")).unwrap(), 0.0);
        assert_eq!(score(&j, "p", "7 or 8", Some("7")).unwrap(), 0.0); // the last number counts
        assert_eq!(score(&j, "p", "-3", Some("-3")).unwrap(), 1.0);
        assert_eq!(score(&j, "p", "3", Some("-3")).unwrap(), 0.0);
        // a numeric JSON reference reads as its printed form
        let fields: crate::Fields = serde_json::from_str(r#"{"reference": 1234}"#).unwrap();
        let s = Sample {
            prompt: "p",
            response: "1,234",
            fields: &fields,
        };
        assert_eq!(j.score(&s).unwrap(), 1.0);
    }

    #[test]
    fn a_reference_without_a_number_is_a_clear_error() {
        let e = score(&MathJudge, "p", "7", Some("seven"))
            .err()
            .unwrap()
            .to_string();
        assert_eq!(e, "judge `math`: the reference `seven` holds no number");
        let e = score(&MathJudge, "p", "7", None).err().unwrap().to_string();
        assert!(e.contains("needs a `reference` field"), "{e}");
        assert_eq!(MathJudge.needs(), &["reference"]);
    }
}
