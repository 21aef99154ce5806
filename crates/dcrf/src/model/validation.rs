//! Input parsing and validation in DRF's error shape.

use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use super::validators::DrfMessages;
use crate::error::ApiError;
use crate::protocol::deserialize_error;

/// Field errors in DRF's shape: `{"field": ["message", ...], "non_field_errors": [...]}`.
///
/// Build them in [`ModelConsumer::validate`](super::ModelConsumer::validate) and return them
/// with `?` (they convert into a 400 [`ApiError`]):
///
/// ```
/// use dcrf::model::ValidationErrors;
///
/// let mut errors = ValidationErrors::new();
/// errors.add("title", "A todo with this title already exists.");
/// errors.add_non_field("Nothing to do.");
/// let api: dcrf::ApiError = errors.into();
/// assert_eq!(api.status(), 400);
/// assert_eq!(
///     serde_json::json!(api.errors()),
///     serde_json::json!([{"title": ["A todo with this title already exists."], "non_field_errors": ["Nothing to do."]}])
/// );
/// ```
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ValidationErrors(Map<String, Value>);

impl ValidationErrors {
    /// No errors yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a message for a field.
    pub fn add(&mut self, field: &str, message: impl Into<String>) {
        let entry = self
            .0
            .entry(field.to_owned())
            .or_insert_with(|| Value::Array(Vec::new()));
        if let Value::Array(list) = entry {
            list.push(Value::String(message.into()));
        }
    }

    /// Adds an object-level message (`non_field_errors`).
    pub fn add_non_field(&mut self, message: impl Into<String>) {
        self.add("non_field_errors", message);
    }

    /// No errors?
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// `Ok(())` when empty, else the 400 error.
    pub fn into_result(self) -> Result<(), ApiError> {
        if self.is_empty() {
            Ok(())
        } else {
            Err(self.into())
        }
    }

    /// From a garde report: each path becomes a field (`items[0].name`), the root becomes
    /// `non_field_errors`.
    pub fn from_garde(report: &garde::Report) -> Self {
        let mut errors = Self::new();
        for (path, error) in report.iter() {
            let field = path.to_string();
            let field = if field.is_empty() {
                "non_field_errors"
            } else {
                &field
            };
            errors.add(field, error.message().to_string());
        }
        errors
    }
}

impl From<ValidationErrors> for ApiError {
    fn from(e: ValidationErrors) -> Self {
        ApiError::validation(e.0)
    }
}

/// The DRF name of a JSON value's type, for "Expected a dictionary, but got list."
fn python_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "NoneType",
        Value::Bool(_) => "bool",
        Value::Number(n) if n.is_f64() => "float",
        Value::Number(_) => "int",
        Value::String(_) => "str",
        Value::Array(_) => "list",
        Value::Object(_) => "dict",
    }
}

/// DRF's message for a string with a NUL character (`ProhibitNullCharactersValidator`).
pub const NULL_CHARACTERS: &str = "Null characters are not allowed.";

/// Does any string in `value` (or any key of its objects) hold a NUL character?
fn contains_nul(value: &Value) -> bool {
    match value {
        Value::String(s) => s.contains('\0'),
        Value::Array(items) => items.iter().any(contains_nul),
        Value::Object(map) => map.iter().any(|(k, v)| k.contains('\0') || contains_nul(v)),
        _ => false,
    }
}

/// Parses `data` into an input type and runs its garde rules, with DRF's messages
/// ([`DrfMessages`](super::validators::DrfMessages)).
///
/// With `base` (a partial update), `data`'s keys are laid over the current object first, so
/// the input is validated as the object will be after the change.
pub fn parse_input<T>(data: &str, base: Option<Value>) -> Result<T, ApiError>
where
    T: DeserializeOwned + garde::Validate<Context = ()>,
{
    let value: Value = serde_json::from_str(data)?;
    let Value::Object(fields) = value else {
        let mut errors = ValidationErrors::new();
        errors.add_non_field(format!(
            "Invalid data. Expected a dictionary, but got {}.",
            python_type(&value)
        ));
        return Err(errors.into());
    };
    // DRF's CharField refuses NUL (PostgreSQL cannot store it in text); so do we, on every
    // backend, wherever it sits in a field's value.
    let mut errors = ValidationErrors::new();
    for (field, value) in &fields {
        if contains_nul(value) {
            errors.add(field, NULL_CHARACTERS);
        }
    }
    errors.into_result()?;
    let merged = match base {
        Some(Value::Object(mut current)) => {
            current.extend(fields);
            Value::Object(current)
        }
        _ => Value::Object(fields),
    };
    let input: T = serde_path_to_error::deserialize(merged).map_err(deserialize_error)?;
    if let Err(report) = garde::i18n::with_i18n(DrfMessages, || input.validate()) {
        return Err(ValidationErrors::from_garde(&report).into());
    }
    Ok(input)
}
