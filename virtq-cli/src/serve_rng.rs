//! `virtq serve-rng`: a vhost-user-rng back end (virtio-rng, VIRTIO 1.3, 5.4) whose
//! buffers are filled from the kernel's random source, on the back-end framework.
//!
//! ```sh
//! virtq serve-rng --socket /tmp/rng.sock
//! qemu-system-x86_64 ... -object memory-backend-memfd,id=mem0,size=512M,share=on \
//!   -machine memory-backend=mem0 -chardev socket,id=rng0,path=/tmp/rng.sock \
//!   -device vhost-user-rng-pci,chardev=rng0[,packed=on]
//! ```

use std::process::ExitCode;
use std::sync::Arc;

use virtq_vhost_user::rng::RngDevice;

use crate::serve::{serve, ServeArgs};

/// Options of `virtq serve-rng`.
#[derive(clap::Args, Debug, Clone)]
pub struct ServeRngArgs {
    #[command(flatten)]
    pub serve: ServeArgs,
}

/// Runs `virtq serve-rng`.
pub fn run(args: ServeRngArgs) -> ExitCode {
    let device = match RngDevice::new() {
        Ok(d) => d,
        Err(e) => {
            eprintln!("virtq serve-rng: cannot open /dev/urandom: {e}");
            return ExitCode::from(2);
        }
    };
    eprintln!("virtq serve-rng: /dev/urandom on {}", args.serve.socket.display());
    serve("serve-rng", Arc::new(device), &args.serve)
}
