//! The demo's HTTP API, served both as plain HTTP under `/api/` and over the socket at
//! `/ws/api/` (DCRF's `view_as_consumer`).

use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Json, Router};
use dcrf::model::Db;
use dcrf::prelude::*;
use dcrf::view::ViewConsumer;
use sea_orm::{ColumnTrait, EntityTrait, QueryFilter, QueryOrder, QuerySelect};
use serde::Deserialize;
use serde_json::json;

use crate::todos::{TodoInput, todo};

/// `GET /api/todos?done=true&owner=ada&limit=50&offset=100` (every parameter optional).
#[derive(Debug, Deserialize)]
struct Filters {
    done: Option<bool>,
    owner: Option<String>,
    limit: Option<u64>,
    offset: Option<u64>,
}

/// The most bytes of rows one `GET /api/todos` answers with (the socket's reply cap).
const MAX_LIST_BYTES: usize = dcrf::server::DEFAULT_MAX_REPLY_SIZE;

/// A JSON array of the rows, read one by one: over [`MAX_LIST_BYTES`] the query stops and the
/// answer is 413, so a request over large rows costs at most that much memory.
async fn list(State(db): State<Db>, Query(f): Query<Filters>) -> Response {
    use futures_util::TryStreamExt;
    let mut query = todo::Entity::find().order_by_asc(todo::Column::Id);
    if let Some(done) = f.done {
        query = query.filter(todo::Column::Done.eq(done));
    }
    if let Some(owner) = f.owner {
        query = query.filter(todo::Column::Owner.eq(owner));
    }
    if let Some(limit) = f.limit {
        query = query.limit(limit);
    }
    if let Some(offset) = f.offset {
        query = query.offset(offset);
    }
    let rows = async {
        let mut rows = query.stream(db.conn()).await?;
        let mut body = String::from("[");
        while let Some(row) = rows.try_next().await? {
            if body.len() > 1 {
                body.push(',');
            }
            body.push_str(
                &serde_json::to_string(&row).map_err(|e| sea_orm::DbErr::Custom(e.to_string()))?,
            );
            if body.len() > MAX_LIST_BYTES {
                return Ok(None);
            }
        }
        body.push(']');
        Ok::<_, sea_orm::DbErr>(Some(body))
    }
    .await;
    match rows {
        Ok(Some(body)) => ([(header::CONTENT_TYPE, "application/json")], body).into_response(),
        Ok(None) => (
            StatusCode::PAYLOAD_TOO_LARGE,
            Json(json!({"detail": format!(
                "The response is too large (over {MAX_LIST_BYTES} bytes). Ask for less data with limit and offset, or filters."
            )})),
        )
            .into_response(),
        Err(e) => server_error(e),
    }
}

async fn retrieve(State(db): State<Db>, Path(id): Path<i32>) -> Response {
    match todo::Entity::find_by_id(id).one(db.conn()).await {
        Ok(Some(row)) => Json(row).into_response(),
        Ok(None) => (StatusCode::NOT_FOUND, Json(json!({"detail": "Not found."}))).into_response(),
        Err(e) => server_error(e),
    }
}

/// Creates through the framework's transaction, so subscribers see it.
async fn create(State(db): State<Db>, Json(body): Json<serde_json::Value>) -> Response {
    let input: TodoInput = match dcrf::model::parse_input(&body.to_string(), None) {
        Ok(input) => input,
        Err(e) => {
            return (StatusCode::UNPROCESSABLE_ENTITY, Json(e.errors().to_vec())).into_response();
        }
    };
    let result = async {
        let mut txn = db.begin().await?;
        let row = txn
            .insert(sea_orm::IntoActiveModel::<todo::ActiveModel>::into_active_model(input))
            .await?;
        txn.commit().await?;
        Ok::<_, dcrf::Error>(row)
    }
    .await;
    match result {
        Ok(row) => (StatusCode::CREATED, Json(row)).into_response(),
        Err(e) => server_error(e),
    }
}

/// The socket's user when called over the socket; null over plain HTTP.
async fn whoami(user: Option<Extension<User>>) -> Json<Option<User>> {
    Json(user.map(|Extension(u)| u))
}

fn server_error(e: impl std::fmt::Display) -> Response {
    tracing::error!(error = %e, "api error");
    (
        StatusCode::INTERNAL_SERVER_ERROR,
        Json(json!({"detail": "A server error occurred."})),
    )
        .into_response()
}

/// The HTTP routes (`/api/todos`, `/api/todos/{id}`, `/api/whoami`).
pub fn router(db: Db) -> Router {
    Router::new()
        .route("/api/todos", get(list).post(create))
        .route("/api/todos/{id}", get(retrieve))
        .route("/api/whoami", get(whoami))
        .with_state(db)
}

/// The same routes as socket actions: `list`, `create`, `retrieve` (`parameters: {"id": ..}`)
/// and `whoami`.
pub fn consumer(db: Db) -> ViewConsumer {
    ViewConsumer::new(router(db))
        .action("list", axum::http::Method::GET, "/api/todos")
        .action("create", axum::http::Method::POST, "/api/todos")
        .action("retrieve", axum::http::Method::GET, "/api/todos/{id}")
        .action("whoami", axum::http::Method::GET, "/api/whoami")
}
