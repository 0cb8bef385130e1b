//! The labellers file: who may label, with which token.
//!
//! ```yaml
//! - name: ana
//!   token: 9f2c1e7b5a0d4c3e8b6f1a2d7c9e0b4f   # at least 16 characters; `openssl rand -hex 16`
//!   lead: true                                # may see the team's status page
//! - name: ben
//!   token: 0b8e3d6a1f7c2e9b4d5a8c1f6e3b7a20
//! ```

use std::path::Path;

use serde::Deserialize;

use crate::{err, Result};

/// The least token length accepted (16 characters of `openssl rand -hex 16` carry 64 bits).
pub const MIN_TOKEN_LEN: usize = 16;

/// One labeller.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Labeller {
    /// The name written into each of their rankings (`labeller`): letters, digits, `_ . -`.
    pub name: String,
    /// Their secret: the page sends it with every request.
    pub token: String,
    /// A lead sees the team's status page (everyone's counts and agreement); a labeller
    /// sees only their own work. Default false.
    #[serde(default)]
    pub lead: bool,
}

/// Read and check a labellers file: names and tokens unique, names plain, tokens long.
pub fn read_team(path: &Path) -> Result<Vec<Labeller>> {
    let where_ = path.display();
    let text = std::fs::read_to_string(path).map_err(|e| err(format!("{where_}: {e}")))?;
    let team: Vec<Labeller> = serde_yaml::from_str(&text).map_err(|e| {
        err(format!(
            "{where_}: {e} (expected a list of `- name: NAME` / `token: TOKEN` / optional `lead: true` entries)"
        ))
    })?;
    if team.is_empty() {
        return Err(err(format!("{where_}: no labellers listed")));
    }
    for (i, l) in team.iter().enumerate() {
        let at = format!("{where_}: labeller {} (`{}`)", i + 1, l.name);
        if l.name.is_empty()
            || l.name.len() > 64
            || !l
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
        {
            return Err(err(format!(
                "{at}: name: 1 to 64 letters, digits, `_`, `.` or `-`"
            )));
        }
        if l.token.len() < MIN_TOKEN_LEN || !l.token.chars().all(|c| c.is_ascii_graphic()) {
            return Err(err(format!(
                "{at}: token: at least {MIN_TOKEN_LEN} printable characters without spaces (e.g. `openssl rand -hex 16`)"
            )));
        }
        if team[..i].iter().any(|o| o.name == l.name) {
            return Err(err(format!("{at}: name: listed twice")));
        }
        if team[..i].iter().any(|o| o.token == l.token) {
            return Err(err(format!(
                "{at}: token: the same as another labeller's; each needs their own"
            )));
        }
    }
    Ok(team)
}

/// The labeller whose token this is. Every token is compared in full, in time that does
/// not depend on where a wrong token first differs.
pub fn find_by_token<'a>(team: &'a [Labeller], token: &str) -> Option<&'a Labeller> {
    let mut found = None;
    for l in team {
        if equal_in_constant_time(l.token.as_bytes(), token.as_bytes()) {
            found = Some(l);
        }
    }
    found
}

fn equal_in_constant_time(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn team(yaml: &str) -> Result<Vec<Labeller>> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("team.yaml");
        std::fs::write(&path, yaml).unwrap();
        read_team(&path)
    }

    #[test]
    fn reads_a_team_and_finds_labellers_by_token() {
        let t = team("- {name: ana, token: aaaaaaaaaaaaaaaa1, lead: true}\n- {name: ben, token: bbbbbbbbbbbbbbbb2}\n").unwrap();
        assert_eq!(find_by_token(&t, "bbbbbbbbbbbbbbbb2").unwrap().name, "ben");
        assert!(find_by_token(&t, "bbbbbbbbbbbbbbbb3").is_none());
        assert!(find_by_token(&t, "").is_none());
        assert!(t[0].lead && !t[1].lead);
    }

    #[test]
    fn bad_teams_name_the_labeller_and_the_problem() {
        for (yaml, want) in [
            (
                "- {name: ana, token: short}",
                "labeller 1 (`ana`): token: at least 16",
            ),
            (
                "- {name: a b, token: aaaaaaaaaaaaaaaa1}",
                "labeller 1 (`a b`): name:",
            ),
            (
                "- {name: ana, token: aaaaaaaaaaaaaaaa1}\n- {name: ana, token: bbbbbbbbbbbbbbbb2}",
                "labeller 2 (`ana`): name: listed twice",
            ),
            (
                "- {name: ana, token: aaaaaaaaaaaaaaaa1}\n- {name: ben, token: aaaaaaaaaaaaaaaa1}",
                "labeller 2 (`ben`): token: the same",
            ),
            (
                "- {name: ana, tokn: aaaaaaaaaaaaaaaa1}",
                "unknown field `tokn`",
            ),
            ("[]", "no labellers listed"),
        ] {
            let e = team(yaml).unwrap_err().to_string();
            assert!(e.contains("team.yaml: ") && e.contains(want), "{yaml}: {e}");
        }
    }
}
