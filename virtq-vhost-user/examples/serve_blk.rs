//! `virtq serve-blk` as a stand-alone example binary: the same code as the CLI subcommand
//! (virtq-cli/src/serve_blk.rs is compiled into it), for tests and scripts that need the
//! back end without the `virtq` binary.
//!
//! ```sh
//! cargo run -p virtq-vhost-user --example serve_blk -- --socket /tmp/blk.sock --image /tmp/disk.raw --queues 4
//! ```

use std::process::ExitCode;

use clap::Parser;

#[path = "../../virtq-cli/src/serve.rs"]
mod serve;
#[path = "../../virtq-cli/src/serve_blk.rs"]
mod serve_blk;

/// A vhost-user-blk back end over a raw image file (virtq's device queues).
#[derive(Parser, Debug)]
#[command(name = "serve_blk")]
struct Cli {
    #[command(flatten)]
    args: serve_blk::ServeBlkArgs,
}

fn main() -> ExitCode {
    serve_blk::run(Cli::parse().args)
}
