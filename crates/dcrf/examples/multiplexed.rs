//! Several consumers on one socket, as the `dcrf-client` JS client speaks: each frame is
//! `{"stream": "<name>", "payload": <a DCRF request>}` and each answer comes back wrapped the
//! same way.
//!
//! ```sh
//! cargo run -p dcrf --example multiplexed -- 127.0.0.1:8000 sqlite::memory:
//! ```
//!
//! On `ws://127.0.0.1:8000/ws`:
//! `{"stream": "echo", "payload": {"action": "echo", "text": "hi", "request_id": 1}}` →
//! `{"stream": "echo", "payload": {"errors": [], "data": "hi", "action": "echo", "response_status": 200, "request_id": 1}}`;
//! `{"stream": "books", "payload": {"action": "list", "request_id": 2}}` lists the books.

use dcrf::model::{Db, ModelActions, ModelConsumer};
use dcrf::multiplex::Demultiplexer;
use dcrf::prelude::*;
use dcrf::sea_orm::{self, entity::prelude::*};
use serde::Deserialize;

/// The `book` table of `books.rs`.
mod book {
    use dcrf::sea_orm::{self, entity::prelude::*};
    use serde::{Deserialize, Serialize};

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel, Serialize, Deserialize)]
    #[sea_orm(table_name = "book")]
    pub struct Model {
        #[sea_orm(primary_key)]
        pub id: i32,
        pub title: String,
        pub author: String,
        pub year: i32,
        pub format: String,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// What clients may write (see `books.rs` for DRF's validators).
#[derive(Deserialize, garde::Validate, DeriveIntoActiveModel)]
#[sea_orm(active_model = "book::ActiveModel")]
struct BookInput {
    #[garde(length(chars, min = 1, max = 200))]
    title: String,
    #[garde(length(chars, min = 1, max = 100))]
    author: String,
    #[garde(range(min = 1450, max = 2100))]
    year: i32,
    #[garde(length(min = 1))]
    format: String,
}

/// The `books` stream: the model actions and instance subscriptions (what `dcrf-client`'s
/// `subscribe` sends).
#[derive(Clone)]
struct Books {
    db: Db,
}

impl ModelConsumer for Books {
    type Entity = book::Entity;
    type Output = book::Model;
    type Input = BookInput;
    fn db(&self) -> &Db {
        &self.db
    }
    fn actions(&self) -> ModelActions {
        ModelActions::ALL | ModelActions::SUBSCRIBE_INSTANCE
    }
}

#[dcrf::consumer(model)]
impl Consumer for Books {}

/// The `echo` stream.
#[derive(Default)]
struct Echo;

#[derive(Deserialize)]
struct Text {
    text: String,
}

#[dcrf::consumer]
impl Consumer for Echo {
    /// {"action": "echo", "text": "hi", "request_id": 1} → `"data": "hi"`
    #[action]
    async fn echo(&mut self, args: Text) -> Result<Reply<String>, ApiError> {
        Ok(Reply::ok(args.text))
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Logs, server errors included, go to stderr; stdout carries only the "listening on" line.
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    // The address (port 0 picks one), then the database: arguments, else environment variables.
    let mut args = std::env::args().skip(1);
    let addr = args
        .next()
        .or_else(|| std::env::var("DCRF_ADDR").ok())
        .unwrap_or_else(|| "127.0.0.1:8000".to_owned());
    let database = args
        .next()
        .or_else(|| std::env::var("DCRF_DATABASE").ok())
        .unwrap_or_else(|| "sqlite://multiplexed.sqlite3?mode=rwc".to_owned());

    let db = Db::connect(&database).await?;
    db.create_table(book::Entity).await?;

    // Each socket gets its own consumer per stream (from the factory); all streams of a socket
    // share its user. A consumer can be mounted on its own route and in a demultiplexer.
    let app = Dcrf::new();
    let books = Books { db };
    let mux = Demultiplexer::new(&app)
        .stream("books", move || books.clone())
        .stream("echo", Echo::default);
    let router = axum::Router::new()
        .route("/ws", mux.route())
        .route("/ws/echo/", app.consumer(Echo::default));

    let listener = tokio::net::TcpListener::bind(&addr).await?;
    println!("listening on {}", listener.local_addr()?);
    dcrf::serve(listener, router, &app, async {
        let _ = tokio::signal::ctrl_c().await;
    })
    .await?;
    Ok(())
}
