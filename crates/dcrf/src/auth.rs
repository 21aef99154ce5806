//! Authentication at the handshake: an [`Authenticator`] turns the HTTP upgrade request into the
//! connection's [`User`] (Channels' `AuthMiddlewareStack`).
//!
//! Two ship with the crate:
//! - [`TokenAuth`]: an opaque token looked up by a function you give (a table, a database);
//! - [`JwtAuth`]: a signed JWT (HS256 by default) whose claims become the user.
//!
//! Both read the token from `Authorization: Bearer <token>` or, for browsers (which cannot set
//! headers on a WebSocket handshake), from the `?token=` query parameter.
//!
//! No token means an anonymous connection (`scope.user == None`): whether that may connect or
//! act is for [permissions](crate::permission) to decide. A token that is present but invalid
//! refuses the handshake with HTTP 401.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use axum::http::request::Parts;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::scope::User;

/// Why the handshake was refused by the authenticator.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AuthError {
    /// A credential was sent but is not valid (unknown token, bad signature, expired).
    #[error("invalid credentials: {0}")]
    InvalidCredentials(String),
}

/// A boxed future, as returned by object-safe traits in this crate.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Resolves the user of a connection from its handshake request.
///
/// Return `Ok(None)` for an anonymous connection, `Err` to refuse the handshake (HTTP 401).
pub trait Authenticator: Send + Sync + 'static {
    /// Looks at the handshake and finds the user, if any.
    fn authenticate<'a>(
        &'a self,
        parts: &'a Parts,
    ) -> BoxFuture<'a, Result<Option<User>, AuthError>>;
}

/// Everyone is anonymous: the default.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoAuth;

impl Authenticator for NoAuth {
    fn authenticate<'a>(&'a self, _: &'a Parts) -> BoxFuture<'a, Result<Option<User>, AuthError>> {
        Box::pin(async { Ok(None) })
    }
}

/// The bearer token of a handshake: `Authorization: Bearer <t>`, else `?token=<t>`.
pub fn bearer_token(parts: &Parts) -> Option<String> {
    if let Some(value) = parts.headers.get(axum::http::header::AUTHORIZATION)
        && let Ok(text) = value.to_str()
        && let Some(token) = text
            .strip_prefix("Bearer ")
            .or_else(|| text.strip_prefix("bearer "))
    {
        return Some(token.trim().to_owned());
    }
    let query = parts.uri.query()?;
    query_pairs(query)
        .into_iter()
        .find(|(k, _)| k == "token")
        .map(|(_, v)| v)
}

/// Decodes `a=1&b=x%20y` into pairs.
pub(crate) fn query_pairs(query: &str) -> Vec<(String, String)> {
    let Ok(uri) = format!("/?{query}").parse::<axum::http::Uri>() else {
        return Vec::new();
    };
    axum::extract::Query::<Vec<(String, String)>>::try_from_uri(&uri)
        .map(|q| q.0)
        .unwrap_or_default()
}

type LookupFn = dyn Fn(String) -> BoxFuture<'static, Option<User>> + Send + Sync;

/// Opaque-token authentication (DRF's `TokenAuthentication`): the token is looked up by a
/// function you provide.
///
/// ```
/// use dcrf::auth::TokenAuth;
/// use dcrf::User;
///
/// let auth = TokenAuth::from_map([("s3cret".to_string(), User::new("1", "alice"))]);
/// # let _ = auth;
/// // or, against a database:
/// let auth = TokenAuth::new(|token: String| async move {
///     (token == "s3cret").then(|| User::new("1", "alice"))
/// });
/// # let _ = auth;
/// ```
#[derive(Clone)]
pub struct TokenAuth {
    lookup: Arc<LookupFn>,
}

impl std::fmt::Debug for TokenAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenAuth").finish_non_exhaustive()
    }
}

impl TokenAuth {
    /// Authenticates with a lookup function: `Some(user)` for a valid token.
    pub fn new<F, Fut>(lookup: F) -> Self
    where
        F: Fn(String) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Option<User>> + Send + 'static,
    {
        TokenAuth {
            lookup: Arc::new(move |t| Box::pin(lookup(t))),
        }
    }

    /// Authenticates against a fixed table of tokens.
    pub fn from_map(tokens: impl IntoIterator<Item = (String, User)>) -> Self {
        let table: Arc<HashMap<String, User>> = Arc::new(tokens.into_iter().collect());
        Self::new(move |token| {
            let table = table.clone();
            async move { table.get(&token).cloned() }
        })
    }
}

impl Authenticator for TokenAuth {
    fn authenticate<'a>(
        &'a self,
        parts: &'a Parts,
    ) -> BoxFuture<'a, Result<Option<User>, AuthError>> {
        Box::pin(async move {
            let Some(token) = bearer_token(parts) else {
                return Ok(None);
            };
            match (self.lookup)(token).await {
                Some(user) => Ok(Some(user)),
                None => Err(AuthError::InvalidCredentials("unknown token".into())),
            }
        })
    }
}

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
        let bad = |e: jsonwebtoken::errors::Error| crate::Error::Configuration(e.to_string());
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
            .map_err(|e| crate::Error::Configuration(e.to_string()))
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
