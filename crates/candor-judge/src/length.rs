//! `length:MIN-MAX`: 1 when the response's length in characters (Unicode scalar values,
//! surrounding whitespace trimmed) lies in MIN..=MAX, else 0. Either end may be left open:
//! `length:-200` (at most 200), `length:20-` (at least 20).

use crate::{Error, Judge, Result, Sample};

pub struct LengthJudge {
    min: usize,
    max: usize,
}

impl LengthJudge {
    pub fn new(arg: Option<&str>) -> Result<Self> {
        let bad = |why: &str| {
            Error::Msg(format!(
                "judge `length` needs a band of characters `length:MIN-MAX` (either end may be empty), {why}"
            ))
        };
        let arg = arg.ok_or_else(|| bad("got `length`"))?;
        let (lo, hi) = arg
            .split_once('-')
            .ok_or_else(|| bad(&format!("got `length:{arg}`")))?;
        let end = |s: &str, open: usize| -> Result<usize> {
            let s = s.trim();
            if s.is_empty() {
                return Ok(open);
            }
            s.parse()
                .map_err(|_| bad(&format!("got `length:{arg}` (`{s}` is not a whole number)")))
        };
        let (min, max) = (end(lo, 0)?, end(hi, usize::MAX)?);
        if min > max {
            return Err(bad(&format!("got `length:{arg}` (MIN above MAX)")));
        }
        Ok(LengthJudge { min, max })
    }
}

impl Judge for LengthJudge {
    fn name(&self) -> &str {
        "length"
    }

    fn score(&self, sample: &Sample) -> Result<f64> {
        let n = sample.response.trim().chars().count();
        Ok(if (self.min..=self.max).contains(&n) {
            1.0
        } else {
            0.0
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::score_with_reference as score;

    #[test]
    fn counts_trimmed_characters_inside_the_band() {
        let j = LengthJudge::new(Some("2-4")).unwrap();
        assert_eq!(score(&j, "p", "a", None).unwrap(), 0.0);
        assert_eq!(score(&j, "p", " ab ", None).unwrap(), 1.0); // trimmed: 2
        assert_eq!(score(&j, "p", "éèêë", None).unwrap(), 1.0); // 4 characters, 8 bytes
        assert_eq!(score(&j, "p", "abcde", None).unwrap(), 0.0);
        let open = LengthJudge::new(Some("-3")).unwrap();
        assert_eq!(score(&open, "p", "", None).unwrap(), 1.0);
        assert_eq!(score(&open, "p", "abcd", None).unwrap(), 0.0);
        let open = LengthJudge::new(Some("3-")).unwrap();
        assert_eq!(score(&open, "p", &"x".repeat(10_000), None).unwrap(), 1.0);
    }

    #[test]
    fn a_bad_band_is_a_clear_error() {
        for (arg, why) in [
            (None, "got `length`"),
            (Some("12"), "got `length:12`"),
            (Some("a-3"), "got `length:a-3` (`a` is not a whole number)"),
            (Some("5-2"), "got `length:5-2` (MIN above MAX)"),
        ] {
            let e = LengthJudge::new(arg).err().unwrap().to_string();
            assert_eq!(
                e,
                format!("judge `length` needs a band of characters `length:MIN-MAX` (either end may be empty), {why}")
            );
        }
    }
}
