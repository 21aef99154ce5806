//! HTTP routes over the socket (DCRF's `view_as_consumer`): a consumer whose actions call an
//! axum [`Router`] in-process.
//!
//! Each action maps to an HTTP method and a path template. The message's fields become the
//! request:
//!
//! | message field | request |
//! |---|---|
//! | `parameters` | fills the path template's `{name}` placeholders |
//! | `query` | the query string (`{"a": 1, "tag": ["x", "y"]}` → `?a=1&tag=x&tag=y`) |
//! | `data` | the JSON body (`Content-Type: application/json`) |
//!
//! The socket's [`Scope`](crate::Scope) is in the request's extensions (`Extension<Scope>`), and so is the
//! [`User`](crate::User) when there is one (`Option<Extension<User>>`), so handlers see who is connected.
//!
//! The reply carries the handler's status. A 2xx body is `data` (JSON, or text when the body is
//! not JSON); a 4xx/5xx body goes into `errors` (a JSON array as is, any other JSON value or
//! text as one entry) with `data: null`.
//!
//! Differences from DCRF, on purpose: `data` reaches the handler as the request body (DCRF
//! set it as a string on `request.POST`, which DRF views never saw); the user is visible to
//! the handler (DCRF's views saw an anonymous user); error responses fill `errors` (DCRF put
//! them in `data` with `errors: []`); each socket gets its own consumer (DCRF's
//! `view_as_consumer` returned one shared instance); the default mapping is REST's
//! (`create` → POST), with DCRF's available through [`ViewConsumer::dcrf_methods`].
//!
//! ```
//! use axum::{Json, Router, routing::get};
//! use dcrf::view::ViewConsumer;
//!
//! let api: Router = Router::new().route("/api/things/{id}", get(|| async { Json(["a", "b"]) }));
//! let app = dcrf::Dcrf::new();
//! let view = ViewConsumer::new(api).action("retrieve", axum::http::Method::GET, "/api/things/{id}");
//! let router: Router = Router::new().route("/ws/api/", app.consumer(move || view.clone()));
//! // → {"action": "retrieve", "parameters": {"id": 42}, "request_id": 1}
//! ```

use std::collections::HashMap;
use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::http::{Method, Request, header};
use serde_json::Value;
use tower::ServiceExt;

use crate::consumer::Event;
use crate::consumer::{ActionTable, Consumer, Ctx, Dispatched, Reply};
use crate::error::ApiError;
use crate::protocol::Frame;

/// The largest response body read from a handler.
const MAX_BODY: usize = 16 << 20;

/// A consumer that serves its actions by calling HTTP routes. Cheap to clone (one per socket).
#[derive(Clone, Debug)]
pub struct ViewConsumer {
    router: Router,
    actions: Arc<HashMap<String, (Method, String)>>,
}

impl ViewConsumer {
    /// No actions yet; add them with [`action`](Self::action) or [`rest`](Self::rest).
    pub fn new(router: Router) -> Self {
        ViewConsumer {
            router,
            actions: Arc::new(HashMap::new()),
        }
    }

    /// Maps an action to a method and a path template (`/api/todos/{id}`).
    pub fn action(mut self, name: &str, method: Method, path: &str) -> Self {
        Arc::make_mut(&mut self.actions).insert(name.to_owned(), (method, path.to_owned()));
        self
    }

    /// REST's mapping of the six model actions onto a collection path and an item path:
    /// `list` GET and `create` POST on the collection; `retrieve` GET, `update` PUT, `patch`
    /// PATCH and `delete` DELETE on the item.
    pub fn rest(self, collection: &str, item: &str) -> Self {
        self.action("list", Method::GET, collection)
            .action("create", Method::POST, collection)
            .action("retrieve", Method::GET, item)
            .action("update", Method::PUT, item)
            .action("patch", Method::PATCH, item)
            .action("delete", Method::DELETE, item)
    }

    /// DCRF's mapping, all on one path: `create` PUT, `update` PATCH, `list` and `retrieve` GET.
    pub fn dcrf_methods(self, path: &str) -> Self {
        self.action("create", Method::PUT, path)
            .action("update", Method::PATCH, path)
            .action("list", Method::GET, path)
            .action("retrieve", Method::GET, path)
    }

    async fn call(
        &self,
        ctx: &Ctx,
        method: Method,
        template: &str,
        frame: &Frame<'_>,
    ) -> Result<Reply<Value>, ApiError> {
        let parameters: serde_json::Map<String, Value> =
            frame.field_as("parameters")?.unwrap_or_default();
        let query: serde_json::Map<String, Value> = frame.field_as("query")?.unwrap_or_default();
        let mut uri = fill_template(template, &parameters)?;
        let query = encode_query(&query);
        if !query.is_empty() {
            uri.push('?');
            uri.push_str(&query);
        }
        let mut builder = Request::builder().method(method).uri(uri);
        let body = match frame.field("data") {
            Some(raw) => {
                builder = builder.header(header::CONTENT_TYPE, "application/json");
                Body::from(raw.get().to_owned())
            }
            None => Body::empty(),
        };
        let mut request = builder
            .body(body)
            .map_err(|e| ApiError::bad_request(format!("Invalid request: {e}")))?;
        request.extensions_mut().insert(ctx.scope().clone());
        if let Some(user) = ctx.user() {
            request.extensions_mut().insert(user.clone());
        }
        let response = self
            .router
            .clone()
            .oneshot(request)
            .await
            .map_err(ApiError::internal)?;
        let status = response.status();
        let bytes = axum::body::to_bytes(response.into_body(), MAX_BODY)
            .await
            .map_err(ApiError::internal)?;
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()))
        };
        if !status.is_client_error() && !status.is_server_error() {
            return Ok(Reply::with_status(body, status));
        }
        let errors = match body {
            Value::Array(items) => items,
            Value::Null => Vec::new(),
            other => vec![other],
        };
        Err(ApiError::new(status, errors))
    }
}

/// Replaces `{name}` placeholders with URL-encoded parameters.
fn fill_template(
    template: &str,
    parameters: &serde_json::Map<String, Value>,
) -> Result<String, ApiError> {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(start) = rest.find('{') {
        out.push_str(&rest[..start]);
        let Some(len) = rest[start..].find('}') else {
            break;
        };
        let name = &rest[start + 1..start + len];
        let value = parameters.get(name).ok_or_else(|| {
            ApiError::field("parameters", format!("Missing path parameter \"{name}\"."))
        })?;
        out.push_str(&encode(&scalar(value)));
        rest = &rest[start + len + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// A JSON value as text for a URL: strings as themselves, anything else as JSON.
fn scalar(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Percent-encodes everything but unreserved characters.
fn encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `{"a": 1, "tag": ["x", "y"]}` → `a=1&tag=x&tag=y`.
fn encode_query(query: &serde_json::Map<String, Value>) -> String {
    let mut pairs = Vec::new();
    for (key, value) in query {
        match value {
            Value::Array(items) => {
                for item in items {
                    pairs.push(format!("{}={}", encode(key), encode(&scalar(item))));
                }
            }
            Value::Null => pairs.push(encode(key)),
            other => pairs.push(format!("{}={}", encode(key), encode(&scalar(other)))),
        }
    }
    pairs.join("&")
}

impl ActionTable for ViewConsumer {
    async fn dispatch<'a>(
        &'a mut self,
        ctx: &'a Ctx,
        action: &'a str,
        frame: &'a Frame<'a>,
    ) -> Dispatched {
        let Some((method, template)) = self.actions.get(action).cloned() else {
            return Dispatched::Unknown;
        };
        let result = self.call(ctx, method, &template, frame).await;
        ctx.finish(action, frame.request_id(), result).await;
        Dispatched::Handled
    }

    async fn handle_event<'a>(&'a mut self, ctx: &'a Ctx, event: &'a Event<'a>) {
        self.on_event(ctx, event).await;
    }

    /// Actions mapped to `GET` or `HEAD` read (DRF's safe methods).
    fn reads(&self, action: &str) -> bool {
        self.actions
            .get(action)
            .is_some_and(|(method, _)| method == Method::GET || method == Method::HEAD)
    }
}

impl Consumer for ViewConsumer {}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn templates_and_queries() {
        let params = json!({"id": 42, "slug": "a b/c"});
        let params = params.as_object().unwrap();
        assert_eq!(
            fill_template("/api/{id}/x/{slug}", params).unwrap(),
            "/api/42/x/a%20b%2Fc"
        );
        assert_eq!(
            fill_template("/api/{nope}", params).unwrap_err().status(),
            400
        );
        let q = json!({"a": 1, "tag": ["x", "y"], "s": "é&"});
        assert_eq!(
            encode_query(q.as_object().unwrap()),
            "a=1&s=%C3%A9%26&tag=x&tag=y"
        );
    }
}
