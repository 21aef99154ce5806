//! Smoke tests of the programs in `examples/`: each is started as a process on a free port,
//! exactly as a newcomer runs it, and driven over a real socket.
//!
//! Cargo builds examples for a plain `cargo test`, but not when the run names its targets
//! (`--test examples`), so each test first asks cargo for the build `cargo test --workspace`
//! makes, examples included: a no-op after that build (what `scripts/test.sh` runs), and never
//! a stale binary. Building one package's example (`-p dcrf --example NAME`) would resolve
//! that package's features alone and compile much of the dependency graph a second time.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use dcrf::auth::JwtAuth;
use dcrf::testing::TestClient;

/// The secret the examples are started with (`DCRF_JWT_SECRET`).
const SECRET: &str = "examples-smoke-test-secret";

/// A running example, killed when dropped, also when the test fails.
struct Example {
    child: Child,
    addr: String,
}

impl Example {
    /// Builds (if needed) and starts `examples/<name>.rs` on `127.0.0.1:0` with `args` after
    /// the address, and waits for its `listening on ADDR` line.
    fn start(name: &str, args: &[&str]) -> Example {
        let path = build(name);
        let mut child = Command::new(&path)
            .arg("127.0.0.1:0")
            .args(args)
            .env("DCRF_JWT_SECRET", SECRET)
            .env_remove("DCRF_ADDR")
            .env_remove("DCRF_DATABASE")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            // The server's log goes to the test's output, shown when a test fails.
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", path.display()));
        let stdout = child.stdout.take().expect("piped stdout");
        // Built before waiting, so the process is killed even if it never gets ready.
        let mut example = Example {
            child,
            addr: String::new(),
        };
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| panic!("{name} printed nothing within 30 s"));
        example.addr = line
            .trim_end()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("{name}: expected `listening on ADDR`, got {line:?}"))
            .to_owned();
        example
    }

    /// `ws://ADDR<path>`.
    fn url(&self, path: &str) -> String {
        format!("ws://{}{}", self.addr, path)
    }

    /// A client connected to `path`.
    async fn connect(&self, path: &str) -> TestClient {
        TestClient::connect(&self.url(path))
            .await
            .unwrap_or_else(|e| panic!("cannot connect to {}: {e}", self.url(path)))
            .dcrf_envelopes()
    }
}

impl Drop for Example {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The example's executable: `<target>/debug/examples/<name>`, next to this test's
/// `<target>/debug/deps/examples-<hash>`, built by cargo first (into the same target directory).
fn build(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the test executable's path");
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("the test executable is in <target>/<profile>/deps/");
    let path = profile_dir
        .join("examples")
        .join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    let target_dir = profile_dir.parent().expect("a target directory");
    match Command::new(env!("CARGO"))
        .args(["test", "--quiet", "--workspace", "--no-run", "--target-dir"])
        .arg(target_dir)
        .status()
    {
        Ok(status) => assert!(status.success(), "`cargo test --workspace --no-run` failed"),
        // No cargo here (a test archive run elsewhere): use what was built with the tests.
        Err(e) => eprintln!("cannot run cargo ({e}); using the example as built"),
    }
    assert!(
        path.is_file(),
        "the example `{name}` is not built: {} does not exist; build it with \
         `cargo test --workspace --no-run`",
        path.display()
    );
    path
}

/// A token the examples accept: user "1", "ada".
/// A frame without its stream `position` (the epoch is new in every process), after checking
/// that it has one: these tests compare DCRF's envelope.
fn without_position(text: String) -> String {
    let at = text
        .find(",\"position\":{")
        .unwrap_or_else(|| panic!("no position in {text}"));
    let end = at + text[at..].find('}').expect("the position's end") + 1;
    format!("{}{}", &text[..at], &text[end..])
}

fn token() -> String {
    JwtAuth::hs256(SECRET.as_bytes())
        .unwrap()
        .issue("1", "ada", 600)
        .unwrap()
}

#[tokio::test]
async fn greeter_refuses_anonymous_clients_and_greets_signed_in_ones() {
    let greeter = Example::start("greeter", &[]);
    let mut anonymous = greeter.connect("/ws/greeter/").await;
    anonymous
        .send_text(r#"{"action": "greet", "name": "Ada", "request_id": 1}"#)
        .await;
    assert_eq!(
        anonymous.receive_text().await,
        r#"{"errors":["You do not have permission to perform this action."],"data":null,"action":"greet","response_status":403,"request_id":1}"#
    );

    let mut ada = greeter
        .connect(&format!("/ws/greeter/?token={}", token()))
        .await;
    for n in 1..=2 {
        ada.send_text(&format!(
            r#"{{"action": "greet", "name": "Ada", "request_id": {n}}}"#
        ))
        .await;
        assert_eq!(
            ada.receive_text().await,
            format!(
                r#"{{"errors":[],"data":"Hello, Ada! (#{n})","action":"greet","response_status":200,"request_id":{n}}}"#
            )
        );
    }
    ada.send_text(r#"{"action": "greet", "request_id": 3}"#)
        .await;
    assert_eq!(
        ada.receive_text().await,
        r#"{"errors":[{"name":["This field is required."]}],"data":null,"action":"greet","response_status":400,"request_id":3}"#
    );
    assert_eq!(
        TestClient::refused_status(greeter.url("/ws/greeter/?token=forged")).await,
        Some(401)
    );
}

#[tokio::test]
async fn books_are_read_by_anyone_written_by_signed_in_users_and_validated() {
    let books = Example::start("books", &["sqlite::memory:"]);
    let mut anonymous = books.connect("/ws/books/").await;
    anonymous
        .send_text(r#"{"action": "list", "request_id": 1}"#)
        .await;
    assert_eq!(
        anonymous.receive_text().await,
        r#"{"errors":[],"data":{"count":0,"results":[],"limit":20,"offset":0},"action":"list","response_status":200,"request_id":1}"#
    );
    let create = r#"{"action": "create", "data": {"title": "The Dispossessed", "author": "Ursula K. Le Guin", "year": 1974, "format": "paper"}, "request_id": 2}"#;
    anonymous.send_text(create).await;
    assert_eq!(
        anonymous.receive_text().await,
        r#"{"errors":["You do not have permission to perform this action."],"data":null,"action":"create","response_status":403,"request_id":2}"#
    );

    let mut ada = books
        .connect(&format!("/ws/books/?token={}", token()))
        .await;
    ada.send_text(create).await;
    assert_eq!(
        ada.receive_text().await,
        r#"{"errors":[],"data":{"id":1,"title":"The Dispossessed","author":"Ursula K. Le Guin","year":1974,"format":"paper"},"action":"create","response_status":201,"request_id":2}"#
    );
    ada.send_text(r#"{"action": "create", "data": {"title": "  ", "author": "Anon", "year": 1200, "format": "scroll"}, "request_id": 3}"#).await;
    assert_eq!(
        ada.receive_text().await,
        r#"{"errors":[{"format":["\"scroll\" is not a valid choice."],"title":["This field may not be blank."],"year":["Ensure this value is greater than or equal to 1450."]}],"data":null,"action":"create","response_status":400,"request_id":3}"#
    );
    ada.send_text(r#"{"action": "create", "data": {"title": "The Hobbit", "author": "J. R. R. Tolkien", "year": 1937, "format": "ebook"}, "request_id": 4}"#).await;
    assert_eq!(ada.receive_json().await["response_status"], 201);

    // The custom read action and filtered, ordered pages, anonymously.
    anonymous
        .send_text(r#"{"action": "authors", "request_id": 5}"#)
        .await;
    assert_eq!(
        anonymous.receive_text().await,
        r#"{"errors":[],"data":["J. R. R. Tolkien","Ursula K. Le Guin"],"action":"authors","response_status":200,"request_id":5}"#
    );
    anonymous
        .send_text(r#"{"action": "list", "ordering": "year", "filters": {"format": "ebook"}, "limit": 1, "request_id": 6}"#)
        .await;
    assert_eq!(
        anonymous.receive_text().await,
        r#"{"errors":[],"data":{"count":1,"results":[{"id":2,"title":"The Hobbit","author":"J. R. R. Tolkien","year":1937,"format":"ebook"}],"limit":1,"offset":0},"action":"list","response_status":200,"request_id":6}"#
    );
}

#[tokio::test]
async fn live_books_pushes_the_books_of_the_subscribed_author() {
    let live = Example::start("live_books", &["sqlite::memory:"]);
    let mut reader = live.connect("/ws/books/").await;
    let mut writer = live.connect("/ws/books/").await;
    reader
        .send_text(r#"{"action": "subscribe_author", "author": "Ursula K. Le Guin", "request_id": "le-guin"}"#)
        .await;
    assert_eq!(
        without_position(reader.receive_text().await),
        r#"{"errors":[],"data":null,"action":"subscribe_author","response_status":201,"request_id":"le-guin"}"#
    );
    let le_guin = r#"{"id":1,"title":"The Dispossessed","author":"Ursula K. Le Guin","year":1974,"format":"paper"}"#;

    // Created through another connection: the subscriber gets a `create` push.
    writer.send_text(r#"{"action": "create", "data": {"title": "The Dispossessed", "author": "Ursula K. Le Guin", "year": 1974, "format": "paper"}, "request_id": 1}"#).await;
    assert_eq!(writer.receive_json().await["response_status"], 201);
    assert_eq!(
        without_position(reader.receive_text().await),
        format!(
            r#"{{"errors":[],"data":{le_guin},"action":"create","response_status":200,"request_id":"le-guin"}}"#
        )
    );
    // Another author's book is not pushed.
    writer.send_text(r#"{"action": "create", "data": {"title": "The Hobbit", "author": "J. R. R. Tolkien", "year": 1937, "format": "paper"}, "request_id": 2}"#).await;
    assert_eq!(writer.receive_json().await["response_status"], 201);
    reader.receive_nothing().await;

    // Moving the book to another author leaves her group: a `delete` with the book as it was.
    writer
        .send_text(
            r#"{"action": "patch", "pk": 1, "data": {"author": "U. K. Le Guin"}, "request_id": 3}"#,
        )
        .await;
    assert_eq!(writer.receive_json().await["response_status"], 200);
    assert_eq!(
        without_position(reader.receive_text().await),
        format!(
            r#"{{"errors":[],"data":{le_guin},"action":"delete","response_status":200,"request_id":"le-guin"}}"#
        )
    );

    // An unsubscribe with another request id removes nothing: pushes keep coming.
    reader
        .send_text(r#"{"action": "unsubscribe_author", "author": "Ursula K. Le Guin", "request_id": "other"}"#)
        .await;
    assert_eq!(
        reader.receive_text().await,
        r#"{"errors":[],"data":null,"action":"unsubscribe_author","response_status":204,"request_id":"other"}"#
    );
    writer
        .send_text(r#"{"action": "patch", "pk": 1, "data": {"author": "Ursula K. Le Guin"}, "request_id": 4}"#)
        .await;
    assert_eq!(writer.receive_json().await["response_status"], 200);
    let push = reader.receive_json().await;
    assert_eq!(
        (&push["action"], &push["request_id"]),
        (&"create".into(), &"le-guin".into())
    );

    // The subscribing request id ends it.
    reader
        .send_text(r#"{"action": "unsubscribe_author", "author": "Ursula K. Le Guin", "request_id": "le-guin"}"#)
        .await;
    assert_eq!(reader.receive_json().await["response_status"], 204);
    writer
        .send_text(r#"{"action": "delete", "pk": 1, "request_id": 5}"#)
        .await;
    assert_eq!(writer.receive_json().await["response_status"], 204);
    reader.receive_nothing().await;
}

#[tokio::test]
async fn multiplexed_serves_two_streams_on_one_socket() {
    let mux = Example::start("multiplexed", &["sqlite::memory:"]);
    let mut client = mux.connect("/ws").await;
    client
        .send_text(
            r#"{"stream": "echo", "payload": {"action": "echo", "text": "hi", "request_id": 1}}"#,
        )
        .await;
    assert_eq!(
        client.receive_text().await,
        r#"{"stream":"echo","payload":{"errors":[],"data":"hi","action":"echo","response_status":200,"request_id":1}}"#
    );
    client
        .send_text(r#"{"stream": "books", "payload": {"action": "create", "data": {"title": "Kindred", "author": "Octavia E. Butler", "year": 1979, "format": "paper"}, "request_id": 2}}"#)
        .await;
    assert_eq!(
        client.receive_text().await,
        r#"{"stream":"books","payload":{"errors":[],"data":{"id":1,"title":"Kindred","author":"Octavia E. Butler","year":1979,"format":"paper"},"action":"create","response_status":201,"request_id":2}}"#
    );
    // An instance subscription, as dcrf-client's `subscribe`: pushes come wrapped in the stream.
    client
        .send_text(r#"{"stream": "books", "payload": {"action": "subscribe_instance", "pk": 1, "request_id": "sub"}}"#)
        .await;
    assert_eq!(
        client.receive_json().await["payload"]["response_status"],
        201
    );
    client
        .send_text(r#"{"stream": "books", "payload": {"action": "patch", "pk": 1, "data": {"year": 1980}, "request_id": 3}}"#)
        .await;
    assert_eq!(
        client.receive_json().await["payload"]["response_status"],
        200
    );
    assert_eq!(
        without_position(client.receive_text().await),
        r#"{"stream":"books","payload":{"errors":[],"data":{"id":1,"title":"Kindred","author":"Octavia E. Butler","year":1980,"format":"paper"},"action":"update","response_status":200,"request_id":"sub"}}"#
    );
    client
        .send_text(r#"{"stream": "nope", "payload": {"action": "list", "request_id": 4}}"#)
        .await;
    assert_eq!(
        client.receive_text().await,
        r#"{"stream":"nope","payload":{"errors":["Unknown stream \"nope\"."],"data":null,"action":"list","response_status":404,"request_id":4}}"#
    );
}

/// The README's code blocks that follow `<!-- from crates/dcrf/examples/X.rs -->` are copied
/// from that example, verbatim: the README shows what is tested here.
#[test]
fn readme_code_is_taken_from_the_examples() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../../");
    let readme = std::fs::read_to_string(format!("{root}README.md")).unwrap();
    let marker = "<!-- from ";
    let mut checked = 0;
    for (at, _) in readme.match_indices(marker) {
        let rest = &readme[at + marker.len()..];
        let file = &rest[..rest.find(" -->").expect("`-->` closes the marker")];
        let fence = rest
            .find("```rust")
            .expect("a ```rust block after the marker");
        let body = &rest[fence..];
        let body = &body[body.find('\n').unwrap() + 1..];
        let block = &body[..body.find("\n```").expect("the block ends") + 1];
        let source = std::fs::read_to_string(format!("{root}{file}"))
            .unwrap_or_else(|e| panic!("README names {file}: {e}"));
        assert!(
            source.contains(block),
            "the README block after `{marker}{file} -->` is not a verbatim part of {file}:\n{block}"
        );
        checked += 1;
    }
    assert!(
        checked >= 2,
        "expected the Greeter and the model consumer blocks, found {checked}"
    );
}
