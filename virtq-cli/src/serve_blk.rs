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

use crate::serve::{serve, ServeArgs};

/// Options of `virtq serve-blk`.
#[derive(clap::Args, Debug, Clone)]
pub struct ServeBlkArgs {
    #[command(flatten)]
    pub serve: ServeArgs,
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
        args.serve.socket.display()
    );
    serve("serve-blk", Arc::new(device), &args.serve)
}
