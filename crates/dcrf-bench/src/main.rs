//! `dcrf-bench`: a load generator for servers speaking the DCRF JSON protocol over
//! WebSockets, and a bare WebSocket echo server to compare them with.
//!
//! ```text
//! dcrf-bench SCENARIO --url URL --connections N --duration SECONDS [--json]
//! dcrf-bench raw-echo --bind 127.0.0.1:9000
//! dcrf-bench raw-retrieve --bind 127.0.0.1:9001 --database sqlite:///tmp/todos.sqlite3
//! dcrf-bench raw-fanout --bind 127.0.0.1:9002
//! ```
//!
//! Scenarios: `echo`, `retrieve`, `list`, `create`, `patch` (request/reply, matched by
//! `request_id`), `fanout` (one writer, many subscribers), `idle` (memory per connection).
//! The `raw-*` servers are the hand-written ceilings the DCRF servers are compared with.
//! `dcrf-bench --help` documents every flag.

use std::process::ExitCode;

use clap::Parser;

mod cli;
mod conn;
mod fanout;
mod idle;
mod load;
mod proto;
mod raw_echo;
mod raw_fanout;
mod raw_retrieve;
mod resume;
mod stats;

use cli::{Args, Scenario};

fn main() -> ExitCode {
    let args = Args::parse();
    if let Err(e) = args.validate() {
        eprintln!("error: {e}");
        return ExitCode::from(2);
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = args.threads.unwrap_or(cores);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Start the shared clock before any connection exists.
    proto::clock_ns();
    let client_cores = cores.min(threads);
    let result = runtime.block_on(async {
        match args.scenario {
            Scenario::RawEcho => raw_echo::serve(&args.bind)
                .await
                .map(|()| None)
                .map_err(|e| format!("raw-echo on {}: {e}", args.bind)),
            Scenario::RawRetrieve => {
                raw_retrieve::serve(&args.bind, args.database.as_deref().unwrap_or_default())
                    .await
                    .map(|()| None)
                    .map_err(|e| format!("raw-retrieve: {e}"))
            }
            Scenario::RawFanout => raw_fanout::serve(&args.bind)
                .await
                .map(|()| None)
                .map_err(|e| format!("raw-fanout on {}: {e}", args.bind)),
            Scenario::Echo
            | Scenario::Retrieve
            | Scenario::List
            | Scenario::Create
            | Scenario::Patch => load::run(&args, threads, client_cores).await.map(Some),
            Scenario::Fanout => fanout::run(&args, threads, client_cores).await.map(Some),
            Scenario::Idle => idle::run(&args, threads, client_cores).await.map(Some),
            Scenario::Resume => resume::run(&args, threads, client_cores).await.map(Some),
        }
    });
    // Do not wait for tasks still holding sockets.
    runtime.shutdown_background();
    match result {
        Ok(Some(report)) => {
            report.print(args.json);
            ExitCode::SUCCESS
        }
        Ok(None) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
