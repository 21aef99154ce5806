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
//! refuses the handshake with HTTP 401, and so does an `Authorization` header that is not
//! `Bearer <token>` (a malformed credential is never taken for "anonymous"). The 401 body is a
//! sentence a client can act on (`Invalid token.`, `Token has expired.`), never a library's
//! internals.
//!
//! ## Credentials that expire
//!
//! An authenticator may say when the handshake's credential expires
//! ([`Authenticator::authenticate_session`]); the server then closes the socket with close code
//! **4401** at that moment ([`CLOSE_TOKEN_EXPIRED`](crate::server::CLOSE_TOKEN_EXPIRED)). If it
//! also supports [`Authenticator::refresh`] (as [`JwtAuth`] does), every consumer answers the
//! built-in action
//!
//! ```json
//! {"action": "refresh_token", "token": "<new token>", "request_id": 1}
//! ```
//!
//! with 200 `{"exp": <new expiry>}` and moves the deadline; an invalid token answers 401 and
//! the old expiry stays; a token of another user (`sub`) answers 403. The connection keeps the
//! user it was opened with. `refresh_token` is handled before permissions and before the
//! consumer's own actions.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use axum::http::request::Parts;

use crate::scope::User;

#[cfg(feature = "jwt")]
mod jwt;
#[cfg(feature = "jwt")]
#[cfg_attr(docsrs, doc(cfg(feature = "jwt")))]
pub use jwt::{Claims, JwtAuth};

/// Why the handshake was refused by the authenticator.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AuthError {
    /// A credential was sent but is not valid (unknown token, bad signature, expired). The text
    /// is what the client reads in the 401 answer: say what it can act on, never internals.
    #[error("{0}")]
    InvalidCredentials(String),
}

impl AuthError {
    /// "Invalid token.": the answer to a credential that is wrong in any way a client cannot fix
    /// by itself other than by getting a new one.
    pub fn invalid_token() -> Self {
        AuthError::InvalidCredentials("Invalid token.".into())
    }
}

/// A user with the moment the credential that proved it stops being valid.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Verified {
    /// The user.
    pub user: User,
    /// Expiry, seconds since the Unix epoch (a JWT's `exp`); `None`: never.
    pub expires_at: Option<u64>,
}

impl Verified {
    /// A user whose credential does not expire.
    pub fn new(user: User) -> Self {
        Verified {
            user,
            expires_at: None,
        }
    }

    /// The same, expiring at `exp` (seconds since the Unix epoch).
    pub fn expiring(mut self, exp: u64) -> Self {
        self.expires_at = Some(exp);
        self
    }
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

    /// What the handshake runs: the user and when its credential expires (the socket is closed
    /// with 4401 then). Default: [`authenticate`](Self::authenticate), never expiring.
    fn authenticate_session<'a>(
        &'a self,
        parts: &'a Parts,
    ) -> BoxFuture<'a, Result<Option<Verified>, AuthError>> {
        Box::pin(async move { Ok(self.authenticate(parts).await?.map(Verified::new)) })
    }

    /// Verifies a new credential sent in-band with the built-in `refresh_token` action.
    /// `None` (the default): refreshing is not supported, and `refresh_token` is dispatched to
    /// the consumer like any other action.
    fn refresh<'a>(&'a self, token: &'a str) -> Option<BoxFuture<'a, Result<Verified, AuthError>>> {
        let _ = token;
        None
    }
}

/// Everyone is anonymous: the default.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoAuth;

impl Authenticator for NoAuth {
    fn authenticate<'a>(&'a self, _: &'a Parts) -> BoxFuture<'a, Result<Option<User>, AuthError>> {
        Box::pin(async { Ok(None) })
    }
}

/// The credential of a handshake, strictly: `Authorization: Bearer <t>`, else `?token=<t>`,
/// else `Ok(None)` (anonymous). An `Authorization` header that is not `Bearer <token>` (another
/// scheme, no token, not text) is an error: a malformed credential never means anonymous.
pub fn credential(parts: &Parts) -> Result<Option<String>, AuthError> {
    if let Some(value) = parts.headers.get(axum::http::header::AUTHORIZATION) {
        let token = value.to_str().ok().and_then(|text| {
            let (scheme, token) = text.trim().split_once(' ')?;
            let token = token.trim();
            (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
        });
        return match token {
            Some(token) => Ok(Some(token.to_owned())),
            None => Err(AuthError::InvalidCredentials(
                "Invalid Authorization header; expected \"Bearer <token>\".".into(),
            )),
        };
    }
    Ok(bearer_token(parts))
}

/// The bearer token of a handshake: `Authorization: Bearer <t>`, else `?token=<t>`. Lenient
/// (a malformed header reads as no token); the authenticators use [`credential`].
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
            let Some(token) = credential(parts)? else {
                return Ok(None);
            };
            match (self.lookup)(token).await {
                Some(user) => Ok(Some(user)),
                None => Err(AuthError::invalid_token()),
            }
        })
    }
}
