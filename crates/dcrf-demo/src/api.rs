//! The demo's HTTP API, served both as plain HTTP under `/api/` and over the socket at
//! `/ws/api/` (DCRF's `view_as_consumer`).

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Json, Router};
use dcrf::model::Db;
use dcrf::prelude::*;
use dcrf::view::ViewConsumer;
use sea_orm::{ColumnTrait, EntityTrait, QueryFilter, QueryOrder};
use serde::Deserialize;
use serde_json::json;

use crate::todos::{TodoInput, todo};

/// `GET /api/todos?done=true&owner=ada`.
#[derive(Debug, Deserialize)]
struct Filters {
    done: Option<bool>,
    owner: Option<String>,
}

async fn list(State(db): State<Db>, Query(f): Query<Filters>) -> Response {
    let mut query = todo::Entity::find().order_by_asc(todo::Column::Id);
    if let Some(done) = f.done {
        query = query.filter(todo::Column::Done.eq(done));
    }
    if let Some(owner) = f.owner {
        query = query.filter(todo::Column::Owner.eq(owner));
    }
    match query.all(db.conn()).await {
        Ok(rows) => Json(rows).into_response(),
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
