#!/usr/bin/env bash
# Installs what the Linux-guest vhost-user-blk harness needs and builds its kernel and
# initramfs. Idempotent: a second run installs nothing and only rebuilds the initramfs.
#
#   scripts/guest/setup.sh            # then: scripts/guest/run.sh SOCKET ...
#
# - adds the bookworm-backports suite next to the Debian sources (once),
# - installs qemu-system-x86 from bookworm-backports (a plain install would take
#   bookworm's 7.2 and remove qemu-utils 10 with qemu-storage-daemon), busybox-static, cpio,
# - downloads the Debian kernel that linux-image-amd64 depends on and unpacks it into the
#   cache folder ($VIRTQ_GUEST_CACHE, default $HOME/.cache/virtq-guest),
# - builds $CACHE/initramfs.cpio.gz: busybox, the virtio modules (blk, net, rng), /init
#   from init.sh.
#
# Debian 12 (bookworm), x86_64, root (or sudo).
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
CACHE=${VIRTQ_GUEST_CACHE:-${HOME:-/root}/.cache/virtq-guest}
# Loaded in this order; their dependencies from modules.dep go first.
MODULES="virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_blk virtio_net virtio_rng"

log() { echo "setup.sh: $*" >&2; }
die() { echo "setup.sh: error: $*" >&2; exit 1; }

SUDO=()
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null || die "run as root (or install sudo)"
    SUDO=(sudo)
fi

[ "$(dpkg --print-architecture)" = amd64 ] || die "needs an amd64 Debian host"

# ---------------------------------------------------------------------------------------
# bookworm-backports
BACKPORTS_FILE=/etc/apt/sources.list.d/virtq-bookworm-backports.sources

backports_present() {
    local f
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
        [ -f "$f" ] || continue
        # deb822 "Suites: ... bookworm-backports ..." or one-line "deb URI bookworm-backports ..."
        if grep -Eq '^[[:space:]]*(Suites:.*[[:space:]]|deb[[:space:]].*[[:space:]])bookworm-backports([[:space:]]|$)' "$f"; then
            return 0
        fi
    done
    return 1
}

add_backports() {
    local src=/etc/apt/sources.list.d/debian.sources stanza
    if [ -f "$src" ]; then
        # The deb822 stanza whose Suites line lists "bookworm bookworm-updates".
        stanza=$(awk -v RS= '/(^|\n)Suites:[ \t]*bookworm[ \t]+bookworm-updates([ \t]|\n|$)/ { print; exit }' "$src")
        [ -n "$stanza" ] || die "no stanza with 'Suites: bookworm bookworm-updates' in $src"
        printf '%s\n' "$stanza" | sed -E 's/^Suites:.*/Suites: bookworm-backports/' \
            | "${SUDO[@]}" tee "$BACKPORTS_FILE" >/dev/null
    elif [ -f /etc/apt/sources.list ]; then
        local line
        line=$(grep -E '^deb[[:space:]]+[^[:space:]]+[[:space:]]+bookworm[[:space:]]' /etc/apt/sources.list | sed -n 1p || true)
        [ -n "$line" ] || die "no 'deb URI bookworm ...' line in /etc/apt/sources.list"
        BACKPORTS_FILE=/etc/apt/sources.list.d/virtq-bookworm-backports.list
        printf '%s\n' "$line" | sed -E 's/^(deb[[:space:]]+[^[:space:]]+[[:space:]]+)bookworm([[:space:]])/\1bookworm-backports\2/' \
            | "${SUDO[@]}" tee "$BACKPORTS_FILE" >/dev/null
    else
        die "no Debian apt sources found"
    fi
    log "added bookworm-backports in $BACKPORTS_FILE"
}

APT_UPDATED=0
apt_update() {
    if [ "$APT_UPDATED" = 0 ]; then
        log "apt-get update"
        "${SUDO[@]}" apt-get -o DPkg::Lock::Timeout=600 update -qq
        APT_UPDATED=1
    fi
}

if ! backports_present; then
    add_backports
    APT_UPDATED=0
fi

# ---------------------------------------------------------------------------------------
# packages
export DEBIAN_FRONTEND=noninteractive

qemu_system_ok() {
    # Backports' QEMU (>= 8), not bookworm's 7.2, and vhost-user-blk-pci in it.
    command -v qemu-system-x86_64 >/dev/null || return 1
    local major
    major=$(qemu-system-x86_64 --version | sed -nE '1s/.*version ([0-9]+)\..*/\1/p')
    [ "${major:-0}" -ge 8 ]
}

had_qsd=0
[ -x /usr/bin/qemu-storage-daemon ] && had_qsd=1

if ! qemu_system_ok; then
    apt_update
    log "installing qemu-system-x86 from bookworm-backports"
    # Refuse an install that would take qemu-storage-daemon away.
    if "${SUDO[@]}" apt-get -s install -y --no-install-recommends -t bookworm-backports qemu-system-x86 \
        | grep -E '^Remv (qemu-utils|qemu-block-extra)[ :]' >/dev/null; then
        die "installing qemu-system-x86 would remove qemu-utils (qemu-storage-daemon); check the bookworm-backports source"
    fi
    "${SUDO[@]}" apt-get -o DPkg::Lock::Timeout=600 install -y -q --no-install-recommends -t bookworm-backports qemu-system-x86
fi
missing=()
for p in busybox-static cpio; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    apt_update
    log "installing ${missing[*]}"
    "${SUDO[@]}" apt-get -o DPkg::Lock::Timeout=600 install -y -q --no-install-recommends "${missing[@]}"
fi

qemu_system_ok || die "qemu-system-x86_64 >= 8 is not installed"
if [ ! -x /usr/bin/qemu-storage-daemon ]; then
    if [ "$had_qsd" = 1 ]; then
        die "/usr/bin/qemu-storage-daemon was removed by the install (qemu-utils); reinstall it with: apt-get install -t bookworm-backports qemu-utils"
    fi
    log "warning: /usr/bin/qemu-storage-daemon is missing (apt-get install -t bookworm-backports qemu-utils)"
fi
[ -x /bin/busybox ] || die "/bin/busybox (busybox-static) is missing"
file_type=$(LC_ALL=C od -An -c -N4 /bin/busybox | tr -d ' ')
[ "$file_type" = '177ELF' ] || die "/bin/busybox is not an ELF binary"

# ---------------------------------------------------------------------------------------
# kernel
mkdir -p "$CACHE"
# The kernel package linux-image-amd64 depends on (linux-image-6.1.0-NN-amd64) and its
# candidate version, from the current package lists.
kernel_candidate() {
    kpkg=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ { print $2; exit }' || true)
    kver=""
    if [ -n "$kpkg" ]; then
        kver=$(apt-cache policy "$kpkg" 2>/dev/null | awk '/Candidate:/ { print $2; exit }' || true)
    fi
    [ "$kver" != "(none)" ] || kver=""
    KDIR="$CACHE/kernel/${kpkg}_${kver}"
}
kernel_candidate
if [ -z "$kpkg" ] || [ -z "$kver" ] || ! compgen -G "$KDIR/boot/vmlinuz-*" >/dev/null; then
    # Not cached (or no lists yet): refresh the lists first, so that a stale list does not
    # name a version the mirror no longer has.
    apt_update
    kernel_candidate
fi
[ -n "$kpkg" ] || die "cannot find the kernel package that linux-image-amd64 depends on"
[ -n "$kver" ] || die "no candidate version for $kpkg"

if ! compgen -G "$KDIR/boot/vmlinuz-*" >/dev/null; then
    # Outside $HOME, so that apt's _apt user can write the download.
    tmp=$(mktemp -d "${TMPDIR:-/tmp}/virtq-kernel.XXXXXX")
    trap 'rm -rf "$tmp"' EXIT
    chmod 0777 "$tmp" # apt-get download as root drops to the _apt user
    log "downloading $kpkg=$kver"
    (cd "$tmp" && apt-get download -q "$kpkg=$kver")
    deb=$(find "$tmp" -maxdepth 1 -name '*.deb' | sed -n 1p)
    [ -n "$deb" ] || die "apt-get download produced no .deb"
    mkdir -p "$tmp/x"
    dpkg -x "$deb" "$tmp/x"
    rm -rf "$KDIR"
    mkdir -p "$(dirname "$KDIR")"
    mv "$tmp/x" "$KDIR"
    rm -rf "$tmp"
    trap - EXIT
fi
KERNEL=$(compgen -G "$KDIR/boot/vmlinuz-*" | sed -n 1p)
[ -n "$KERNEL" ] || die "no vmlinuz in $KDIR"
MODDIR=$(compgen -G "$KDIR/lib/modules/*/kernel" | sed -n 1p)
[ -n "$MODDIR" ] || die "no lib/modules/*/kernel in $KDIR"
MODDIR=$(dirname "$MODDIR")
ln -sfn "$KERNEL" "$CACHE/vmlinuz"

# ---------------------------------------------------------------------------------------
# module load order: each requested module after its dependencies. The .deb has no
# modules.dep (depmod runs at install time), so read "depends=" from each module's
# .modinfo strings.
declare -A modpath=() seen=()
while IFS= read -r f; do
    name=${f##*/}; name=${name%%.ko*}; name=${name//-/_}
    modpath[$name]=$f
done < <(find "$MODDIR/kernel" -name '*.ko*')
builtin_mods=$(cat "$MODDIR/modules.builtin" 2>/dev/null || true)

mod_cat() {
    case $1 in
    *.ko) cat "$1" ;;
    *.ko.xz) xz -dc "$1" ;;
    *.ko.zst) zstd -qdc "$1" ;;
    *.ko.gz) gzip -dc "$1" ;;
    *) die "unknown module format: $1" ;;
    esac
}

order=()
visit() {
    local m=$1 d deps
    [ -z "${seen[$m]:-}" ] || return 0
    seen[$m]=1
    if [ -z "${modpath[$m]:-}" ]; then
        # Built into the kernel: nothing to load.
        if grep -Eq "/${m//_/[_-]}\.ko$" <<<"$builtin_mods"; then return 0; fi
        die "module $m is neither in $MODDIR/kernel nor in modules.builtin"
    fi
    deps=$(mod_cat "${modpath[$m]}" | tr '\0' '\n' | sed -n 's/^depends=//p' | sed -n 1p)
    for d in ${deps//,/ }; do visit "${d//-/_}"; done
    order+=("$m")
}
for m in $MODULES; do visit "$m"; done

# ---------------------------------------------------------------------------------------
# initramfs
INITRD="$CACHE/initramfs.cpio.gz"
root=$(mktemp -d "$CACHE/.initramfs.XXXXXX")
trap 'rm -rf "$root"' EXIT
mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,tmp,run,lib/virtq/modules}
cp /bin/busybox "$root/bin/busybox"
# One symlink per applet, where busybox would install it.
while IFS= read -r applet; do
    [ "$applet" = bin/busybox ] && continue
    ln -s /bin/busybox "$root/$applet"
done < <(/bin/busybox --list-full)
[ -e "$root/bin/sh" ] || ln -sf busybox "$root/bin/sh"

: >"$root/lib/virtq/modules.order"
for m in "${order[@]}"; do
    mod_cat "${modpath[$m]}" >"$root/lib/virtq/modules/$m.ko"
    echo "$m" >>"$root/lib/virtq/modules.order"
done
cp "$HERE/init.sh" "$root/init"
chmod 0755 "$root/init"
cp "$HERE/pattern.sh" "$root/lib/virtq/pattern.sh"
# The kernel opens /dev/console for /init before anything is mounted; /init also
# reopens it after mounting devtmpfs, so a build without mknod rights still works.
mknod -m 600 "$root/dev/console" c 5 1 2>/dev/null || true

# Same inputs, same bytes: fixed mtimes, sorted names, owner root, gzip without a name.
find "$root" -mindepth 1 -exec touch -h -d @0 {} +
(cd "$root" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc -R 0:0 --reproducible --quiet) | gzip -9n >"$INITRD.tmp"
if cmp -s "$INITRD.tmp" "$INITRD"; then
    rm -f "$INITRD.tmp"
else
    mv "$INITRD.tmp" "$INITRD"
    log "built $INITRD"
fi
rm -rf "$root"
trap - EXIT

log "modules: ${order[*]}"
echo "KERNEL=$KERNEL"
echo "INITRD=$INITRD"
echo "QEMU=$(command -v qemu-system-x86_64) ($(qemu-system-x86_64 --version | sed -n 1p))"
