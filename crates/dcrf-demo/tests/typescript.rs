//! The checked-in TypeScript declarations of the demo's types match the Rust structs.
//! `DCRF_UPDATE_TYPES=1 cargo test -p dcrf-demo --test typescript` rewrites them.

use std::path::PathBuf;

/// The generated file, from the workspace root.
fn bindings_file() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(dcrf_demo::typescript::BINDINGS_PATH)
}

#[test]
fn typescript_bindings_match_the_rust_types() {
    let generated = dcrf_demo::typescript::bindings();
    let path = bindings_file();
    if std::env::var_os("DCRF_UPDATE_TYPES").is_some() {
        std::fs::create_dir_all(path.parent().expect("the file has a folder"))
            .expect("create the bindings folder");
        std::fs::write(&path, &generated).expect("write the bindings");
        return;
    }
    let checked_in = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        checked_in == generated,
        "{} is out of date with the Rust types; regenerate it with \
         `DCRF_UPDATE_TYPES=1 cargo test -p dcrf-demo --test typescript`\n\
         --- generated ---\n{generated}",
        path.display()
    );
}

#[test]
fn fields_with_a_default_are_optional_in_the_input_types() {
    let generated = dcrf_demo::typescript::bindings();
    for field in ["done?: boolean", "owner?: string", "counter?: number"] {
        assert!(generated.contains(field), "{field} missing from\n{generated}");
    }
    assert!(generated.contains("updated: number"), "{generated}");
}
