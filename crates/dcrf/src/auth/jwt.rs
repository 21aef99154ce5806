//! JSON Web Tokens (feature `jwt`): [`JwtAuth`].

use axum::http::request::Parts;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::{AuthError, Authenticator, BoxFuture, bearer_token};
use crate::scope::User;

/// The claims [`JwtAuth`] reads: `sub` is the user id, `username` (or `name`) the name,
/// `exp` is checked, the rest lands in [`User::extra`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    /// The subject: the user id.
    pub sub: String,
    /// The display name (falls back to `name`, then to `sub`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// Expiry, seconds since the epoch.
    pub exp: u64,
    /// Every other claim.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// Signed-JWT authentication (HS256 with a shared secret).
///
/// ```
/// use dcrf::auth::JwtAuth;
///
/// let auth = JwtAuth::hs256(b"a long shared secret").unwrap();
/// let token = auth.issue("42", "alice", 3600).unwrap();
/// # let _ = token;
/// ```
#[derive(Clone)]
pub struct JwtAuth {
    decoding: DecodingKey,
    encoding: EncodingKey,
    validation: Validation,
}

impl std::fmt::Debug for JwtAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtAuth").finish_non_exhaustive()
    }
}

impl JwtAuth {
    /// HS256 with a shared secret.
    pub fn hs256(secret: &[u8]) -> Result<Self, crate::Error> {
        let bad = |e: jsonwebtoken::errors::Error| {
            crate::Error::configuration_caused_by("invalid HS256 secret", e)
        };
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = 0;
        Ok(JwtAuth {
            decoding: DecodingKey::from_secret(secret).map_err(bad)?,
            encoding: EncodingKey::from_secret(secret).map_err(bad)?,
            validation,
        })
    }

    /// Signs a token for a user, valid for `ttl_secs` seconds (for tests, demos and login views).
    pub fn issue(&self, id: &str, username: &str, ttl_secs: u64) -> Result<String, crate::Error> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let claims = Claims {
            sub: id.to_owned(),
            username: Some(username.to_owned()),
            exp: now + ttl_secs,
            extra: Map::new(),
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .map_err(|e| crate::Error::configuration_caused_by("cannot sign a token", e))
    }

    /// Verifies a token and returns its user.
    pub fn verify(&self, token: &str) -> Result<User, AuthError> {
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)
            .map_err(|e| AuthError::InvalidCredentials(e.to_string()))?;
        let mut claims = data.claims;
        let username = claims
            .username
            .take()
            .or_else(|| match claims.extra.remove("name") {
                Some(Value::String(s)) => Some(s),
                _ => None,
            })
            .unwrap_or_else(|| claims.sub.clone());
        Ok(User {
            id: claims.sub,
            username,
            extra: claims.extra,
        })
    }
}

impl Authenticator for JwtAuth {
    fn authenticate<'a>(
        &'a self,
        parts: &'a Parts,
    ) -> BoxFuture<'a, Result<Option<User>, AuthError>> {
        Box::pin(async move {
            match bearer_token(parts) {
                None => Ok(None),
                Some(token) => self.verify(&token).map(Some),
            }
        })
    }
}
