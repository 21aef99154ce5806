//! Action parameters: [`FromFrame`], how each parameter of an `#[action]` is built.
//!
//! The [`#[dcrf::consumer]`](macro@crate::consumer) attribute builds every parameter of an
//! action (after the receiver), in order, with `FromFrame`: the parameter's type decides, not
//! its name or spelling (a type alias is the type it names).
//!
//! | parameter | what it is |
//! |---|---|
//! | `&Ctx` | the connection's context |
//! | `Ctx` | an owned clone of it |
//! | `&Frame<'_>` | the raw message |
//! | any `T: serde::de::DeserializeOwned` | the message's fields, deserialized (a missing or mistyped field answers 400 naming it); several such structs each read the fields they name |
//! | your own type | whatever your `impl FromFrame` builds |
//!
//! A failed extraction answers the action's request with the extractor's [`ApiError`] and the
//! action does not run.
//!
//! Detached and blocking actions run after the frame is handled: their parameters are built
//! before they start and must be owned, that is `Send` and built the same for every lifetime
//! of the connection and the frame (`Ctx`, a fields struct, an extractor that owns its data; not
//! `&Ctx`, `&Frame` or a type borrowing from them).

use serde::de::DeserializeOwned;

use crate::consumer::Ctx;
use crate::error::ApiError;
use crate::protocol::Frame;

/// Builds one action parameter from the connection and the inbound frame (axum's
/// `FromRequestParts`, for DCRF frames).
///
/// `M` only tells the blanket implementations apart; implement `FromFrame<'a>` (the default
/// `M`) for your own types. A type that borrows from the frame (`impl<'a> FromFrame<'a> for
/// Field<'a>`) serves normal actions only; an owned one serves all three kinds:
///
/// ```
/// use dcrf::extract::FromFrame;
/// use dcrf::prelude::*;
///
/// /// The signed-in user, or 403 before the action runs.
/// struct SignedIn(User);
///
/// impl<'a> FromFrame<'a> for SignedIn {
///     fn from_frame(ctx: &'a Ctx, _frame: &'a Frame<'a>) -> Result<Self, ApiError> {
///         ctx.user().cloned().map(SignedIn).ok_or_else(ApiError::permission_denied)
///     }
/// }
///
/// /// The request id as written, borrowed from the frame: for normal actions.
/// struct RequestIdText<'a>(&'a str);
///
/// impl<'a> FromFrame<'a> for RequestIdText<'a> {
///     fn from_frame(_ctx: &'a Ctx, frame: &'a Frame<'a>) -> Result<Self, ApiError> {
///         let rid = frame.request_id().ok_or_else(|| ApiError::bad_request("No request_id."))?;
///         Ok(RequestIdText(rid.get()))
///     }
/// }
///
/// struct Account;
///
/// #[dcrf::consumer]
/// impl Consumer for Account {
///     #[action]
///     async fn whoami<'f>(
///         &mut self,
///         user: SignedIn,
///         rid: RequestIdText<'f>,
///     ) -> Result<Reply<String>, ApiError> {
///         Ok(Reply::ok(format!("{} (request {})", user.0.username, rid.0)))
///     }
///
///     #[action(detached)]
///     async fn later(user: SignedIn) -> Result<Reply<String>, ApiError> {
///         Ok(Reply::ok(user.0.username))
///     }
/// }
/// ```
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot be an action parameter",
    label = "not built by `FromFrame`",
    note = "action parameters are `&Ctx`, `Ctx`, `&Frame<'_>`, a `serde::Deserialize` struct of the message's fields, or a type that implements `dcrf::extract::FromFrame`"
)]
pub trait FromFrame<'a, M = Extractor>: Sized {
    /// Builds the parameter; an error answers the request and the action does not run.
    fn from_frame(ctx: &'a Ctx, frame: &'a Frame<'a>) -> Result<Self, ApiError>;
}

/// The `M` of [`FromFrame`] for types that implement it directly.
#[derive(Debug)]
pub enum Extractor {}

/// The `M` of [`FromFrame`] for the message's fields, deserialized.
#[derive(Debug)]
pub enum Fields {}

impl<'a> FromFrame<'a> for &'a Ctx {
    fn from_frame(ctx: &'a Ctx, _frame: &'a Frame<'a>) -> Result<Self, ApiError> {
        Ok(ctx)
    }
}

impl<'a> FromFrame<'a> for Ctx {
    fn from_frame(ctx: &'a Ctx, _frame: &'a Frame<'a>) -> Result<Self, ApiError> {
        Ok(ctx.clone())
    }
}

impl<'a> FromFrame<'a> for &'a Frame<'a> {
    fn from_frame(_ctx: &'a Ctx, frame: &'a Frame<'a>) -> Result<Self, ApiError> {
        Ok(frame)
    }
}

// Not suggested in errors: a type that is not a parameter gets `FromFrame`'s own message
// rather than "`Deserialize` is not implemented".
#[diagnostic::do_not_recommend]
impl<'a, T: DeserializeOwned> FromFrame<'a, Fields> for T {
    fn from_frame(_ctx: &'a Ctx, frame: &'a Frame<'a>) -> Result<Self, ApiError> {
        frame.args::<T>()
    }
}
