//! The DCRF wire protocol: parsing one inbound frame, encoding one reply.
//!
//! A request is a JSON object with an `action`, an optional `request_id` of any JSON type, and any
//! other keys, which become the action's arguments:
//!
//! ```json
//! {"action": "retrieve", "request_id": 7, "pk": 42}
//! ```
//!
//! A reply is the DCRF envelope, keys in DCRF's order:
//!
//! ```json
//! {"errors": [], "data": {"id": 42}, "action": "retrieve", "response_status": 200, "request_id": 7}
//! ```
//!
//! Parsing builds no `serde_json::Value` tree: [`Frame::parse`] walks the object once and keeps
//! borrowed raw slices of every value. The `request_id` is echoed back byte for byte.

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, DeserializeOwned, IntoDeserializer, MapAccess, Visitor};
use serde::ser::{SerializeMap, SerializeStruct};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::value::RawValue;

use crate::error::ApiError;

/// One parsed inbound frame: the action name, the raw `request_id` and the remaining fields.
///
/// Everything borrows from the frame's text, so parsing allocates only the field list.
#[derive(Debug)]
pub struct Frame<'a> {
    action: Option<&'a RawValue>,
    request_id: Option<&'a RawValue>,
    fields: Vec<(Cow<'a, str>, &'a RawValue)>,
    reads: bool,
}

/// Why a text frame could not be read as a request.
#[derive(Debug)]
pub enum FrameError {
    /// The text is not JSON.
    InvalidJson(serde_json::Error),
    /// The text is JSON, but not an object.
    NotAnObject,
}

impl FrameError {
    /// The error frame a client gets for this mistake (400, `action` and `request_id` null).
    pub fn to_api_error(&self) -> ApiError {
        match self {
            FrameError::InvalidJson(e) => {
                ApiError::bad_request(format!("Invalid JSON: {}", strip_position(e)))
            }
            FrameError::NotAnObject => ApiError::bad_request(
                "Expected a JSON object with an \"action\" key, e.g. {\"action\": \"list\", \"request_id\": 1}.",
            ),
        }
    }
}

impl<'a> Frame<'a> {
    /// Parses one text frame.
    ///
    /// ```
    /// let frame = dcrf::Frame::parse(r#"{"action":"echo","request_id":{"a":1},"x":2}"#).unwrap();
    /// assert_eq!(frame.action_str(), Some("echo"));
    /// assert_eq!(frame.request_id().unwrap().get(), r#"{"a":1}"#);
    /// assert_eq!(frame.field("x").unwrap().get(), "2");
    /// ```
    pub fn parse(text: &'a str) -> Result<Frame<'a>, FrameError> {
        let mut de = serde_json::Deserializer::from_str(text);
        let frame = match (&mut de).deserialize_any(FrameVisitor) {
            Ok(frame) => frame,
            Err(e) if e.is_data() => return Err(FrameError::NotAnObject),
            Err(e) => return Err(FrameError::InvalidJson(e)),
        };
        de.end().map_err(FrameError::InvalidJson)?;
        Ok(frame)
    }

    /// Does the requested action only read (DRF's safe methods)? Model consumers' `list`,
    /// `retrieve` and subscriptions do, custom actions marked `#[action(read)]` do, views mapped
    /// to `GET` do, and so does every push a subscription delivers; everything else writes.
    /// Set by the server before permissions are checked, so a permission can tell reads from
    /// writes ([`IsAuthenticatedOrReadOnly`](crate::permission::IsAuthenticatedOrReadOnly)).
    pub fn reads(&self) -> bool {
        self.reads
    }

    /// Marks the frame as a read (or not).
    pub(crate) fn set_reads(&mut self, reads: bool) {
        self.reads = reads;
    }

    /// The raw `action` value, if the key was present (of any JSON type).
    pub fn action_raw(&self) -> Option<&'a RawValue> {
        self.action
    }

    /// The action name, if `action` is present and a plain string.
    pub fn action_str(&self) -> Option<&'a str> {
        let raw = self.action?.get();
        // A JSON string without escapes is its own content between the quotes.
        let inner = raw.strip_prefix('"')?.strip_suffix('"')?;
        if inner.contains('\\') {
            return None;
        }
        Some(inner)
    }

    /// The raw `request_id`, echoed verbatim in every reply (absent means `null`).
    pub fn request_id(&self) -> Option<&'a RawValue> {
        self.request_id
    }

    /// A field other than `action` and `request_id`, raw.
    pub fn field(&self, name: &str) -> Option<&'a RawValue> {
        self.fields
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| *v)
    }

    /// Deserializes one field; `Ok(None)` when it is absent.
    ///
    /// A value of the wrong type is a 400 [`ApiError`] naming the field.
    pub fn field_as<T: DeserializeOwned>(&self, name: &str) -> Result<Option<T>, ApiError> {
        match self.field(name) {
            None => Ok(None),
            Some(raw) => serde_json::from_str(raw.get())
                .map(Some)
                .map_err(|e| ApiError::field(name, strip_position(&e))),
        }
    }

    /// Every field other than `action` and `request_id`, in frame order.
    pub fn fields(&self) -> impl ExactSizeIterator<Item = (&str, &'a RawValue)> + '_ {
        self.fields.iter().map(|(k, v)| (k.as_ref(), *v))
    }

    /// Deserializes the fields (everything but `action` and `request_id`) into an action's
    /// argument type.
    ///
    /// A missing field becomes `{"field": ["This field is required."]}`, a mistyped one
    /// `{"field": ["invalid type: ..."]}`, both with status 400.
    pub fn args<T: DeserializeOwned>(&self) -> Result<T, ApiError> {
        let de = de::value::MapDeserializer::<_, serde_json::Error>::new(
            self.fields.iter().map(|(k, v)| (k.as_ref(), *v)),
        );
        serde_path_to_error::deserialize(de).map_err(deserialize_error)
    }

    /// The fields as a JSON object (serializes without building a tree).
    pub fn fields_object(&self) -> FieldsObject<'_, 'a> {
        FieldsObject(self)
    }
}

/// The fields of a [`Frame`] (all but `action` and `request_id`) serialized as one JSON object,
/// each value copied through byte for byte.
#[derive(Debug, Clone, Copy)]
pub struct FieldsObject<'f, 'a>(&'f Frame<'a>);

impl Serialize for FieldsObject<'_, '_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.0.fields.len()))?;
        for (k, v) in &self.0.fields {
            map.serialize_entry(k.as_ref(), *v)?;
        }
        map.end()
    }
}

/// Turns an argument deserialization error into DRF's field-error shape.
pub(crate) fn deserialize_error(err: serde_path_to_error::Error<serde_json::Error>) -> ApiError {
    let path = err.path().to_string();
    let inner = strip_position(err.inner());
    if let Some(rest) = inner.strip_prefix("missing field `") {
        let name = rest.trim_end_matches('`');
        let full = if path == "." {
            name.to_owned()
        } else {
            format!("{path}.{name}")
        };
        return ApiError::field(&full, "This field is required.");
    }
    let message = type_message(&inner).unwrap_or(inner);
    if path == "." {
        ApiError::bad_request(message)
    } else {
        ApiError::field(&path, message)
    }
}

/// DRF's texts for a value of the wrong JSON type, from serde's error message (`invalid type:
/// string "two", expected i64`); `None` for messages that are not type mismatches.
pub(crate) fn type_message(serde_message: &str) -> Option<String> {
    let rest = serde_message
        .strip_prefix("invalid type: ")
        .or_else(|| serde_message.strip_prefix("invalid value: "))?;
    let (unexpected, expected) = rest.split_once(", expected ")?;
    if unexpected == "null" {
        return Some("This field may not be null.".into());
    }
    let expected = expected.trim();
    let integer = [
        "i8", "i16", "i32", "i64", "i128", "isize", "u8", "u16", "u32", "u64", "u128", "usize",
    ];
    let message = if integer.contains(&expected) {
        match out_of_range(unexpected, expected) {
            Some(bound) => bound,
            None => "A valid integer is required.".to_owned(),
        }
    } else if expected == "f32" || expected == "f64" {
        "A valid number is required.".to_owned()
    } else if expected == "a boolean" {
        "Must be a valid boolean.".to_owned()
    } else if expected == "a string" || expected == "a borrowed string" || expected == "a character"
    {
        "Not a valid string.".to_owned()
    } else if expected == "a sequence" || expected.starts_with("a tuple") {
        format!(
            "Expected a list of items but got type \"{}\".",
            python_type(unexpected)
        )
    } else if expected == "a map" || expected.starts_with("struct ") {
        format!(
            "Invalid data. Expected a dictionary, but got {}.",
            python_type(unexpected)
        )
    } else {
        return None;
    };
    Some(message)
}

/// DRF's bound message for an integer outside its Rust type (`integer `-1`` for a `u64`).
fn out_of_range(unexpected: &str, expected: &str) -> Option<String> {
    let value: i128 = unexpected
        .strip_prefix("integer `")?
        .strip_suffix('`')?
        .parse()
        .ok()?;
    let (min, max): (i128, i128) = match expected {
        "i8" => (i8::MIN.into(), i8::MAX.into()),
        "i16" => (i16::MIN.into(), i16::MAX.into()),
        "i32" => (i32::MIN.into(), i32::MAX.into()),
        "i64" | "isize" => (i64::MIN.into(), i64::MAX.into()),
        "u8" => (0, u8::MAX.into()),
        "u16" => (0, u16::MAX.into()),
        "u32" => (0, u32::MAX.into()),
        "u64" | "usize" => (0, u64::MAX.into()),
        _ => return None,
    };
    if value < min {
        Some(format!(
            "Ensure this value is greater than or equal to {min}."
        ))
    } else if value > max {
        Some(format!("Ensure this value is less than or equal to {max}."))
    } else {
        None
    }
}

/// DRF's (Python's) name for the type serde describes as `unexpected`.
fn python_type(unexpected: &str) -> &'static str {
    let kind = unexpected.split([' ', '`']).next().unwrap_or_default();
    match kind {
        "string" | "character" => "str",
        "integer" => "int",
        "floating" => "float",
        "boolean" => "bool",
        "map" => "dict",
        "sequence" => "list",
        "null" | "unit" => "NoneType",
        _ => "object",
    }
}

/// serde_json's message without the " at line L column C" suffix, which means nothing to a
/// client whose argument was re-read on its own.
pub(crate) fn strip_position(err: &serde_json::Error) -> String {
    let text = err.to_string();
    match text.rfind(" at line ") {
        Some(i) if err.line() != 0 => text[..i].to_owned(),
        _ => text,
    }
}

struct FrameVisitor;

impl<'de> Visitor<'de> for FrameVisitor {
    type Value = Frame<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Frame<'de>, A::Error> {
        let mut frame = Frame {
            action: None,
            request_id: None,
            fields: Vec::new(),
            reads: false,
        };
        while let Some(key) = map.next_key::<Key<'de>>()? {
            let value: &'de RawValue = map.next_value()?;
            match key.0.as_ref() {
                "action" => frame.action = Some(value),
                "request_id" => frame.request_id = Some(value),
                _ => frame.fields.push((key.0, value)),
            }
        }
        Ok(frame)
    }
}

/// A map key that borrows from the input unless it contains escapes.
struct Key<'a>(Cow<'a, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl<'de> Visitor<'de> for KeyVisitor {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string key")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v)))
            }
        }
        deserializer.deserialize_str(KeyVisitor)
    }
}

// `MapDeserializer` needs the values to be deserializers; `&RawValue` is one.
const _: fn() = || {
    fn assert_into<'de, T: IntoDeserializer<'de, serde_json::Error>>() {}
    assert_into::<&RawValue>();
};

/// The reply envelope, serialized in DCRF's key order:
/// `errors`, `data`, `action`, `response_status`, `request_id`.
#[derive(Debug)]
pub struct Envelope<'a, D: ?Sized> {
    /// `[]` on success; strings and/or field-error objects otherwise.
    pub errors: &'a [serde_json::Value],
    /// The payload (`null` on errors).
    pub data: &'a D,
    /// The action this replies to (`null` when the request had none).
    pub action: Option<&'a str>,
    /// HTTP-like status code.
    pub response_status: axum::http::StatusCode,
    /// The request's `request_id`, verbatim (`null` when absent).
    pub request_id: Option<&'a RawValue>,
}

impl<D: Serialize + ?Sized> Serialize for Envelope<'_, D> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut s = serializer.serialize_struct("Envelope", 5)?;
        s.serialize_field("errors", self.errors)?;
        s.serialize_field("data", self.data)?;
        s.serialize_field("action", &self.action)?;
        s.serialize_field("response_status", &self.response_status.as_u16())?;
        s.serialize_field("request_id", &self.request_id)?;
        s.end()
    }
}

impl<D: Serialize + ?Sized> Envelope<'_, D> {
    /// Serializes the envelope to a JSON string.
    pub fn to_json(&self) -> Result<String, serde_json::Error> {
        let mut buf = Vec::with_capacity(128);
        serde_json::to_writer(&mut buf, self)?;
        // serde_json writes valid UTF-8.
        Ok(String::from_utf8(buf).unwrap_or_default())
    }
}

/// Appends `s` to `out` as a JSON string. Names and epochs rarely hold anything to escape: those
/// are copied as they are, the rest goes through serde_json.
pub(crate) fn push_json_str(out: &mut String, s: &str) {
    if s.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\') {
        out.push('"');
        out.push_str(s);
        out.push('"');
    } else {
        // Serializing a string cannot fail.
        out.push_str(&serde_json::to_string(s).unwrap_or_default());
    }
}

/// Encodes an error reply.
pub(crate) fn encode_error(
    err: &ApiError,
    action: Option<&str>,
    request_id: Option<&RawValue>,
) -> String {
    let env = Envelope {
        errors: err.errors(),
        data: &(),
        action,
        response_status: err.status(),
        request_id,
    };
    // Serializing a unit, strings and `Value`s cannot fail.
    env.to_json().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    #[test]
    fn json_strings_are_escaped_exactly_as_serde_json_does() {
        for s in [
            "list",
            "",
            "a\"b",
            "back\\slash",
            "line\nbreak",
            "tab\t",
            "\u{1}",
            "é✓",
        ] {
            let mut out = String::from("x");
            super::push_json_str(&mut out, s);
            assert_eq!(
                out,
                format!("x{}", serde_json::to_string(s).unwrap()),
                "{s:?}"
            );
        }
    }

    #[test]
    fn serde_type_errors_in_drf_words() {
        let cases = [
            (
                r#"invalid type: string "two", expected i64"#,
                "A valid integer is required.",
            ),
            (
                "invalid value: integer `5000000000`, expected i32",
                "Ensure this value is less than or equal to 2147483647.",
            ),
            (
                "invalid value: integer `-1`, expected u64",
                "Ensure this value is greater than or equal to 0.",
            ),
            (
                "invalid type: floating point `1.5`, expected u32",
                "A valid integer is required.",
            ),
            (
                r#"invalid type: string "x", expected f64"#,
                "A valid number is required.",
            ),
            (
                "invalid type: integer `1`, expected a boolean",
                "Must be a valid boolean.",
            ),
            (
                "invalid type: integer `5`, expected a string",
                "Not a valid string.",
            ),
            (
                "invalid type: null, expected a string",
                "This field may not be null.",
            ),
            (
                r#"invalid type: string "a", expected a sequence"#,
                "Expected a list of items but got type \"str\".",
            ),
            (
                "invalid type: sequence, expected struct Point",
                "Invalid data. Expected a dictionary, but got list.",
            ),
        ];
        for (serde, drf) in cases {
            assert_eq!(type_message(serde).as_deref(), Some(drf), "{serde}");
        }
        assert_eq!(type_message("unknown field `x`"), None);
        assert_eq!(
            type_message("invalid type: map, expected a unit thing"),
            None
        );
    }

    use super::*;
    use serde_json::json;

    #[test]
    fn parses_all_request_id_types() {
        for rid in [
            "1",
            "\"abc\"",
            "{\"a\":[1,2]}",
            "null",
            "1.50",
            "[1,2]",
            "true",
        ] {
            let text = format!("{{\"action\":\"x\",\"request_id\":{rid}}}");
            let f = Frame::parse(&text).unwrap();
            assert_eq!(f.request_id().unwrap().get(), rid);
        }
        assert!(
            Frame::parse("{\"action\":\"x\"}")
                .unwrap()
                .request_id()
                .is_none()
        );
    }

    #[test]
    fn rejects_non_objects_and_bad_json() {
        assert!(matches!(
            Frame::parse("[1,2]"),
            Err(FrameError::NotAnObject)
        ));
        assert!(matches!(Frame::parse("5"), Err(FrameError::NotAnObject)));
        assert!(matches!(Frame::parse("{"), Err(FrameError::InvalidJson(_))));
        assert!(matches!(
            Frame::parse("{} x"),
            Err(FrameError::InvalidJson(_))
        ));
        assert!(matches!(Frame::parse(""), Err(FrameError::InvalidJson(_))));
    }

    #[test]
    fn action_must_be_a_plain_string() {
        assert_eq!(Frame::parse(r#"{"action":5}"#).unwrap().action_str(), None);
        assert_eq!(
            Frame::parse(r#"{"action":"a\"b"}"#).unwrap().action_str(),
            None
        );
        assert_eq!(
            Frame::parse(r#"{"action":"list"}"#).unwrap().action_str(),
            Some("list")
        );
    }

    #[derive(Deserialize, Debug)]
    #[allow(dead_code)]
    struct Args {
        pk: u64,
        name: Option<String>,
    }

    #[test]
    fn typed_args_name_the_field() {
        let f = Frame::parse(r#"{"action":"x","pk":"a"}"#).unwrap();
        let err = f.args::<Args>().unwrap_err();
        assert_eq!(err.status(), 400);
        assert_eq!(
            json!(err.errors()),
            json!([{"pk": ["A valid integer is required."]}])
        );
        let f = Frame::parse(r#"{"action":"x"}"#).unwrap();
        let err = f.args::<Args>().unwrap_err();
        assert_eq!(
            json!(err.errors()),
            json!([{"pk": ["This field is required."]}])
        );
        let f = Frame::parse(r#"{"action":"x","pk":3,"extra":[1]}"#).unwrap();
        assert_eq!(f.args::<Args>().unwrap().pk, 3);
    }

    #[test]
    fn envelope_key_order_and_verbatim_request_id() {
        let f =
            Frame::parse(r#"{"request_id": {"b":2, "a":1},"action":"echo","x":[1, 2]}"#).unwrap();
        let env = Envelope {
            errors: &[],
            data: &f.fields_object(),
            action: f.action_str(),
            response_status: axum::http::StatusCode::OK,
            request_id: f.request_id(),
        };
        assert_eq!(
            env.to_json().unwrap(),
            r#"{"errors":[],"data":{"x":[1, 2]},"action":"echo","response_status":200,"request_id":{"b":2, "a":1}}"#
        );
    }
}
