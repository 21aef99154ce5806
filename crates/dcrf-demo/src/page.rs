//! The live todo page at `/`: a static HTML page and its script, built from
//! `clients/typescript/demo/page.ts` with the TypeScript client and checked in under
//! `crates/dcrf-demo/static/` (`npm run build:page` in `clients/typescript` rebuilds it; CI
//! checks that the checked-in bundle matches its sources). Nothing is built at run time.

use axum::Router;
use axum::http::header;
use axum::response::{Html, IntoResponse};
use axum::routing::get;

/// The page: markup and styles; it loads [`SCRIPT`] from [`SCRIPT_PATH`].
pub const INDEX: &str = include_str!("../static/index.html");

/// The page's script: the TypeScript client and the page, bundled into one ES module.
pub const SCRIPT: &str = include_str!("../static/todo-page.js");

/// Where the page loads its script from.
pub const SCRIPT_PATH: &str = "/todo-page.js";

async fn index() -> impl IntoResponse {
    ([(header::CACHE_CONTROL, "no-cache")], Html(INDEX))
}

async fn script() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        SCRIPT,
    )
}

/// `GET /` (the page) and `GET /todo-page.js` (its script).
pub fn router() -> Router {
    Router::new()
        .route("/", get(index))
        .route(SCRIPT_PATH, get(script))
}
