//! DRF's validation messages for garde's rules, and the DRF validators garde has no rule for.
//!
//! Every model consumer's input is validated with [`DrfMessages`], so garde's own rules answer
//! with Django REST Framework's texts, the ones a DCRF front end already shows:
//!
//! | garde rule | message |
//! |---|---|
//! | `length(min = 1)` on a string | `This field may not be blank.` |
//! | `length(min = n)` | `Ensure this field has at least n characters.` |
//! | `length(max = n)` | `Ensure this field has no more than n characters.` |
//! | `range(min = n)` | `Ensure this value is greater than or equal to n.` |
//! | `range(max = n)` | `Ensure this value is less than or equal to n.` |
//! | `email` (garde's `email` feature) | `Enter a valid email address.` |
//! | `url` (garde's `url` feature) | `Enter a valid URL.` |
//! | `pattern(...)` (garde's `regex` feature) | `This value does not match the required pattern.` |
//! | `ip` | `Enter a valid IPv4 or IPv6 address.` |
//! | `required` (an `Option` that must be set) | `This field is required.` |
//! | [`not_blank`] (`#[garde(custom(not_blank))]`, trims first, as DRF) | `This field may not be blank.` |
//! | [`choices`] (`#[garde(custom(choices(&[...])))]`) | `"x" is not a valid choice.` |
//!
//! Type mismatches are answered before validation, in DRF's words too: `A valid integer is
//! required.`, `A valid number is required.`, `Must be a valid boolean.`, `Not a valid
//! string.`, `This field may not be null.`, `Expected a list of items but got type "str".`,
//! and a missing field is `This field is required.`
//!
//! ```
//! use dcrf::model::validators::choices;
//!
//! #[derive(Debug, serde::Deserialize, garde::Validate)]
//! struct BookInput {
//!     #[garde(length(min = 1, max = 200))]
//!     title: String,
//!     #[garde(range(min = 1450, max = 2100))]
//!     year: i32,
//!     #[garde(custom(choices(&["paper", "ebook"])))]
//!     format: String,
//! }
//!
//! let err = dcrf::model::parse_input::<BookInput>(
//!     r#"{"title": "", "year": 1200, "format": "scroll"}"#,
//!     None,
//! )
//! .unwrap_err();
//! assert_eq!(
//!     serde_json::json!(err.errors()),
//!     serde_json::json!([{
//!         "title": ["This field may not be blank."],
//!         "year": ["Ensure this value is greater than or equal to 1450."],
//!         "format": ["\"scroll\" is not a valid choice."],
//!     }])
//! );
//! ```

use std::borrow::Cow;
use std::fmt::Display;

use garde::i18n::{I18n, InvalidCreditCard, InvalidEmail, InvalidPhoneNumber, InvalidUrl, IpKind};

/// garde's rules in Django REST Framework's words (see the [module docs](self)).
#[derive(Debug, Clone, Copy, Default)]
pub struct DrfMessages;

impl I18n for DrfMessages {
    fn length_lower_than(&self, min: usize) -> Cow<'static, str> {
        if min == 1 {
            // DRF's `allow_blank=False`, the usual reason for a minimum length of one.
            "This field may not be blank.".into()
        } else {
            format!("Ensure this field has at least {min} characters.").into()
        }
    }

    fn length_greater_than(&self, max: usize) -> Cow<'static, str> {
        format!("Ensure this field has no more than {max} characters.").into()
    }

    fn range_lower_than(&self, min: &dyn Display) -> Cow<'static, str> {
        format!("Ensure this value is greater than or equal to {min}.").into()
    }

    fn range_greater_than(&self, max: &dyn Display) -> Cow<'static, str> {
        format!("Ensure this value is less than or equal to {max}.").into()
    }

    fn credit_card_invalid(&self, _reason: InvalidCreditCard) -> Cow<'static, str> {
        "Enter a valid credit card number.".into()
    }

    fn pattern_no_match(&self, _pattern: &dyn Display) -> Cow<'static, str> {
        "This value does not match the required pattern.".into()
    }

    fn contains_missing(&self, pattern: &dyn Display) -> Cow<'static, str> {
        format!("Ensure this value contains \"{pattern}\".").into()
    }

    fn url_invalid(&self, _reason: InvalidUrl) -> Cow<'static, str> {
        "Enter a valid URL.".into()
    }

    fn prefix_missing(&self, pattern: &dyn Display) -> Cow<'static, str> {
        format!("Ensure this value starts with \"{pattern}\".").into()
    }

    fn suffix_missing(&self, pattern: &dyn Display) -> Cow<'static, str> {
        format!("Ensure this value ends with \"{pattern}\".").into()
    }

    fn phone_number_invalid(&self, _reason: InvalidPhoneNumber) -> Cow<'static, str> {
        "Enter a valid phone number.".into()
    }

    fn ip_invalid(&self, kind: IpKind) -> Cow<'static, str> {
        match kind {
            IpKind::V4 => "Enter a valid IPv4 address.".into(),
            IpKind::V6 => "Enter a valid IPv6 address.".into(),
            IpKind::Any => "Enter a valid IPv4 or IPv6 address.".into(),
        }
    }

    fn matches_field_mismatch(&self, field: &dyn Display) -> Cow<'static, str> {
        format!("Ensure this value matches {field}.").into()
    }

    fn email_invalid(&self, _reason: InvalidEmail) -> Cow<'static, str> {
        "Enter a valid email address.".into()
    }

    fn ascii_invalid(&self) -> Cow<'static, str> {
        "Enter a value of ASCII characters only.".into()
    }

    fn alphanumeric_invalid(&self) -> Cow<'static, str> {
        "Enter a value of letters and digits only.".into()
    }

    fn required_not_set(&self) -> Cow<'static, str> {
        "This field is required.".into()
    }
}

/// DRF's `CharField` with `allow_blank=False` (its default): a value that is empty or only
/// whitespace answers `This field may not be blank.` (DRF trims before it checks). Use it as a
/// garde rule: `#[garde(custom(not_blank), length(chars, max = 200))]`.
pub fn not_blank<T>(value: &T, _: &()) -> garde::Result
where
    T: AsRef<str> + ?Sized,
{
    if value.as_ref().trim().is_empty() {
        Err(garde::Error::new("This field may not be blank."))
    } else {
        Ok(())
    }
}

/// DRF's `ChoiceField`: the value must be one of `allowed` (`"x" is not a valid choice.`).
/// Use it as a garde rule: `#[garde(custom(choices(&["a", "b"])))]`.
pub fn choices<T>(allowed: &'static [&'static str]) -> impl FnOnce(&T, &()) -> garde::Result
where
    T: AsRef<str> + ?Sized,
{
    move |value: &T, _: &()| {
        let value = value.as_ref();
        if allowed.contains(&value) {
            Ok(())
        } else {
            Err(garde::Error::new(format!(
                "\"{value}\" is not a valid choice."
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blank_is_empty_after_trimming() {
        assert!(not_blank("a", &()).is_ok());
        for blank in ["", "   ", "\t\n"] {
            assert_eq!(
                not_blank(blank, &()).unwrap_err().message(),
                "This field may not be blank."
            );
        }
    }

    #[test]
    fn choices_names_the_value() {
        assert!(choices::<str>(&["a", "b"])("a", &()).is_ok());
        let err = choices::<str>(&["a", "b"])("c", &()).unwrap_err();
        assert_eq!(err.message(), "\"c\" is not a valid choice.");
    }

    #[test]
    fn lengths_and_ranges() {
        let m = DrfMessages;
        assert_eq!(m.length_lower_than(1), "This field may not be blank.");
        assert_eq!(
            m.length_lower_than(3),
            "Ensure this field has at least 3 characters."
        );
        assert_eq!(
            m.length_greater_than(200),
            "Ensure this field has no more than 200 characters."
        );
        assert_eq!(
            m.range_lower_than(&1450),
            "Ensure this value is greater than or equal to 1450."
        );
        assert_eq!(
            m.range_greater_than(&10),
            "Ensure this value is less than or equal to 10."
        );
    }
}
