//! Access tokens: HS256 JWTs compatible with djangorestframework-simplejwt.
//!
//! Only HS256 is accepted — `alg: none` and every other algorithm are
//! refused by the validation, not by string matching. `exp` is required and
//! enforced without leeway (simplejwt's default), and so is `nbf` when
//! present, as PyJWT (under simplejwt) enforces it. A header with `crit` is
//! refused: hark understands no extension (RFC 7515 §4.1.11). `user_id`
//! may be a number or a string of digits; `token_type`, when present, must
//! be `access`.
//! Tokens are never logged: the request log keeps only what has the shape
//! of what hark reads (see `http::log::loggable_target`).

use std::collections::HashMap;
use std::sync::Mutex;

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

/// Why a token was refused; every variant is a 401.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{}", self.message())]
pub enum AuthError {
    Missing,
    Invalid,
    Expired,
}

impl AuthError {
    pub fn message(self) -> &'static str {
        match self {
            AuthError::Missing => "Authentication credentials were not provided.",
            AuthError::Invalid => "Given token not valid for any token type",
            AuthError::Expired => "Token is expired",
        }
    }

    pub fn code(self) -> &'static str {
        match self {
            AuthError::Missing => "not_authenticated",
            AuthError::Invalid => "token_not_valid",
            AuthError::Expired => "token_expired",
        }
    }
}

#[derive(Deserialize)]
struct Claims {
    user_id: UserId,
    /// Checked by jsonwebtoken; read here for the cache's expiry.
    #[serde(default)]
    exp: Option<f64>,
    #[serde(default)]
    token_type: Option<String>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum UserId {
    Number(i64),
    Text(String),
}

/// Verifies tokens with one secret.
pub struct Auth {
    key: DecodingKey,
    validation: Validation,
    /// Tokens verified before: token → (user id, exp). A long-poll client
    /// sends the same token with every poll, and verifying it (two base64
    /// decodes, two JSON parses and an HMAC) was the largest part of a
    /// re-poll answered from memory. Only a token that passed every check
    /// gets in, keyed by its exact text, and it is good until its own
    /// `exp`. Bounded: emptied when full.
    verified: Mutex<HashMap<Box<str>, (i64, i64)>>,
}

/// Most tokens kept in [`Auth::verified`] (about 3 MB at most).
const MAX_VERIFIED: usize = 10_000;

impl Auth {
    pub fn new(secret: &[u8]) -> Auth {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = 0;
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.set_required_spec_claims(&["exp"]);
        // simplejwt sets no audience by default.
        validation.validate_aud = false;
        Auth {
            key: DecodingKey::from_secret(secret),
            validation,
            verified: Mutex::new(HashMap::new()),
        }
    }

    /// The user id a valid access token names.
    pub fn verify(&self, token: &str) -> Result<i64, AuthError> {
        self.verify_until(token).map(|(id, _)| id)
    }

    /// The user id a valid access token names, and the last second (Unix
    /// time) in which it is accepted: its `exp`, floored.
    pub fn verify_until(&self, token: &str) -> Result<(i64, i64), AuthError> {
        self.verify_at(token, chrono::Utc::now().timestamp())
    }

    /// [`Auth::verify_until`] with the cache's notion of now (seconds).
    fn verify_at(&self, token: &str, now: i64) -> Result<(i64, i64), AuthError> {
        let cached = self.verified.lock().unwrap().get(token).copied();
        if let Some((id, exp)) = cached {
            // jsonwebtoken (leeway 0) refuses a token once `exp < now`.
            return if exp >= now {
                Ok((id, exp))
            } else {
                self.verified.lock().unwrap().remove(token);
                Err(AuthError::Expired)
            };
        }
        let (id, exp) = self.verify_fully(token)?;
        // `exp` is required, so jsonwebtoken has checked it is a number.
        let exp = exp
            .filter(|e| e.is_finite())
            .map_or(i64::MAX, |e| e.floor() as i64);
        let mut map = self.verified.lock().unwrap();
        if map.len() >= MAX_VERIFIED {
            map.clear();
        }
        map.insert(token.into(), (id, exp));
        Ok((id, exp))
    }

    fn verify_fully(&self, token: &str) -> Result<(i64, Option<f64>), AuthError> {
        // jsonwebtoken reads `crit` but does not act on it.
        if names_crit(token) {
            return Err(AuthError::Invalid);
        }
        let data = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation).map_err(
            |e| match e.kind() {
                jsonwebtoken::errors::ErrorKind::ExpiredSignature => AuthError::Expired,
                _ => AuthError::Invalid,
            },
        )?;
        if data
            .claims
            .token_type
            .as_deref()
            .is_some_and(|t| t != "access")
        {
            return Err(AuthError::Invalid);
        }
        let id = match data.claims.user_id {
            UserId::Number(id) if id > 0 => id,
            UserId::Text(s)
                if !s.is_empty() && s.len() <= 18 && s.bytes().all(|b| b.is_ascii_digit()) =>
            {
                s.parse().map_err(|_| AuthError::Invalid)?
            }
            _ => return Err(AuthError::Invalid),
        };
        Ok((id, data.claims.exp))
    }
}

/// Whether the token's header has a `crit` parameter, whatever its value
/// (an extension hark would have to understand, or a malformed list).
fn names_crit(token: &str) -> bool {
    use base64::Engine as _;
    let header = token.split('.').next().unwrap_or("");
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(header)
        .ok()
        .and_then(|h| serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(&h).ok())
        .is_some_and(|h| h.contains_key("crit"))
}

#[derive(Serialize)]
struct IssueClaims<'a> {
    token_type: &'a str,
    exp: i64,
    iat: i64,
    jti: String,
    user_id: i64,
}

/// Issues a simplejwt-shaped access token (the embedded demo prints these;
/// tests use it too).
pub fn issue(secret: &[u8], user_id: i64, ttl: chrono::Duration) -> String {
    let now = chrono::Utc::now();
    let mut jti = [0u8; 16];
    let _ = getrandom::fill(&mut jti);
    let claims = IssueClaims {
        token_type: "access",
        exp: (now + ttl).timestamp(),
        iat: now.timestamp(),
        jti: jti.iter().map(|b| format!("{b:02x}")).collect(),
        user_id,
    };
    // HS256 over plain claims cannot fail.
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret),
    )
    .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine;

    const SECRET: &[u8] = b"test-secret";

    fn raw(header: &str, claims: &str, secret: &[u8]) -> String {
        use hmac_sign::sign;
        let h = URL_SAFE_NO_PAD.encode(header);
        let c = URL_SAFE_NO_PAD.encode(claims);
        let msg = format!("{h}.{c}");
        format!(
            "{msg}.{}",
            URL_SAFE_NO_PAD.encode(sign(secret, msg.as_bytes()))
        )
    }

    // The test signs by hand (not with jsonwebtoken) so that it can forge
    // headers the library would refuse to produce.
    mod hmac_sign {
        pub(super) fn sign(secret: &[u8], msg: &[u8]) -> Vec<u8> {
            let key = jsonwebtoken::EncodingKey::from_secret(secret);
            let sig =
                jsonwebtoken::crypto::sign(msg, &key, jsonwebtoken::Algorithm::HS256).unwrap();
            base64::Engine::decode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, sig).unwrap()
        }
    }

    fn exp_in(secs: i64) -> i64 {
        chrono::Utc::now().timestamp() + secs
    }

    #[test]
    fn accepts_simplejwt_tokens() {
        let auth = Auth::new(SECRET);
        assert_eq!(
            auth.verify(&issue(SECRET, 42, chrono::Duration::hours(1))),
            Ok(42)
        );
        let t = raw(
            r#"{"alg":"HS256","typ":"JWT"}"#,
            &format!(
                r#"{{"user_id":"7","exp":{},"token_type":"access"}}"#,
                exp_in(60)
            ),
            SECRET,
        );
        assert_eq!(auth.verify(&t), Ok(7));
        let no_type = raw(
            r#"{"alg":"HS256"}"#,
            &format!(r#"{{"user_id":8,"exp":{}}}"#, exp_in(60)),
            SECRET,
        );
        assert_eq!(auth.verify(&no_type), Ok(8));
    }

    #[test]
    fn a_cached_token_still_expires_and_others_are_not_cached() {
        let auth = Auth::new(SECRET);
        let exp = exp_in(60);
        let t = raw(
            r#"{"alg":"HS256"}"#,
            &format!(r#"{{"user_id":5,"exp":{exp}}}"#),
            SECRET,
        );
        let now = exp - 60;
        assert_eq!(auth.verify_at(&t, now), Ok((5, exp)));
        assert_eq!(
            auth.verified.lock().unwrap().get(t.as_str()),
            Some(&(5, exp))
        );
        assert_eq!(auth.verify_at(&t, exp), Ok((5, exp)));
        assert_eq!(auth.verify_at(&t, exp + 1), Err(AuthError::Expired));
        assert!(auth.verified.lock().unwrap().is_empty());
        // A forged signature is refused every time and never kept.
        let forged = raw(
            r#"{"alg":"HS256"}"#,
            &format!(r#"{{"user_id":5,"exp":{exp}}}"#),
            b"other-secret",
        );
        for _ in 0..2 {
            assert_eq!(auth.verify_at(&forged, now), Err(AuthError::Invalid));
        }
        assert!(auth.verified.lock().unwrap().is_empty());
    }

    #[test]
    fn refuses_bad_tokens() {
        let auth = Auth::new(SECRET);
        let exp = exp_in(60);
        let claims = format!(r#"{{"user_id":1,"exp":{exp}}}"#);
        // Expired.
        let old = raw(
            r#"{"alg":"HS256"}"#,
            &format!(r#"{{"user_id":1,"exp":{}}}"#, exp_in(-5)),
            SECRET,
        );
        assert_eq!(auth.verify(&old), Err(AuthError::Expired));
        // Wrong secret.
        assert_eq!(
            auth.verify(&raw(r#"{"alg":"HS256"}"#, &claims, b"other")),
            Err(AuthError::Invalid)
        );
        // alg none, with and without a signature.
        let h = URL_SAFE_NO_PAD.encode(r#"{"alg":"none"}"#);
        let c = URL_SAFE_NO_PAD.encode(&claims);
        assert_eq!(auth.verify(&format!("{h}.{c}.")), Err(AuthError::Invalid));
        assert_eq!(
            auth.verify(&raw(r#"{"alg":"none"}"#, &claims, SECRET)),
            Err(AuthError::Invalid)
        );
        // Another HMAC algorithm.
        assert_eq!(
            auth.verify(&raw(r#"{"alg":"HS512"}"#, &claims, SECRET)),
            Err(AuthError::Invalid)
        );
        // No exp.
        assert_eq!(
            auth.verify(&raw(r#"{"alg":"HS256"}"#, r#"{"user_id":1}"#, SECRET)),
            Err(AuthError::Invalid)
        );
        // Refresh token.
        let refresh = format!(r#"{{"user_id":1,"exp":{exp},"token_type":"refresh"}}"#);
        assert_eq!(
            auth.verify(&raw(r#"{"alg":"HS256"}"#, &refresh, SECRET)),
            Err(AuthError::Invalid)
        );
        // user_id not digits / missing / negative.
        for c in [
            format!(r#"{{"user_id":"1a","exp":{exp}}}"#),
            format!(r#"{{"exp":{exp}}}"#),
            format!(r#"{{"user_id":-3,"exp":{exp}}}"#),
            format!(r#"{{"user_id":1.5,"exp":{exp}}}"#),
        ] {
            assert_eq!(
                auth.verify(&raw(r#"{"alg":"HS256"}"#, &c, SECRET)),
                Err(AuthError::Invalid),
                "{c}"
            );
        }
        assert_eq!(auth.verify("garbage"), Err(AuthError::Invalid));
        assert_eq!(auth.verify(""), Err(AuthError::Invalid));
    }

    #[test]
    fn nbf_is_enforced_and_crit_refused() {
        let auth = Auth::new(SECRET);
        let exp = exp_in(60);
        let with_nbf = |nbf: &str| {
            raw(
                r#"{"alg":"HS256"}"#,
                &format!(r#"{{"user_id":3,"exp":{exp},"nbf":{nbf}}}"#),
                SECRET,
            )
        };
        assert_eq!(auth.verify(&with_nbf(&exp_in(-5).to_string())), Ok(3));
        assert_eq!(auth.verify(&with_nbf(&exp_in(0).to_string())), Ok(3));
        for refused in [exp_in(30).to_string(), r#""soon""#.to_string()] {
            assert_eq!(
                auth.verify(&with_nbf(&refused)),
                Err(AuthError::Invalid),
                "{refused}"
            );
        }
        let claims = format!(r#"{{"user_id":3,"exp":{exp}}}"#);
        for header in [
            r#"{"alg":"HS256","crit":["exp"]}"#,
            r#"{"alg":"HS256","crit":["b64"],"b64":true}"#,
            r#"{"alg":"HS256","crit":[]}"#,
            r#"{"alg":"HS256","crit":null}"#,
        ] {
            assert_eq!(
                auth.verify(&raw(header, &claims, SECRET)),
                Err(AuthError::Invalid),
                "{header}"
            );
        }
        assert_eq!(
            auth.verify(&raw(r#"{"alg":"HS256","kid":"k"}"#, &claims, SECRET)),
            Ok(3)
        );
    }
}
