//! vhost-user transports for `virtq` (Linux, std).
