//! API keys: `sk-sov-` followed by a 12-character public id and a 40-character secret, all
//! base62. The id is stored in clear and is how a key is looked up; the secret is stored only
//! as `HMAC-SHA-256(server secret, salt ‖ secret)` with a per-key random salt, and a presented
//! key is checked against it in constant time. Whoever reads the database learns neither the
//! keys nor anything to test guesses against without the server secret.

use hmac::{Hmac, Mac};
use rand::Rng;
use rand::rngs::OsRng;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// What every key starts with.
pub const KEY_PREFIX: &str = "sk-sov-";
/// Characters of the public id.
pub const KEY_ID_LEN: usize = 12;
/// Characters of the secret: 40 base62 characters hold about 238 bits.
pub const KEY_SECRET_LEN: usize = 40;
/// Bytes of the per-key salt.
const SALT_BYTES: usize = 16;

const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

type HmacSha256 = Hmac<Sha256>;

/// `n` random base62 characters from the operating system's generator.
pub fn random_base62(n: usize) -> String {
    let mut rng = OsRng;
    (0..n)
        .map(|_| char::from(BASE62[rng.gen_range(0..BASE62.len())]))
        .collect()
}

/// A key just made: the plaintext, to show once, and what is stored.
#[derive(Debug, Clone)]
pub struct GeneratedKey {
    /// The public id (also inside the plaintext).
    pub id: String,
    /// The whole key, `sk-sov-...`. Shown to the admin once, never stored.
    pub plaintext: String,
    /// The salt, hex.
    pub salt_hex: String,
    /// The keyed hash of the secret, hex.
    pub hash_hex: String,
}

/// Makes a new key whose hash is keyed by `server_secret`.
pub fn generate(server_secret: &[u8]) -> GeneratedKey {
    let id = random_base62(KEY_ID_LEN);
    let secret = random_base62(KEY_SECRET_LEN);
    let mut salt = [0u8; SALT_BYTES];
    OsRng.fill(&mut salt);
    let hash = keyed_hash(server_secret, &salt, &secret);
    GeneratedKey {
        plaintext: format!("{KEY_PREFIX}{id}{secret}"),
        id,
        salt_hex: to_hex(&salt),
        hash_hex: to_hex(&hash),
    }
}

/// A presented key split into its parts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParsedKey<'a> {
    /// The public id.
    pub id: &'a str,
    /// The secret part.
    pub secret: &'a str,
}

/// Splits a presented key, or says what is wrong with it.
pub fn parse(presented: &str) -> Result<ParsedKey<'_>, String> {
    let Some(rest) = presented.strip_prefix(KEY_PREFIX) else {
        return Err(format!("an API key starts with `{KEY_PREFIX}`"));
    };
    if rest.len() != KEY_ID_LEN + KEY_SECRET_LEN {
        return Err(format!(
            "an API key has {} characters after `{KEY_PREFIX}`, this one has {}",
            KEY_ID_LEN + KEY_SECRET_LEN,
            rest.chars().count()
        ));
    }
    if !rest.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return Err("an API key holds only letters and digits after its prefix".to_owned());
    }
    let (id, secret) = rest.split_at(KEY_ID_LEN);
    Ok(ParsedKey { id, secret })
}

/// Whether `secret` matches the stored salt and hash. Compares in constant time; a stored
/// value that is not valid hex never matches.
pub fn verify(server_secret: &[u8], salt_hex: &str, hash_hex: &str, secret: &str) -> bool {
    let (Some(salt), Some(stored)) = (from_hex(salt_hex), from_hex(hash_hex)) else {
        return false;
    };
    let computed = keyed_hash(server_secret, &salt, secret);
    stored.len() == computed.len() && bool::from(computed.ct_eq(stored.as_slice()))
}

/// Whether two secrets are equal, in time that depends on neither: both are hashed first, so
/// even their lengths do not leak. For the admin key.
pub fn secrets_equal(a: &str, b: &str) -> bool {
    let a = Sha256::digest(a.as_bytes());
    let b = Sha256::digest(b.as_bytes());
    bool::from(a.ct_eq(&b))
}

fn keyed_hash(server_secret: &[u8], salt: &[u8], secret: &str) -> [u8; 32] {
    // HMAC takes keys of any length, so `new_from_slice` cannot fail; fall back to a plain
    // hash of everything rather than panic should that ever change.
    match HmacSha256::new_from_slice(server_secret) {
        Ok(mut mac) => {
            mac.update(salt);
            mac.update(secret.as_bytes());
            mac.finalize().into_bytes().into()
        }
        Err(_) => {
            let mut hasher = Sha256::new();
            hasher.update(server_secret);
            hasher.update(salt);
            hasher.update(secret.as_bytes());
            hasher.finalize().into()
        }
    }
}

/// Lowercase hex.
pub fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for &b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 15)]));
    }
    out
}

/// Parses hex (either case); `None` if it is not hex of whole bytes.
pub fn from_hex(text: &str) -> Option<Vec<u8>> {
    fn digit(c: u8) -> Option<u8> {
        match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            b'A'..=b'F' => Some(c - b'A' + 10),
            _ => None,
        }
    }
    if !text.len().is_multiple_of(2) {
        return None;
    }
    text.as_bytes()
        .chunks_exact(2)
        .map(|pair| Some(digit(pair[0])? << 4 | digit(pair[1])?))
        .collect()
}

/// A fresh random server secret (32 bytes) for keying key hashes.
pub fn new_server_secret() -> [u8; 32] {
    let mut secret = [0u8; 32];
    OsRng.fill(&mut secret);
    secret
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_parse_and_verify() {
        let server = b"server secret";
        let key = generate(server);
        assert!(key.plaintext.starts_with(KEY_PREFIX));
        assert_eq!(
            key.plaintext.len(),
            KEY_PREFIX.len() + KEY_ID_LEN + KEY_SECRET_LEN
        );
        let parsed = parse(&key.plaintext).unwrap();
        assert_eq!(parsed.id, key.id);
        assert!(verify(server, &key.salt_hex, &key.hash_hex, parsed.secret));
        // A wrong secret, a wrong server secret, a damaged hash: no match.
        let mut wrong = parsed.secret.to_owned();
        wrong.replace_range(0..1, if wrong.starts_with('a') { "b" } else { "a" });
        assert!(!verify(server, &key.salt_hex, &key.hash_hex, &wrong));
        assert!(!verify(
            b"other",
            &key.salt_hex,
            &key.hash_hex,
            parsed.secret
        ));
        assert!(!verify(server, &key.salt_hex, "zz", parsed.secret));
        assert!(!verify(
            server,
            &key.salt_hex,
            &key.hash_hex[2..],
            parsed.secret
        ));
        // The hash is salted: the same secret under two salts hashes differently.
        let other = generate(server);
        assert_ne!(key.salt_hex, other.salt_hex);
        assert_ne!(key.id, other.id);
    }

    #[test]
    fn malformed_keys_say_why() {
        let too_short = format!("{KEY_PREFIX}abc");
        let bad_char = format!("{KEY_PREFIX}{}", "a-".repeat(26));
        for (key, needle) in [
            ("sk-abc", "starts with"),
            ("", "starts with"),
            (too_short.as_str(), "this one has 3"),
            (bad_char.as_str(), "only letters and digits"),
        ] {
            let err = parse(key).unwrap_err();
            assert!(err.contains(needle), "{key}: {err}");
        }
        // Multi-byte characters are counted, not sliced through.
        let unicode = format!("{KEY_PREFIX}{}", "é".repeat(26));
        assert!(parse(&unicode).is_err());
    }

    #[test]
    fn hex_round_trip_and_rejects() {
        let bytes = [0u8, 1, 0xab, 0xff];
        assert_eq!(to_hex(&bytes), "0001abff");
        assert_eq!(from_hex("0001ABff").unwrap(), bytes);
        assert!(from_hex("abc").is_none());
        assert!(from_hex("zz").is_none());
    }

    #[test]
    fn admin_secret_comparison() {
        assert!(secrets_equal("admin-key", "admin-key"));
        assert!(!secrets_equal("admin-key", "admin-kez"));
        assert!(!secrets_equal("admin-key", "admin-key-longer"));
    }
}
