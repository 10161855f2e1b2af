//! Minimal logging to standard error: `virtq-backend: LEVEL: message`. Debug lines appear
//! with `VIRTQ_LOG=debug`.

use std::sync::OnceLock;

pub(crate) fn debug_enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var("VIRTQ_LOG").is_ok_and(|v| v.eq_ignore_ascii_case("debug")))
}

macro_rules! log_at {
    ($level:literal, $($arg:tt)*) => {
        eprintln!("virtq-backend: {}: {}", $level, format_args!($($arg)*))
    };
}

macro_rules! log_error {
    ($($arg:tt)*) => { log_at!("error", $($arg)*) };
}

macro_rules! log_info {
    ($($arg:tt)*) => { log_at!("info", $($arg)*) };
}

macro_rules! log_debug {
    ($($arg:tt)*) => {
        if $crate::backend::log::debug_enabled() {
            log_at!("debug", $($arg)*)
        }
    };
}
