//! A model consumer over a `book` table on SQLite: paginated, filtered, ordered, validated
//! with DRF's messages, readable by anyone and writable by signed-in users (JWT).
//!
//! ```sh
//! DCRF_JWT_SECRET=change-me cargo run -p dcrf --example books -- 127.0.0.1:8000 sqlite::memory:
//! ```
//!
//! The second argument (or `DCRF_DATABASE`) is the database, by default the file
//! `books.sqlite3`. On `ws://127.0.0.1:8000/ws/books/`, try
//! `{"action": "list", "filters": {"format": "ebook"}, "ordering": "-year", "request_id": 1}`.

use dcrf::model::validators::{choices, not_blank};
use dcrf::model::{Db, LimitOffset, ModelConsumer};
use dcrf::prelude::*;
// sea-orm's derives expand to `sea_orm::...` paths: the name must be in scope where they are used.
use dcrf::sea_orm::{self, QueryOrder, QuerySelect, entity::prelude::*};
use serde::Deserialize;

/// The table as a sea-orm entity; `book::Model` is one row.
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

/// What clients may write; `id` is read-only because it is not here. A broken rule answers
/// 400 `[{"year": ["Ensure this value is greater than or equal to 1450."]}]`.
#[derive(Deserialize, garde::Validate, DeriveIntoActiveModel)]
#[sea_orm(active_model = "book::ActiveModel")]
struct BookInput {
    #[garde(custom(not_blank), length(chars, max = 200))]
    title: String,
    #[garde(custom(not_blank), length(chars, max = 100))]
    author: String,
    #[garde(range(min = 1450, max = 2100))]
    year: i32,
    #[garde(custom(choices(&["paper", "ebook", "audio"])))]
    format: String,
}

/// One per connection (cloned from the one built at start-up).
#[derive(Clone)]
struct Books {
    db: Db,
}

impl ModelConsumer for Books {
    type Entity = book::Entity; // the table
    type Output = book::Model; // what clients read
    type Input = BookInput; // what clients write
    fn db(&self) -> &Db {
        &self.db
    }
    /// `list` answers `{"count": n, "results": [...], "limit": 20, "offset": 0}`; clients may
    /// send `limit` (up to 100) and `offset`.
    fn pagination(&self) -> Option<LimitOffset> {
        Some(LimitOffset::new(20).max_limit(100))
    }
    /// `"filters": {"author": "...", "format": "ebook"}`; other keys answer 400.
    fn filter_fields(&self) -> &'static [&'static str] {
        &["author", "format", "year"]
    }
    /// `"ordering": "-year"` or `["author", "title"]`.
    fn ordering_fields(&self) -> &'static [&'static str] {
        &["title", "author", "year"]
    }
}

#[dcrf::consumer(model)] // the six model actions, after the custom ones below
impl Consumer for Books {
    /// Anonymous clients may read: `list`, `retrieve` and actions marked `#[action(read)]`.
    /// Everything else needs a signed-in user (403 otherwise).
    fn permissions(&self) -> Option<Permissions> {
        Some(Permissions::new(IsAuthenticatedOrReadOnly))
    }

    /// {"action": "authors", "request_id": 3} → `"data": ["Ursula K. Le Guin", ...]`, sorted.
    #[action(read)]
    async fn authors(&mut self) -> Result<Reply<Vec<String>>, ApiError> {
        let authors: Vec<String> = book::Entity::find()
            .select_only()
            .column(book::Column::Author)
            .distinct()
            .order_by_asc(book::Column::Author)
            .into_tuple()
            .all(self.db.conn())
            .await?; // a database error is a logged 500 reply; the socket stays open
        Ok(Reply::ok(authors))
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
        .unwrap_or_else(|| "sqlite://books.sqlite3?mode=rwc".to_owned());

    // `mode=rwc` creates the file. Real applications create tables with migrations.
    let db = Db::connect(&database).await?;
    db.create_table(book::Entity).await?;
    // The HS256 secret tokens are signed with; without one, a development secret anyone knows.
    let secret = std::env::var("DCRF_JWT_SECRET").unwrap_or_default();
    let auth = if secret.is_empty() {
        tracing::warn!(
            "DCRF_JWT_SECRET is not set: using the built-in DEVELOPMENT secret, which anyone can \
             sign tokens with. Never run like this outside your machine."
        );
        let auth = dcrf::auth::JwtAuth::hs256(b"dcrf-examples-development-secret")?;
        // Your login endpoint would issue tokens; here is one to try (user "ada", one hour).
        tracing::info!(token = %auth.issue("1", "ada", 3600)?, "a development token");
        auth
    } else {
        dcrf::auth::JwtAuth::hs256(secret.as_bytes())?
    };

    let app = Dcrf::new().authenticator(auth);
    let books = Books { db };
    let router = axum::Router::new().route("/ws/books/", app.consumer(move || books.clone()));
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    println!("listening on {}", listener.local_addr()?);
    dcrf::serve(listener, router, &app, async {
        let _ = tokio::signal::ctrl_c().await;
    })
    .await?;
    Ok(())
}
