#!/usr/bin/env bash
# The long data-integrity run: every combination of 1 or 4 queues, indirect descriptors
# on/off and event idx on/off, against qemu-storage-daemon on a file-backed raw image,
# INTEGRITY_OPS operations each (default 200,000), in a release build.
#
#   virtq-vhost-user/scripts/integrity-long.sh            # 8 x 200,000 operations
#   INTEGRITY_OPS=1000000 virtq-vhost-user/scripts/integrity-long.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
export INTEGRITY_OPS="${INTEGRITY_OPS:-200000}"
exec cargo test --release -p virtq-vhost-user --test blk_integrity -- --nocapture --test-threads=1
