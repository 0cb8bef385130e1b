//! Input mutation for the parsers' property tests (each crate's `tests/fuzz.rs`): a valid
//! seed file with a few random edits reaches much deeper into a parser than random bytes.

/// One edit at `pos` (taken modulo the current length): `op % 4` = 0 replace the byte with
/// `byte`, 1 insert `byte`, 2 delete a byte, 3 repeat the 1–16 bytes from `pos` (`byte`
/// picks how many; grows lists, nests brackets).
pub type Edit = (usize, u8, u8);

/// `seed` with `edits` applied in order.
pub fn mutate(seed: &[u8], edits: &[Edit]) -> Vec<u8> {
    let mut v = seed.to_vec();
    for &(pos, op, byte) in edits {
        if v.is_empty() {
            v.push(byte);
            continue;
        }
        let at = pos % v.len();
        match op % 4 {
            0 => v[at] = byte,
            1 => v.insert(at, byte),
            2 => {
                v.remove(at);
            }
            _ => {
                let end = (at + 1 + byte as usize % 16).min(v.len());
                let chunk = v[at..end].to_vec();
                v.splice(at..at, chunk);
            }
        }
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edits_apply_in_order() {
        assert_eq!(mutate(b"abc", &[(1, 0, b'X')]), b"aXc");
        assert_eq!(mutate(b"abc", &[(4, 1, b'X')]), b"aXbc");
        assert_eq!(mutate(b"abc", &[(0, 2, 0)]), b"bc");
        assert_eq!(mutate(b"abc", &[(1, 3, 1)]), b"abcbc");
        assert_eq!(mutate(b"", &[(0, 2, b'z')]), b"z");
    }
}
