//! The connection's [`Scope`]: who is connected and how (Channels' `scope`).

use std::collections::HashMap;
use std::net::SocketAddr;

use axum::http::HeaderMap;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// An authenticated user, as resolved by an [`Authenticator`](crate::auth::Authenticator).
///
/// Serializes as `{"id": ..., "username": ..., ...extra claims}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct User {
    /// A stable identifier (a primary key, a JWT `sub`).
    pub id: String,
    /// A display name.
    pub username: String,
    /// Anything else the authenticator knows (JWT claims, roles).
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl User {
    /// A user with an id and a name and nothing else.
    pub fn new(id: impl Into<String>, username: impl Into<String>) -> Self {
        User {
            id: id.into(),
            username: username.into(),
            extra: Map::new(),
        }
    }
}

/// What the handshake told us about a connection: the user, the HTTP request's headers,
/// cookies, query string and path parameters, and the peer's address.
///
/// Built once per connection and shared (read-only) by every action and permission.
#[derive(Debug, Clone, Default)]
pub struct Scope {
    /// The authenticated user; `None` for an anonymous connection.
    pub user: Option<User>,
    /// The request path of the handshake, e.g. `/ws/todos/`.
    pub path: String,
    /// The handshake's HTTP headers.
    pub headers: HeaderMap,
    /// Cookies sent with the handshake.
    pub cookies: HashMap<String, String>,
    /// The query string, decoded; a repeated key keeps its last value.
    pub query: HashMap<String, String>,
    /// Path parameters captured by the route (`/ws/rooms/{room}/`).
    pub path_params: HashMap<String, String>,
    /// The peer's address, when the server was started with connect info (as
    /// [`serve`](crate::serve) does).
    pub peer_addr: Option<SocketAddr>,
}

impl Scope {
    /// Is a user authenticated on this connection?
    pub fn is_authenticated(&self) -> bool {
        self.user.is_some()
    }

    /// One header as text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// Parses a `Cookie` header into name → value pairs.
pub(crate) fn parse_cookies(headers: &HeaderMap) -> HashMap<String, String> {
    headers
        .get_all(axum::http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| {
            let (k, v) = pair.split_once('=')?;
            Some((k.trim().to_owned(), v.trim().to_owned()))
        })
        .collect()
}
