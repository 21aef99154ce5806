//! JSON Web Tokens (feature `jwt`): [`JwtAuth`].

use axum::http::request::Parts;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::{AuthError, Authenticator, BoxFuture, Verified, credential};
use crate::scope::User;

/// The claims [`JwtAuth`] reads: `sub` is the user id, `username` (or `name`) the name,
/// `exp` and `nbf` are checked (and `iss`, `aud` when configured), the rest lands in
/// [`User::extra`].
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
/// Checks the signature, `exp` and `nbf` (no leeway), and `iss` / `aud` when
/// [`issuer`](Self::issuer) / [`audience`](Self::audience) are set (a token with an `aud` claim is
/// refused when no audience is configured). A refused handshake answers 401 with one of
/// `Invalid token.`, `Token has expired.`, `Token is not valid yet.`,
/// `Token was issued by an untrusted issuer.`, `Token is not meant for this service.`.
///
/// The token's `exp` is enforced during the connection too: the socket is closed with 4401
/// when it passes, unless the client sent a fresh token with the built-in `refresh_token`
/// action first (see [`auth`](crate::auth)).
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
    issuer: Option<String>,
    audience: Option<String>,
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
        validation.validate_nbf = true;
        Ok(JwtAuth {
            decoding: DecodingKey::from_secret(secret).map_err(bad)?,
            encoding: EncodingKey::from_secret(secret).map_err(bad)?,
            validation,
            issuer: None,
            audience: None,
        })
    }

    /// Accepts only tokens whose `iss` is `issuer`; a token without `iss` is refused. Tokens
    /// signed by [`issue`](Self::issue) carry it.
    pub fn issuer(mut self, issuer: impl Into<String>) -> Self {
        let issuer = issuer.into();
        self.validation.set_issuer(&[issuer.as_str()]);
        self.validation.required_spec_claims.insert("iss".into());
        self.issuer = Some(issuer);
        self
    }

    /// Accepts only tokens whose `aud` is (or contains) `audience`; a token without `aud` is
    /// refused. Tokens signed by [`issue`](Self::issue) carry it.
    pub fn audience(mut self, audience: impl Into<String>) -> Self {
        let audience = audience.into();
        self.validation.set_audience(&[audience.as_str()]);
        self.validation.required_spec_claims.insert("aud".into());
        self.audience = Some(audience);
        self
    }

    /// Signs a token for a user, valid for `ttl_secs` seconds (for tests, demos and login views).
    pub fn issue(&self, id: &str, username: &str, ttl_secs: u64) -> Result<String, crate::Error> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let mut extra = Map::new();
        if let Some(iss) = &self.issuer {
            extra.insert("iss".into(), Value::String(iss.clone()));
        }
        if let Some(aud) = &self.audience {
            extra.insert("aud".into(), Value::String(aud.clone()));
        }
        let claims = Claims {
            sub: id.to_owned(),
            username: Some(username.to_owned()),
            exp: now + ttl_secs,
            extra,
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .map_err(|e| crate::Error::configuration_caused_by("cannot sign a token", e))
    }

    /// Verifies a token and returns its user.
    pub fn verify(&self, token: &str) -> Result<User, AuthError> {
        self.verify_expiring(token).map(|v| v.user)
    }

    /// Verifies a token and returns its user with the token's `exp`.
    pub fn verify_expiring(&self, token: &str) -> Result<Verified, AuthError> {
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)
            .map_err(|e| client_message(&e))?;
        let mut claims = data.claims;
        let exp = claims.exp;
        let username = claims
            .username
            .take()
            .or_else(|| match claims.extra.remove("name") {
                Some(Value::String(s)) => Some(s),
                _ => None,
            })
            .unwrap_or_else(|| claims.sub.clone());
        let user = User {
            id: claims.sub,
            username,
            extra: claims.extra,
        };
        Ok(Verified::new(user).expiring(exp))
    }
}

/// What a client is told about a refused token: the cause it can act on, never the library's
/// wording (which is logged at debug level).
fn client_message(e: &jsonwebtoken::errors::Error) -> AuthError {
    use jsonwebtoken::errors::ErrorKind;
    tracing::debug!(error = %e, "JWT refused");
    let text = match e.kind() {
        ErrorKind::ExpiredSignature => "Token has expired.",
        ErrorKind::ImmatureSignature => "Token is not valid yet.",
        ErrorKind::InvalidIssuer => "Token was issued by an untrusted issuer.",
        ErrorKind::InvalidAudience => "Token is not meant for this service.",
        _ => return AuthError::invalid_token(),
    };
    AuthError::InvalidCredentials(text.into())
}

impl Authenticator for JwtAuth {
    fn authenticate<'a>(
        &'a self,
        parts: &'a Parts,
    ) -> BoxFuture<'a, Result<Option<User>, AuthError>> {
        Box::pin(async move { Ok(self.authenticate_session(parts).await?.map(|v| v.user)) })
    }

    fn authenticate_session<'a>(
        &'a self,
        parts: &'a Parts,
    ) -> BoxFuture<'a, Result<Option<Verified>, AuthError>> {
        Box::pin(async move {
            match credential(parts)? {
                None => Ok(None),
                Some(token) => self.verify_expiring(&token).map(Some),
            }
        })
    }

    fn refresh<'a>(&'a self, token: &'a str) -> Option<BoxFuture<'a, Result<Verified, AuthError>>> {
        Some(Box::pin(async move { self.verify_expiring(token) }))
    }
}
