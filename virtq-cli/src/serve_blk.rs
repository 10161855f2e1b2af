//! `virtq serve-blk`: a vhost-user-blk back end over a raw image file, served with virtq's
//! device queues (split or packed, whichever the frontend negotiates).
//!
//! ```sh
//! truncate -s 64M /tmp/disk.raw
//! virtq serve-blk --socket /tmp/blk.sock --image /tmp/disk.raw --queues 4
//! qemu-system-x86_64 ... -object memory-backend-memfd,id=mem0,size=512M,share=on \
//!   -machine memory-backend=mem0 -chardev socket,id=blk0,path=/tmp/blk.sock \
//!   -device vhost-user-blk-pci,chardev=blk0,num-queues=4[,packed=on]
//! ```
//!
//! It serves frontends concurrently, each on its own thread, forever: a frontend that
//! disconnects, sends something malformed, stalls or shrinks its memory ends its own
//! connection (logged), and the others go on.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use virtq_vhost_user::backend::blk::{BlkBackend, BlkBackendOptions};
use virtq_vhost_user::backend::{Server, ServerOptions};

/// Options of `virtq serve-blk`.
#[derive(clap::Args, Debug, Clone)]
pub struct ServeBlkArgs {
    /// Unix socket to listen on (replaced if it exists).
    #[arg(long)]
    pub socket: PathBuf,
    /// Raw disk image to serve; its size, rounded down to 512-byte sectors, is the capacity.
    #[arg(long)]
    pub image: PathBuf,
    /// Number of request queues (the frontend's num-queues may not exceed it).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub queues: u16,
    /// Serve read-only: offer VIRTIO_BLK_F_RO and fail writes with IOERR.
    #[arg(long)]
    pub readonly: bool,
    /// Device id returned to GET_ID (at most 20 bytes).
    #[arg(long, default_value = "virtq-blk")]
    pub serial: String,
    /// Serve a single frontend connection, then exit.
    #[arg(long)]
    pub once: bool,
    /// Most frontends served at once; one more is closed at once.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub max_connections: u32,
}

/// Runs `virtq serve-blk`.
pub fn run(args: ServeBlkArgs) -> ExitCode {
    let opts = BlkBackendOptions {
        queues: args.queues,
        readonly: args.readonly,
        serial: args.serial.clone(),
        ..Default::default()
    };
    let device = match BlkBackend::open(&args.image, &opts) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("virtq serve-blk: cannot open {}: {e}", args.image.display());
            return ExitCode::from(2);
        }
    };
    if device.capacity() == 0 {
        eprintln!("virtq serve-blk: {} is smaller than one 512-byte sector", args.image.display());
        return ExitCode::from(2);
    }
    eprintln!(
        "virtq serve-blk: {} ({} sectors, {} queue{}{}) on {}",
        args.image.display(),
        device.capacity(),
        args.queues,
        if args.queues == 1 { "" } else { "s" },
        if args.readonly { ", read-only" } else { "" },
        args.socket.display()
    );
    let limits = ServerOptions { max_connections: args.max_connections as usize, ..Default::default() };
    let mut server = match Server::bind_with(&args.socket, Arc::new(device), limits) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("virtq serve-blk: cannot listen on {}: {e}", args.socket.display());
            return ExitCode::from(2);
        }
    };
    let r = if args.once { server.serve_one().map(|_| ()) } else { server.run() };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("virtq serve-blk: {e}");
            ExitCode::FAILURE
        }
    }
}
