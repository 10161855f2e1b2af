//! Shared by the test helper modules `common` and `backend_util`.

/// Whether the unix socket at `path` accepts connections. Its file appears at `bind`,
/// a moment before `listen`, and a connection attempt in between is refused; the
/// kernel's socket table says which state it is in (`__SO_ACCEPTCON` in the flags),
/// without taking the one connection a vhost-user back end serves.
pub fn is_listening(path: &std::path::Path) -> bool {
    let Ok(table) = std::fs::read_to_string("/proc/net/unix") else { return path.exists() };
    let want = path.to_string_lossy();
    table.lines().skip(1).any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        fields.len() >= 8 && fields[7] == want && fields[3] == "00010000"
    })
}
