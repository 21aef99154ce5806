//! The front end dcrf-demo ships: the checked-in TypeScript declarations of its types match the
//! Rust structs (`DCRF_UPDATE_TYPES=1 cargo test -p dcrf-demo --test frontend` rewrites them), and
//! the todo page and its script are served at `/` and `/todo-page.js`.

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
         `DCRF_UPDATE_TYPES=1 cargo test -p dcrf-demo --test frontend`\n\
         --- generated ---\n{generated}",
        path.display()
    );
}

#[test]
fn fields_with_a_default_are_optional_in_the_input_types() {
    let generated = dcrf_demo::typescript::bindings();
    for field in ["done?: boolean", "owner?: string", "counter?: number"] {
        assert!(
            generated.contains(field),
            "{field} missing from\n{generated}"
        );
    }
    assert!(generated.contains("updated: number"), "{generated}");
}

/// `GET path` against the page's routes on a real socket: (status line, headers, body).
async fn get(path: &str) -> (String, String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("address");
    let server = tokio::spawn(async move {
        axum::serve(listener, dcrf_demo::page::router())
            .await
            .expect("serve");
    });
    let mut socket = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    socket.write_all(request.as_bytes()).await.expect("send");
    let mut response = String::new();
    socket.read_to_string(&mut response).await.expect("read");
    server.abort();
    let (head, body) = response.split_once("\r\n\r\n").expect("a head and a body");
    let (status, headers) = head.split_once("\r\n").expect("a status line");
    (
        status.to_owned(),
        headers.to_ascii_lowercase(),
        body.to_owned(),
    )
}

#[tokio::test]
async fn the_page_is_served_at_the_root_with_its_test_ids() {
    let (status, headers, body) = get("/").await;
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert!(
        headers.contains("content-type: text/html; charset=utf-8"),
        "{headers}"
    );
    assert_eq!(body, dcrf_demo::page::INDEX);
    for id in [
        "data-testid=\"new-todo\"",
        "data-testid=\"mark-all-done\"",
        "data-testid=\"connection-status\"",
        "<script type=\"module\" src=\"/todo-page.js\"></script>",
    ] {
        assert!(body.contains(id), "{id} missing from the page");
    }
}

#[tokio::test]
async fn the_script_is_served_as_javascript() {
    let (status, headers, body) = get("/todo-page.js").await;
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert!(
        headers.contains("content-type: text/javascript; charset=utf-8"),
        "{headers}"
    );
    assert_eq!(body, dcrf_demo::page::SCRIPT);
    // The rows' test ids are made by the script.
    for id in ["todo-item", "todo-toggle", "todo-delete"] {
        assert!(body.contains(id), "{id} missing from the script");
    }
}
