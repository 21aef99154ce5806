//! Errors: [`ApiError`], the rejection an action answers with, and [`Error`], the framework's
//! own failures (start-up, database, channel layer).

use std::fmt;

use axum::http::StatusCode;
use serde_json::{Map, Value, json};

/// A boxed error cause.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The error an action replies with: a `response_status` and the `errors` list of the DCRF
/// envelope.
///
/// Like axum's rejections it carries its own status, so `?` in an action is all it takes:
///
/// ```
/// use dcrf::ApiError;
///
/// let e = ApiError::not_found();
/// assert_eq!(e.status(), dcrf::StatusCode::NOT_FOUND);
/// assert_eq!(serde_json::json!(e.errors()), serde_json::json!(["Not found"]));
///
/// let e = ApiError::field("title", "This field is required.");
/// assert_eq!(serde_json::json!(e.errors()), serde_json::json!([{"title": ["This field is required."]}]));
/// ```
///
/// Server faults ([`ApiError::internal`]) reply with a generic 500 message; the cause is logged
/// with the action and request id, never sent to the client.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    errors: Vec<Value>,
    source: Option<BoxError>,
}

/// The text of a permission denial (DRF's `PermissionDenied`).
pub const PERMISSION_DENIED: &str = "You do not have permission to perform this action.";
/// The text of a server fault.
pub const SERVER_ERROR: &str = "A server error occurred.";

impl ApiError {
    /// An error with any status and a list of error entries (strings or field maps).
    pub fn new(status: StatusCode, errors: Vec<Value>) -> Self {
        ApiError {
            status,
            errors,
            source: None,
        }
    }

    /// 400 with one message.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, vec![Value::String(message.into())])
    }

    /// 400 with one message for one field: `[{"field": ["message"]}]`.
    pub fn field(field: &str, message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            vec![json!({ field: [message.into()] })],
        )
    }

    /// 400 with DRF's field-error map: `[{"field": ["msg", ...], "non_field_errors": [...]}]`.
    pub fn validation(fields: Map<String, Value>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, vec![Value::Object(fields)])
    }

    /// 403 `You do not have permission to perform this action.`
    pub fn permission_denied() -> Self {
        Self::new(
            StatusCode::FORBIDDEN,
            vec![Value::String(PERMISSION_DENIED.into())],
        )
    }

    /// 404 `Not found` (DCRF's `Http404` text, without a period).
    pub fn not_found() -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            vec![Value::String("Not found".into())],
        )
    }

    /// 405 `Method "x" not allowed.`
    pub fn method_not_allowed(action: &str) -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            vec![Value::String(format!("Method \"{action}\" not allowed."))],
        )
    }

    /// 405 `Unable to find action in message body.`
    pub fn action_missing() -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            vec![Value::String(
                "Unable to find action in message body.".into(),
            )],
        )
    }

    /// 500 with a generic message; `cause` is logged, not sent.
    pub fn internal(cause: impl Into<BoxError>) -> Self {
        ApiError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            errors: vec![Value::String(SERVER_ERROR.into())],
            source: Some(cause.into()),
        }
    }

    /// The envelope's `response_status`.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The envelope's `errors`.
    pub fn errors(&self) -> &[Value] {
        &self.errors
    }

    /// The logged cause of a server fault.
    pub fn cause(&self) -> Option<&(dyn std::error::Error + Send + Sync)> {
        self.source.as_deref()
    }

    /// Is this a server fault (status 500 and above)?
    pub fn is_server_error(&self) -> bool {
        self.status.is_server_error()
    }
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {}",
            self.status.as_u16(),
            Value::Array(self.errors.clone())
        )?;
        if let Some(cause) = &self.source {
            write!(f, " ({cause})")?;
        }
        Ok(())
    }
}

impl std::error::Error for ApiError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

#[cfg(feature = "model")]
impl From<sea_orm::DbErr> for ApiError {
    /// Constraint violations are the client's mistake (400, `non_field_errors`); every other
    /// database error is a server fault (500).
    fn from(e: sea_orm::DbErr) -> Self {
        let message = match e.sql_err() {
            Some(sea_orm::SqlErr::UniqueConstraintViolation(_)) => {
                "A record with these values already exists."
            }
            Some(sea_orm::SqlErr::ForeignKeyConstraintViolation(_)) => {
                "A related record does not exist."
            }
            _ => return ApiError::internal(e),
        };
        ApiError::new(
            StatusCode::BAD_REQUEST,
            vec![json!({ "non_field_errors": [message] })],
        )
    }
}

impl From<serde_json::Error> for ApiError {
    /// JSON that a client sent and that does not parse or fit is the client's mistake: 400
    /// with serde's message. (Serializing a reply never goes through this conversion; it
    /// answers 500 where it happens.)
    fn from(e: serde_json::Error) -> Self {
        ApiError::bad_request(format!("Invalid JSON: {e}"))
    }
}

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        match e {
            #[cfg(feature = "model")]
            Error::Database(db) => db.into(),
            other => ApiError::internal(other),
        }
    }
}

/// The framework's own failures: everything that is not an action's answer to a client.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The database failed.
    #[cfg(feature = "model")]
    #[cfg_attr(docsrs, doc(cfg(feature = "model")))]
    #[error("database error: {0}")]
    Database(#[from] sea_orm::DbErr),
    /// Binding or serving the socket failed.
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    /// JSON encoding or decoding failed.
    #[error("json error: {0}")]
    Json(#[from] serde_json::Error),
    /// A configuration value is wrong (a URL, a key, a flag).
    #[error("configuration error: {message}")]
    Configuration {
        /// What is wrong, for a person.
        message: String,
        /// The underlying failure, when there is one.
        #[source]
        source: Option<BoxError>,
    },
    /// The channel layer (its broker) failed.
    #[error("channel layer error: {0}")]
    Layer(#[source] BoxError),
}

impl Error {
    /// A configuration error with no underlying cause.
    pub fn configuration(message: impl Into<String>) -> Self {
        Error::Configuration {
            message: message.into(),
            source: None,
        }
    }

    /// A configuration error caused by `source`.
    pub fn configuration_caused_by(
        message: impl Into<String>,
        source: impl Into<BoxError>,
    ) -> Self {
        Error::Configuration {
            message: message.into(),
            source: Some(source.into()),
        }
    }

    /// A channel-layer failure.
    pub fn layer(source: impl Into<BoxError>) -> Self {
        Error::Layer(source.into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::error::Error as _;

    #[test]
    fn a_clients_bad_json_is_a_400() {
        let e = serde_json::from_str::<Value>("{").unwrap_err();
        let api = ApiError::from(e);
        assert_eq!(api.status(), StatusCode::BAD_REQUEST);
        assert!(!api.is_server_error());
        assert!(
            api.errors()[0]
                .as_str()
                .unwrap()
                .starts_with("Invalid JSON: ")
        );
    }

    #[test]
    fn framework_errors_keep_their_source() {
        let io = std::io::Error::other("connection refused");
        let e = Error::configuration_caused_by("cannot reach the broker", io);
        assert_eq!(
            e.to_string(),
            "configuration error: cannot reach the broker"
        );
        assert_eq!(e.source().unwrap().to_string(), "connection refused");
        let e = Error::layer(std::io::Error::other("down"));
        assert_eq!(e.source().unwrap().to_string(), "down");
        assert!(Error::configuration("x").source().is_none());
    }

    #[test]
    fn statuses_are_status_codes() {
        assert_eq!(ApiError::not_found().status(), StatusCode::NOT_FOUND);
        assert_eq!(ApiError::internal("boom").status(), 500);
        assert!(ApiError::internal("boom").is_server_error());
    }
}
