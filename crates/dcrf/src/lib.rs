//! # dcrf — Django Channels REST Framework, in Rust
//!
//! DRF-style APIs over WebSockets, speaking the JSON protocol of Python's
//! `djangochannelsrestframework` (DCRF), so existing DCRF clients work unchanged.
//!
//! A consumer is a type with `async fn` actions; mount it on an axum router:
//!
//! ```no_run
//! use dcrf::prelude::*;
//! use serde::Deserialize;
//!
//! #[derive(Default)]
//! struct Greeter;
//!
//! #[derive(Deserialize)]
//! struct Greet { name: String }
//!
//! #[dcrf::consumer]
//! impl Greeter {
//!     /// → `{"action": "greet", "name": "Ada", "request_id": 1}`
//!     /// ← `{"errors": [], "data": "Hello, Ada!", "action": "greet", "response_status": 200, "request_id": 1}`
//!     #[action]
//!     async fn greet(&mut self, args: Greet) -> Result<Reply<String>, ApiError> {
//!         Ok(Reply::ok(format!("Hello, {}!", args.name)))
//!     }
//! }
//!
//! impl Consumer for Greeter {}
//!
//! #[tokio::main]
//! async fn main() -> Result<(), dcrf::Error> {
//!     let app = Dcrf::new();
//!     let router = axum::Router::new().route("/ws/greeter/", app.consumer(Greeter::default));
//!     let listener = tokio::net::TcpListener::bind("127.0.0.1:8000").await?;
//!     dcrf::serve(listener, router, &app, async { let _ = tokio::signal::ctrl_c().await; }).await
//! }
//! ```
//!
//! The pieces, each in its module:
//! - [`protocol`]: the frame and the reply envelope;
//! - [`consumer`](mod@consumer): [`Consumer`] hooks, [`Ctx`], [`Reply`], subscription events;
//! - [`permission`]: [`Permission`](permission::Permission) and its `&`, `|`, `!`;
//! - [`auth`]: token and JWT authentication at the handshake;
//! - [`server`]: application settings ([`Dcrf`]), mounting, the connection task, shutdown;
//! - [`error`]: [`ApiError`] (what actions answer) and [`Error`] (the framework's failures);
//! - [`extract`]: [`FromFrame`](extract::FromFrame), how action parameters are built;
//! - [`multiplex`] and [`view`]: several consumers on one socket; axum routes as actions;
//! - [`change`]: the change record the write path publishes;
//! - [`channel`]: the channel layer (local hub + broker: memory, Redis);
//! - [`observer`]: observers, model observers and their registry;
//! - `model` (feature `model`): model consumers, the database and its transactions;
//! - `capture` (feature `capture`): observing writes the framework did not make;
//! - `testing` (feature `testing`): a test server and client.
//!
//! ## Features
//!
//! | feature | default | what it adds |
//! |---|---|---|
//! | `sqlite` | yes | model consumers on SQLite (implies `model`; builds the bundled SQLite) |
//! | `jwt` | yes | `auth::JwtAuth` |
//! | `model` | via `sqlite` | `dcrf::model` (sea-orm, garde) |
//! | `postgres` | no | model consumers on PostgreSQL (implies `model`) |
//! | `redis` | no | `channel::RedisBroker`, for several nodes |
//! | `capture` | no | `dcrf::capture` |
//! | `testing` | no | `dcrf::testing` |
//!
//! `default-features = false` leaves the consumer core: the protocol, consumers, permissions,
//! token authentication, serving, multiplexing, observers and the in-memory channel layer,
//! without sea-orm, sqlx or any C code.

#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod auth;
#[cfg(feature = "capture")]
#[cfg_attr(docsrs, doc(cfg(feature = "capture")))]
pub mod capture;
pub mod change;
pub mod channel;
pub mod consumer;
pub mod error;
pub mod extract;
mod guard;
mod listener;
pub mod metrics;
#[cfg(feature = "model")]
#[cfg_attr(docsrs, doc(cfg(feature = "model")))]
pub mod model;
pub mod multiplex;
pub mod observer;
pub mod permission;
pub mod protocol;
pub mod scope;
pub mod server;
mod sync;
#[cfg(feature = "testing")]
#[cfg_attr(docsrs, doc(cfg(feature = "testing")))]
pub mod testing;
pub mod view;
mod wake_gate;

// Lets `#[dcrf::consumer]` expand inside this crate too.
extern crate self as dcrf;

pub use consumer::{Closed, Consumer, Ctx, Reply};
pub use error::{ApiError, Error};
pub use protocol::Frame;
pub use scope::{Scope, User};
pub use server::{Dcrf, serve};

pub use axum::http::StatusCode;
/// The garde version dcrf validates with (`garde::Validate` on a model consumer's `Input`).
#[cfg(feature = "model")]
#[cfg_attr(docsrs, doc(cfg(feature = "model")))]
pub use garde;
/// The sea-orm version dcrf's model consumers are built on.
#[cfg(feature = "model")]
#[cfg_attr(docsrs, doc(cfg(feature = "model")))]
pub use sea_orm;
pub use serde;
pub use serde_json;

/// Turns an `impl` block into a consumer: its `#[action]` methods become the consumer's actions.
///
/// # Two forms
///
/// One block, `impl Consumer for T`, holding the actions and the [`Consumer`] hooks
/// (`permissions`, `connect`, `on_event`, `disconnect`) together; the attribute moves the actions
/// to an inherent `impl T` and leaves the hooks in `impl Consumer for T`. The trait may be written
/// `Consumer`, `dcrf::Consumer` or `dcrf::consumer::Consumer`; generics and where clauses carry
/// over:
///
/// ```
/// use dcrf::prelude::*;
/// use serde::Deserialize;
///
/// #[derive(Default)]
/// struct Greeter { greeted: u32 }
///
/// #[derive(Deserialize)]
/// struct Greet { name: String }
///
/// #[dcrf::consumer]
/// impl Consumer for Greeter {
///     fn permissions(&self) -> Option<Permissions> {
///         Some(Permissions::new(IsAuthenticated))
///     }
///
///     /// → `{"action": "greet", "name": "Ada", "request_id": 1}`
///     /// ← `{"errors": [], "data": "Hello, Ada! (#1)", "action": "greet", "response_status": 200, "request_id": 1}`
///     #[action]
///     async fn greet(&mut self, args: Greet) -> Result<Reply<String>, ApiError> {
///         self.greeted += 1;
///         Ok(Reply::ok(format!("Hello, {}! (#{})", args.name, self.greeted)))
///     }
/// }
/// ```
///
/// Or two blocks, as before: `#[dcrf::consumer] impl T { ... }` with the actions, and a plain
/// `impl Consumer for T { ... }` (possibly empty) with the hooks.
///
/// # Actions
///
/// Each method marked `#[action]` is an action named after the method, or
/// `#[action(name = "...")]`. It returns `Result<Reply<T>, E>` (or `Result<(), E>` to send
/// nothing) with `E: Into<ApiError>`. There are three kinds:
///
/// | kind | written | runs |
/// |---|---|---|
/// | normal | `#[action] async fn f(&mut self, ...)` (or `&self`) | on the connection, one at a time, in arrival order, with the consumer's state |
/// | detached | `#[action(detached)] async fn f(...)`, no receiver | concurrently ([`Ctx::spawn_action`]); replies when done; cancelled when the socket closes |
/// | blocking | `#[action(blocking)] fn f(...)`, no receiver, not `async` | on tokio's blocking pool ([`Ctx::run_blocking`]); the connection waits for it, keeping the order |
///
/// # Parameters
///
/// Every parameter after the receiver is built, in order, by
/// [`FromFrame`](extract::FromFrame): its type decides what it is, not its name or spelling (a
/// type alias is the type it names). The first that fails answers the request with its
/// [`ApiError`] and the action does not run.
///
/// | parameter | what it is |
/// |---|---|
/// | `&Ctx` | the connection's context |
/// | `Ctx` | an owned clone of it |
/// | `&Frame<'_>` | the raw message |
/// | `T: serde::de::DeserializeOwned` | the message's fields, deserialized; a missing or mistyped field answers 400 naming it. Several such structs may each read the fields they name |
/// | your type | whatever its [`FromFrame`](extract::FromFrame) implementation builds, or its error |
///
/// A detached or blocking action runs after the frame is handled, so its parameters are built
/// before it starts and must be owned: `Send`, and not borrowed from the connection or the
/// frame (`Ctx`, not `&Ctx`; no `&Frame`). A borrowed parameter fails to compile, with the
/// error at its type.
///
/// ```
/// use dcrf::extract::FromFrame;
/// use dcrf::prelude::*;
/// use serde::Deserialize;
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
/// #[derive(Deserialize)]
/// struct Wait { seconds: u64 }
///
/// #[derive(Deserialize)]
/// struct Text { text: String }
///
/// struct Jobs;
///
/// #[dcrf::consumer]
/// impl Consumer for Jobs {
///     /// Reads `"text"` and the raw frame; only for signed-in users.
///     #[action]
///     async fn echo(
///         &mut self,
///         user: SignedIn,
///         args: Text,
///         frame: &Frame<'_>,
///     ) -> Result<Reply<String>, ApiError> {
///         let fields = frame.fields().len();
///         Ok(Reply::ok(format!("{}: {} ({fields} fields)", user.0.username, args.text)))
///     }
///
///     /// Concurrent: other frames are handled while it sleeps.
///     #[action(detached)]
///     async fn wait(ctx: Ctx, user: SignedIn, args: Wait) -> Result<Reply<u64>, ApiError> {
///         tokio::time::sleep(std::time::Duration::from_secs(args.seconds)).await;
///         let _ = (ctx.connection_id(), user.0.id);
///         Ok(Reply::ok(args.seconds))
///     }
///
///     /// Blocking code, with two argument structs.
///     #[action(blocking, name = "checksum")]
///     fn checksum_blocking(args: Wait, text: Text) -> Result<Reply<u64>, ApiError> {
///         Ok(Reply::ok(args.seconds * 31 + text.text.len() as u64))
///     }
/// }
/// ```
///
/// # Model consumers
///
/// `#[dcrf::consumer(model)]` adds the model actions of a
/// [`ModelConsumer`](crate::model::ModelConsumer) (`list`, `retrieve`, `create`, ...) after
/// yours, so one block makes a complete model consumer:
///
/// ```
/// # use dcrf::model::{Db, ModelConsumer};
/// # use dcrf::prelude::*;
/// # use sea_orm::entity::prelude::*;
/// # use serde::Deserialize;
/// # mod todo {
/// #     use sea_orm::entity::prelude::*;
/// #     #[derive(Clone, Debug, PartialEq, DeriveEntityModel, serde::Serialize, serde::Deserialize)]
/// #     #[sea_orm(table_name = "todo")]
/// #     pub struct Model {
/// #         #[sea_orm(primary_key)]
/// #         pub id: i32,
/// #         pub title: String,
/// #     }
/// #     #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
/// #     pub enum Relation {}
/// #     impl ActiveModelBehavior for ActiveModel {}
/// # }
/// # #[derive(Deserialize, garde::Validate, DeriveIntoActiveModel)]
/// # #[sea_orm(active_model = "todo::ActiveModel")]
/// # struct TodoInput {
/// #     #[garde(length(min = 1))]
/// #     title: String,
/// # }
/// struct Todos { db: Db }
///
/// impl ModelConsumer for Todos {
///     type Entity = todo::Entity;
///     type Output = todo::Model;
///     type Input = TodoInput;
///     fn db(&self) -> &Db { &self.db }
/// }
///
/// #[dcrf::consumer(model)]
/// impl Consumer for Todos {}
/// ```
///
/// # Compile errors
///
/// The attribute rejects, at the offending code: an unknown option (only `model`), an impl of
/// another trait, two actions with one name, an unknown `#[action(...)]` option, a normal action
/// that is not `async` or takes no `&self`/`&mut self`, a detached or blocking action with a
/// receiver, a detached action that is not `async`, a blocking action that is. The compiler
/// rejects a parameter type that is not built by `FromFrame`, and a borrowed parameter of a
/// detached or blocking action.
pub use dcrf_macros::consumer;

/// Everything a consumer module usually needs.
pub mod prelude {
    pub use crate::consumer::{Consumer, Ctx, Reply};
    pub use crate::error::ApiError;
    pub use crate::permission::{
        AllowAny, DenyAnonymous, IsAuthenticated, IsAuthenticatedOrReadOnly, Permission,
        Permissions,
    };
    pub use crate::protocol::Frame;
    pub use crate::scope::{Scope, User};
    pub use crate::server::Dcrf;
}

/// What `#[dcrf::consumer]` expands to; not part of the public API.
#[doc(hidden)]
pub mod __private {
    pub use crate::consumer::Event;
    pub use crate::consumer::{ActionTable, Dispatched, IntoActionResult};
    pub use crate::extract::FromFrame;
    #[cfg(feature = "model")]
    pub use crate::model::{
        dispatch_model, handle_instance_event, model_action_reads, register_observers,
    };
}

/// The README's examples, compiled as doctests.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
pub struct ReadmeDoctests;
