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
//! - [`consumer`](mod@consumer): [`Consumer`] hooks, [`Ctx`], [`Reply`], and the action table;
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

/// Turns an `impl` block into a consumer's action table.
///
/// Each method marked `#[action]` becomes an action named after the method (or
/// `#[action(name = "...")]`). Parameters after the receiver, in any order and all optional:
/// - `ctx: &Ctx` — the connection context;
/// - one argument type `T: serde::de::DeserializeOwned` — built from the message's fields
///   (missing or mistyped fields answer 400 naming the field);
/// - `frame: &Frame<'_>` — the raw message, for actions that read fields themselves.
///
/// It returns `Result<Reply<T>, E>` (or `Result<(), E>` to send nothing), `E: Into<ApiError>`.
///
/// Three kinds of action:
/// - `#[action] async fn f(&mut self, ...)`: runs on the connection, one at a time, in
///   arrival order, with access to the consumer's state;
/// - `#[action(detached)] async fn f(ctx: Ctx, ...)`: runs concurrently, replies when done,
///   cancelled when the socket closes;
/// - `#[action(blocking)] fn f(ctx: &Ctx, ...)`: blocking code, run on tokio's blocking pool
///   (the connection waits for it, keeping the order).
///
/// `#[dcrf::consumer(model)]` adds the model actions of a
/// [`ModelConsumer`](crate::model::ModelConsumer) after yours.
///
/// ```
/// use dcrf::prelude::*;
/// use serde::Deserialize;
///
/// #[derive(Default)]
/// struct Jobs;
///
/// #[derive(Deserialize)]
/// struct Wait { seconds: u64 }
///
/// #[dcrf::consumer]
/// impl Jobs {
///     #[action(detached)]
///     async fn wait(ctx: Ctx, args: Wait) -> Result<Reply<u64>, ApiError> {
///         tokio::time::sleep(std::time::Duration::from_secs(args.seconds)).await;
///         Ok(Reply::ok(args.seconds))
///     }
///
///     #[action(blocking, name = "checksum")]
///     fn checksum_blocking(frame_len: Wait) -> Result<Reply<u64>, ApiError> {
///         Ok(Reply::ok(frame_len.seconds * 31))
///     }
/// }
/// impl Consumer for Jobs {}
/// ```
pub use dcrf_macros::consumer;

/// Everything a consumer module usually needs.
pub mod prelude {
    pub use crate::consumer::{Consumer, Ctx, Reply};
    pub use crate::error::ApiError;
    pub use crate::permission::{
        AllowAny, DenyAnonymous, IsAuthenticated, Permission, Permissions,
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
    pub use crate::model::{dispatch_model, handle_instance_event, register_observers};
}

/// The README's examples, compiled as doctests.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
pub struct ReadmeDoctests;
