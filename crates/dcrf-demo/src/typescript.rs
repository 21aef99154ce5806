//! The demo's model and input types as TypeScript declarations, generated from the Rust structs
//! with `ts-rs`, for the TypeScript client and the todo page (`clients/typescript/demo/`).
//!
//! The checked-in file is [`BINDINGS_PATH`]; the `frontend` integration test fails when it
//! differs from [`bindings`], and rewrites it when run with `DCRF_UPDATE_TYPES=1`:
//!
//! ```text
//! DCRF_UPDATE_TYPES=1 cargo test -p dcrf-demo --test frontend
//! ```

use ts_rs::{Config, TS};

use crate::things::{ThingInput, ThingWithPk, thing};
use crate::todos::{BulkSetDone, Subscribed, TodoInput, Updated, todo};

/// Where the generated declarations are checked in, relative to the workspace root.
pub const BINDINGS_PATH: &str = "clients/typescript/demo/types.ts";

/// One exported declaration: `export type Name = ...;`, with the struct's doc comments.
fn declaration<T: TS>(cfg: &Config) -> String {
    let docs = T::docs().unwrap_or_default();
    format!("{docs}export {}\n", T::decl(cfg))
}

/// The whole generated file: every demo type the client reads or writes.
pub fn bindings() -> String {
    let cfg = Config::new();
    let declarations = [
        declaration::<todo::Model>(&cfg),
        declaration::<TodoInput>(&cfg),
        declaration::<BulkSetDone>(&cfg),
        declaration::<Updated>(&cfg),
        declaration::<Subscribed>(&cfg),
        declaration::<thing::Model>(&cfg),
        declaration::<ThingWithPk>(&cfg),
        declaration::<ThingInput>(&cfg),
    ];
    format!(
        "// Generated from the Rust types of crates/dcrf-demo by ts-rs; do not edit.\n\
         // Regenerate with: DCRF_UPDATE_TYPES=1 cargo test -p dcrf-demo --test frontend\n\n{}",
        declarations.join("\n")
    )
}
