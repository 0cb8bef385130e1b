//! `regex:PATTERN`: 1 when the response matches PATTERN (anywhere, as `grep` would; anchor
//! with `^...$` for the whole response), else 0. The pattern is Rust's `regex` syntax
//! (RE2-like: no look-around or back-references, linear time on any response). A required
//! format, e.g. `regex:^<think>.*</think>\s*<answer>.*</answer>$` (DeepSeek-R1's format
//! reward; `(?s)` lets `.` cross lines).

use crate::{Error, Judge, Result, Sample};

pub struct RegexJudge {
    pattern: regex::Regex,
}

impl RegexJudge {
    pub fn new(pattern: Option<&str>) -> Result<Self> {
        let pattern = pattern
            .filter(|p| !p.is_empty())
            .ok_or_else(|| Error::Msg("judge `regex` needs a pattern: `regex:PATTERN`".into()))?;
        let compiled = regex::Regex::new(pattern).map_err(|e| {
            Error::Msg(format!(
                "judge `regex`: `{pattern}` is not a valid pattern: {}",
                e.to_string().lines().last().unwrap_or_default()
            ))
        })?;
        Ok(RegexJudge { pattern: compiled })
    }
}

impl Judge for RegexJudge {
    fn name(&self) -> &str {
        "regex"
    }

    fn score(&self, sample: &Sample) -> Result<f64> {
        Ok(if self.pattern.is_match(sample.response) {
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
    fn matches_anywhere_unless_anchored() {
        let j = RegexJudge::new(Some(r"\d+")).unwrap();
        assert_eq!(score(&j, "p", "it is 7.", None).unwrap(), 1.0);
        assert_eq!(score(&j, "p", "seven", None).unwrap(), 0.0);
        let j = RegexJudge::new(Some(r"^-?\d+$")).unwrap();
        assert_eq!(score(&j, "p", "-12", None).unwrap(), 1.0);
        assert_eq!(score(&j, "p", "it is 12", None).unwrap(), 0.0);
        let j = RegexJudge::new(Some(r"(?s)^<think>.*</think>\s*<answer>.*</answer>$")).unwrap();
        assert_eq!(
            score(&j, "p", "<think>a\nb</think>\n<answer>7</answer>", None).unwrap(),
            1.0
        );
        assert_eq!(score(&j, "p", "<answer>7</answer>", None).unwrap(), 0.0);
    }

    #[test]
    fn a_missing_or_bad_pattern_is_a_clear_error() {
        let e = RegexJudge::new(None).err().unwrap().to_string();
        assert_eq!(e, "judge `regex` needs a pattern: `regex:PATTERN`");
        let e = RegexJudge::new(Some("(")).err().unwrap().to_string();
        assert!(
            e.starts_with("judge `regex`: `(` is not a valid pattern"),
            "{e}"
        );
    }
}
