//! The event-index rule shared by kicks (driver to device) and interrupts (device to
//! driver), VIRTIO 1.3 section 2.7.10 and 2.8.10.
//!
//! Indices are free-running `u16` counters that wrap. A peer that wants to hear about
//! entry `event` publishes `event`; the other side, having moved its index from `old` to
//! `new`, notifies exactly when `event` lies in the half-open window `[old, new)` modulo
//! 2^16. Example: `old = 0xfffe`, `new = 0x0001` (three entries published across the wrap),
//! `event = 0xffff`: `new - event - 1 = 1` and `new - old = 3`, so `1 < 3` notifies; an
//! `event` of `0x0001` gives `0xffff < 3`, false: that entry is not published yet.

/// Whether moving an index from `old` to `new` passes the peer's requested `event`.
///
/// The window is only meaningful while `new - old` is below 2^16: callers that may have
/// published 65,536 or more entries since their last decision must notify unconditionally.
#[doc(alias = "vring_need_event")]
#[inline]
pub const fn need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

#[cfg(test)]
mod tests {
    use super::need_event;

    #[test]
    fn event_inside_window_notifies() {
        assert!(need_event(5, 6, 5));
        assert!(need_event(5, 10, 0));
        assert!(!need_event(10, 10, 0));
        assert!(!need_event(4, 10, 5));
    }

    #[test]
    fn window_wraps_at_u16() {
        assert!(need_event(0xffff, 0x0001, 0xfffe));
        assert!(need_event(0x0000, 0x0001, 0xfffe));
        assert!(!need_event(0x0001, 0x0001, 0xfffe));
        assert!(!need_event(0xfffd, 0x0001, 0xfffe));
    }

    #[test]
    fn empty_window_never_notifies() {
        for event in [0u16, 1, 0x7fff, 0xffff] {
            assert!(!need_event(event, 42, 42));
        }
    }
}
