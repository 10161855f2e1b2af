//! The device thread of the matrix: pops chains, completes them, publishes per batch
//! drained, and decides whether the driver wants an interrupt. Generic over the layout, so
//! the loop is compiled for `SplitDevice` and for `PackedDevice`.

use std::sync::atomic::Ordering;
use std::sync::mpsc::Receiver;

use virtq::testing::TestMemory;
use virtq::{Chain, Device, DeviceConfig, DeviceLayout, Segment, Segments};

use crate::bench::{Mode, BUF_LEN};
use crate::layout::{self, BenchLayout};
use crate::notify::Control;

/// Runs the device side of one cell; returns the number of chains popped. On failure it
/// stops the run, so that the driver gives up instead of waiting for buffers.
pub fn run<L: BenchLayout>(
    mem: &TestMemory,
    ctl: &Control,
    from_driver: Receiver<DeviceConfig>,
    mode: Mode,
) -> Result<u64, String> {
    // No config means the driver failed to create the ring; it reports why.
    let Ok(config) = from_driver.recv() else {
        return Ok(0);
    };
    let result = layout::attach::<L>(mem, config)
        .map_err(|e| format!("device: cannot attach to the ring: {e}"))
        .and_then(|mut device| serve(&mut device, ctl, mode));
    if result.is_err() {
        ctl.stop();
    }
    result
}

fn serve<D: DeviceLayout>(device: &mut Device<'_, TestMemory, D>, ctl: &Control, mode: Mode) -> Result<u64, String> {
    // Every buffer is one readable segment: a sink of one is enough, and a longer chain
    // is a bug the pop reports (as `SinkFull`).
    let mut segs = Segments::<1>::new();
    let mut popped = 0u64;
    // Never hold more than a ring's worth of completions back from the driver.
    let max_batch = usize::from(device.size());
    if mode == Mode::Poll {
        // Split with EVENT_IDX: a no-op, as `avail_event` is never moved forward, so the
        // driver's kicks stay suppressed (but for one every 2^16 buffers, at index wrap).
        // Packed: writes DISABLE into the device event area once.
        device.disable_notifications();
    }
    // Whether the last look found the ring empty: the next chain then is likely a lone
    // request, and publishing it before looking for more saves its response that look.
    let mut idle = false;
    loop {
        let mut bad = None;
        let mut check = |chain: &Chain, _: &[Segment<'_>]| {
            if chain.readable_len() != BUF_LEN || chain.writable_len() != 0 {
                bad.get_or_insert((chain.id(), chain.readable_len(), chain.writable_len()));
            }
            0
        };
        let max = if std::mem::take(&mut idle) { 1 } else { max_batch };
        let n = device
            .serve(max, &mut segs, &mut check)
            .map_err(|e| format!("device: pop failed after {popped} chains: {e}"))?;
        if let Some((id, readable, writable)) = bad {
            return Err(format!(
                "device: chain {id} has {readable} readable and {writable} writable bytes, expected {BUF_LEN} and 0"
            ));
        }
        if n > 0 {
            popped += n as u64;
            ctl.device_progress.store(popped, Ordering::Relaxed);
            // Publishes the whole drained batch, then asks `used_event` whether the driver
            // wants to hear about it.
            if device.needs_notification() {
                ctl.driver_bell.ring();
            }
            continue;
        }
        // Idle. The driver stops the run only once every buffer is back, so there is
        // nothing left to serve.
        idle = true;
        if ctl.stopped() {
            return Ok(popped);
        }
        match mode {
            Mode::Poll => std::hint::spin_loop(),
            Mode::Sleep => {
                // Ask for kicks, then look again: buffers added before the driver could
                // see `avail_event` move bring no kick, so sleeping now would lose them.
                if !device.enable_notifications() {
                    ctl.device_bell.wait();
                }
                // Busy again: no kicks wanted while we drain.
                device.disable_notifications();
            }
        }
    }
}
