//! Micro-benchmarks of the per-message hot path: parse → dispatch → reply.
//!
//! Run with `cargo bench -p dcrf --bench hot_path --features testing`.
//!
//! `fan_out` publishes one event to N local subscribers and runs every subscriber's push
//! (the default handler: one envelope per subscription around the shared body).

use dcrf::channel::ChannelLayer;
use dcrf::observer::Observer;
use dcrf::prelude::*;
use dcrf::protocol::{Envelope, FieldsObject};
use dcrf::testing::LocalConnection;

fn main() {
    divan::main();
}

const ECHO: &str =
    r#"{"action":"echo","request_id":42,"text":"hello world","n":12345,"tags":["a","b"]}"#;

#[derive(Default)]
struct Echo;

#[dcrf::consumer]
impl Echo {
    #[action]
    async fn echo<'f>(
        &mut self,
        frame: &'f Frame<'f>,
    ) -> Result<Reply<FieldsObject<'f, 'f>>, ApiError> {
        Ok(Reply::ok(frame.fields_object()))
    }
}

impl Consumer for Echo {}

/// Parsing one request frame (no value tree).
#[divan::bench]
fn parse(bencher: divan::Bencher) {
    bencher.bench(|| {
        let frame = Frame::parse(divan::black_box(ECHO)).unwrap();
        divan::black_box(frame.fields().len())
    });
}

/// Encoding one reply envelope whose data is the request's fields.
#[divan::bench]
fn encode_reply(bencher: divan::Bencher) {
    let frame = Frame::parse(ECHO).unwrap();
    bencher.bench(|| {
        let env = Envelope {
            errors: &[],
            data: &frame.fields_object(),
            action: frame.action_str(),
            response_status: dcrf::StatusCode::OK,
            request_id: frame.request_id(),
        };
        divan::black_box(env.to_json().unwrap())
    });
}

/// The whole echo action: parse, permission check, dispatch, encode, queue.
#[divan::bench]
fn echo_end_to_end(bencher: divan::Bencher) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let mut conn = LocalConnection::new(Echo);
    bencher.bench_local(|| {
        rt.block_on(conn.send(divan::black_box(ECHO)));
        divan::black_box(conn.receive().unwrap())
    });
}

/// One event to N subscribers: group send, then each subscriber's handler renders its push.
#[divan::bench(args = [10, 100, 1000])]
fn fan_out(bencher: divan::Bencher, subscribers: usize) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let layer = ChannelLayer::memory();
    let observer = Observer::new(&layer, "bench");
    let rid = serde_json::value::RawValue::from_string("\"sub\"".to_owned()).unwrap();
    let mut conns: Vec<LocalConnection<Echo>> = (0..subscribers)
        .map(|_| LocalConnection::new(Echo))
        .collect();
    rt.block_on(async {
        for conn in &conns {
            observer
                .subscribe(conn.ctx(), "todo-1", Some(&rid))
                .await
                .expect("under the subscription cap");
        }
    });
    let body =
        serde_json::json!({"id": 1, "title": "Write the benchmark", "done": false, "owner": "ada"});
    bencher.bench_local(|| {
        rt.block_on(async {
            observer.send("todo-1", "update", &body).await.unwrap();
            for conn in &mut conns {
                conn.process_events().await;
                divan::black_box(conn.receive().unwrap());
            }
        })
    });
}
