//! Task tokens (docs/design.md §3.2): `v1.<claims>.<mac>`, both parts base64url
//! without padding, the MAC an HMAC-SHA256 over the encoded claims with the key
//! named by the claims' `kid`. Minting is deterministic: the same claims give
//! the same token, so a redelivered trigger mints the same token again.

use std::fmt;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, KeyInit, Mac};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// What a token grants: completing `step` of `order_id` with one of `methods`
/// for `amount_cents`, until `expires_at` (seconds since the Unix epoch).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    pub order_id: String,
    pub step: String,
    pub attempt: u32,
    pub methods: Vec<String>,
    pub amount_cents: i64,
    pub expires_at: i64,
    pub kid: String,
}

/// Why a token was not accepted. The `Display` text is the reason published in
/// `payment.submission-rejected`.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    #[error("malformed token")]
    Malformed,
    #[error("token signed with unknown key `{0}`")]
    UnknownKey(String),
    #[error("token signature is invalid")]
    BadSignature,
    #[error("token expired")]
    Expired,
}

/// The signing keys: the first signs, all verify (key rotation).
#[derive(Clone)]
pub struct TokenKeys {
    keys: Vec<(String, SecretString)>,
}

impl fmt::Debug for TokenKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kids: Vec<&str> = self.keys.iter().map(|(kid, _)| kid.as_str()).collect();
        f.debug_struct("TokenKeys").field("kids", &kids).finish()
    }
}

#[derive(Debug, thiserror::Error)]
#[error(
    "ORDERFLOW_TOKEN_KEYS is invalid: {0}; expected `kid:secret[,kid:secret]` with secrets of \
     at least 16 characters"
)]
pub struct KeysError(String);

/// The key `orderflow up` uses in dev mode when no key is configured. Public,
/// so never for production; `up` says so loudly.
pub const DEV_KEYS: &str = "dev:orderflow-development-only-key";

impl TokenKeys {
    /// Parses `kid:secret[,kid:secret]`.
    pub fn parse(spec: &SecretString) -> Result<Self, KeysError> {
        let mut keys = Vec::new();
        for part in spec
            .expose_secret()
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
        {
            let Some((kid, secret)) = part.split_once(':') else {
                return Err(KeysError(format!("entry {} has no `:`", keys.len() + 1)));
            };
            if kid.is_empty() || kid.contains('.') {
                return Err(KeysError(format!(
                    "key id of entry {} is empty or has a `.`",
                    keys.len() + 1
                )));
            }
            if secret.len() < 16 {
                return Err(KeysError(format!("the secret of key `{kid}` is too short")));
            }
            keys.push((kid.to_owned(), SecretString::from(secret.to_owned())));
        }
        if keys.is_empty() {
            return Err(KeysError("no key given".to_owned()));
        }
        Ok(Self { keys })
    }

    /// The key id new tokens are signed with.
    pub fn signing_kid(&self) -> &str {
        &self.keys[0].0
    }

    fn mac(&self, kid: &str) -> Option<HmacSha256> {
        let (_, secret) = self.keys.iter().find(|(k, _)| k == kid)?;
        HmacSha256::new_from_slice(secret.expose_secret().as_bytes()).ok()
    }

    /// Signs `claims` (whose `kid` must be one of the keys; use
    /// [`signing_kid`](Self::signing_kid)).
    pub fn mint(&self, claims: &Claims) -> Result<String, TokenError> {
        let payload =
            URL_SAFE_NO_PAD.encode(serde_json::to_vec(claims).map_err(|_| TokenError::Malformed)?);
        let mut mac = self
            .mac(&claims.kid)
            .ok_or_else(|| TokenError::UnknownKey(claims.kid.clone()))?;
        mac.update(payload.as_bytes());
        let tag = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
        Ok(format!("v1.{payload}.{tag}"))
    }

    /// Checks format, key, signature (in constant time) and expiry at `now`
    /// (seconds since the epoch). Whether the token was used, or its step is
    /// still open, is for the coordinator's ledger to say.
    pub fn verify(&self, token: &str, now: i64) -> Result<Claims, TokenError> {
        let mut parts = token.trim().split('.');
        let (Some("v1"), Some(payload), Some(tag), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(TokenError::Malformed);
        };
        let claims_json = URL_SAFE_NO_PAD
            .decode(payload)
            .map_err(|_| TokenError::Malformed)?;
        let tag = URL_SAFE_NO_PAD
            .decode(tag)
            .map_err(|_| TokenError::Malformed)?;
        let claims: Claims =
            serde_json::from_slice(&claims_json).map_err(|_| TokenError::Malformed)?;
        let mut mac = self
            .mac(&claims.kid)
            .ok_or_else(|| TokenError::UnknownKey(claims.kid.clone()))?;
        mac.update(payload.as_bytes());
        mac.verify_slice(&tag)
            .map_err(|_| TokenError::BadSignature)?;
        if now >= claims.expires_at {
            return Err(TokenError::Expired);
        }
        Ok(claims)
    }
}

/// A digest of a token for the used-token ledger (the token itself is a
/// bearer credential and is not stored).
pub fn digest(token: &str) -> String {
    hex_sha256(token.trim().as_bytes())
}

/// SHA-256 of `bytes`, as lowercase hex.
pub fn hex_sha256(bytes: &[u8]) -> String {
    use sha2::Digest as _;
    Sha256::digest(bytes)
        .iter()
        .fold(String::with_capacity(64), |mut hex, byte| {
            use std::fmt::Write as _;
            let _ = write!(hex, "{byte:02x}");
            hex
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(spec: &str) -> TokenKeys {
        TokenKeys::parse(&SecretString::from(spec.to_owned())).unwrap()
    }

    fn claims(kid: &str) -> Claims {
        Claims {
            order_id: "o-1".into(),
            step: "payment".into(),
            attempt: 1,
            methods: vec!["zhifubao".into(), "weixin".into()],
            amount_cents: 12_800,
            expires_at: 1_000,
            kid: kid.into(),
        }
    }

    #[test]
    fn minting_is_deterministic_and_verifies() {
        let keys = keys("k1:0123456789abcdef0123");
        let token = keys.mint(&claims("k1")).unwrap();
        assert_eq!(token, keys.mint(&claims("k1")).unwrap());
        assert!(token.starts_with("v1."));
        assert_eq!(keys.verify(&token, 999).unwrap(), claims("k1"));
    }

    #[test]
    fn every_bad_token_has_its_reason() {
        let keys = keys("k1:0123456789abcdef0123");
        let token = keys.mint(&claims("k1")).unwrap();
        assert_eq!(keys.verify(&token, 1_000), Err(TokenError::Expired));
        assert_eq!(keys.verify("hello", 0), Err(TokenError::Malformed));
        assert_eq!(keys.verify("v1.@@@.@@@", 0), Err(TokenError::Malformed));
        // Tampered claims: a different amount, the old signature.
        let mut forged = claims("k1");
        forged.amount_cents = 1;
        let forged_payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&forged).unwrap());
        let tag = token.rsplit('.').next().unwrap();
        assert_eq!(
            keys.verify(&format!("v1.{forged_payload}.{tag}"), 0),
            Err(TokenError::BadSignature)
        );
        // Signed by someone else's key with our key id.
        let other = keys_with_same_kid();
        let foreign = other.mint(&claims("k1")).unwrap();
        assert_eq!(keys.verify(&foreign, 0), Err(TokenError::BadSignature));
        let unknown = self::keys("k9:0123456789abcdef0123")
            .mint(&claims("k9"))
            .unwrap();
        assert_eq!(
            keys.verify(&unknown, 0),
            Err(TokenError::UnknownKey("k9".into()))
        );
    }

    fn keys_with_same_kid() -> TokenKeys {
        keys("k1:another-secret-of-16+")
    }

    #[test]
    fn rotation_keeps_old_tokens_valid() {
        let old = keys("k1:0123456789abcdef0123");
        let token = old.mint(&claims("k1")).unwrap();
        let rotated = keys("k2:fedcba9876543210fedc,k1:0123456789abcdef0123");
        assert_eq!(rotated.signing_kid(), "k2");
        assert!(rotated.verify(&token, 0).is_ok());
    }

    #[test]
    fn bad_key_specs_are_clear_errors_that_do_not_echo_the_secret() {
        for spec in ["", "nocolon", "k1:short", ":0123456789abcdef0123"] {
            let error = TokenKeys::parse(&SecretString::from(spec.to_owned())).unwrap_err();
            assert!(!error.to_string().contains("short\""), "{error}");
        }
        let printed = format!("{:?}", keys("k1:0123456789abcdef0123"));
        assert!(!printed.contains("0123456789"), "{printed}");
    }
}
