//! A filtered live subscription: each client follows the books of the authors it names.
//! The walk-through is `docs/filtered-subscriptions.md`.
//!
//! ```sh
//! cargo run -p dcrf --example live_books -- 127.0.0.1:8000 sqlite::memory:
//! ```
//!
//! On `ws://127.0.0.1:8000/ws/books/`, send
//! `{"action": "subscribe_author", "author": "Ursula K. Le Guin", "request_id": "le-guin"}`, then
//! create one of her books from another connection: the first receives `"action": "create"`,
//! the book as `data`, and `"request_id": "le-guin"`.

use std::sync::Arc;

use dcrf::model::{Db, ModelConsumer};
use dcrf::observer::ModelObserver;
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

/// The model actions, plus `subscribe_author` / `unsubscribe_author`. The observer is built
/// once at start-up and shared (an `Arc`) by every connection's consumer.
#[derive(Clone)]
struct LiveBooks {
    db: Db,
    by_author: Arc<ModelObserver<book::Model>>,
}

impl ModelConsumer for LiveBooks {
    type Entity = book::Entity;
    type Output = book::Model;
    type Input = BookInput;
    fn db(&self) -> &Db {
        &self.db
    }
}

/// `{"author": "..."}`, the key of the group to join or leave.
#[derive(Deserialize)]
struct Author {
    author: String,
}

#[dcrf::consumer(model)]
impl Consumer for LiveBooks {
    /// Joins the group of `author`; its pushes carry this message's `request_id`. Replies 201.
    /// `read`: it changes nothing, so `IsAuthenticatedOrReadOnly` would let anonymous clients in.
    #[action(read)]
    async fn subscribe_author(
        &mut self,
        ctx: &Ctx,
        frame: &Frame<'_>,
        args: Author,
    ) -> Result<Reply<()>, ApiError> {
        // 403 if this connection's permissions would refuse every push of the group.
        self.by_author
            .subscribe(ctx, &args.author, frame.request_id())
            .await?;
        Ok(Reply::with_status((), dcrf::StatusCode::CREATED))
    }

    /// Leaves the group of `author` for this message's `request_id`: send the id you
    /// subscribed with. Another id removes nothing (pushes go on under the old one), and the
    /// reply is 204 either way. Without a `request_id`, every id of the group goes.
    #[action(read)]
    async fn unsubscribe_author(
        &mut self,
        ctx: &Ctx,
        frame: &Frame<'_>,
        args: Author,
    ) -> Result<Reply<()>, ApiError> {
        self.by_author
            .unsubscribe(ctx, &args.author, frame.request_id());
        Ok(Reply::no_content())
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
        .unwrap_or_else(|| "sqlite://live-books.sqlite3?mode=rwc".to_owned());

    // Every write the model actions make is published after commit to this database's
    // observers (through an in-memory channel layer; `Db::connect_with_layer` for Redis).
    let db = Db::connect(&database).await?;
    db.create_table(book::Entity).await?;

    // The observer: its id names its groups ("books.by-author:<author>"); `group_by` puts each
    // book in its author's group; `serialize` makes the body, once per change. For a delete it
    // gets the book as it was.
    let by_author = db
        .observe::<book::Entity>("books.by-author")
        .group_by(|b: &book::Model| vec![b.author.clone()])
        .serialize(|b: &book::Model, _kind| b.clone());

    let app = Dcrf::new();
    let books = LiveBooks { db, by_author };
    let router = axum::Router::new().route("/ws/books/", app.consumer(move || books.clone()));
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    println!("listening on {}", listener.local_addr()?);
    dcrf::serve(listener, router, &app, async {
        let _ = tokio::signal::ctrl_c().await;
    })
    .await?;
    Ok(())
}
