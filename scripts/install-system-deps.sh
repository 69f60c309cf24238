#!/usr/bin/env bash
# Installs the Debian packages vmferry needs (idempotent). QEMU must be >= 10: Debian 12's 7.2
# corrupts live-migrated TCG guests, so it comes from bookworm-backports of the machine's mirror.
set -euo pipefail

need_root() { [ "$(id -u)" = 0 ] || { echo "install-system-deps: must run as root" >&2; exit 2; }; }
need_root

PKGS=(openvswitch-switch openvswitch-common python3-openvswitch iproute2 busybox-static cpio
      iputils-ping nftables socat curl ethtool iperf3 python3-venv postgresql ovn-central ovn-host procps kmod
      # promtool checks the shipped alerting rules; chromium is the browser Playwright drives.
      prometheus chromium systemd
      # libfaketime: a controller with a skewed clock in the fault tests (issue 11).
      faketime)
QEMU_MIN_MAJOR=10
# libvirt 11 (bookworm-backports, matching QEMU 10) for hosts with `hypervisor: libvirt`; the
# libvirt-python binding has no wheel on PyPI: it builds against libvirt-dev with pkg-config.
LIBVIRT_PKGS=(libvirt-daemon-system libvirt-daemon-driver-qemu libvirt-clients libvirt-dev
              pkg-config gcc python3-dev)
LIBVIRT_MIN_MAJOR=11

qemu_major() {
  command -v qemu-system-x86_64 >/dev/null || { echo 0; return; }
  qemu-system-x86_64 --version | head -n1 | sed -E 's/.*version ([0-9]+).*/\1/'
}

missing=()
for p in "${PKGS[@]}"; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p"); done

export DEBIAN_FRONTEND=noninteractive
if [ "${#missing[@]}" -gt 0 ] || [ "$(qemu_major)" -lt "$QEMU_MIN_MAJOR" ]; then
  apt-get update -qq
fi
if [ "${#missing[@]}" -gt 0 ]; then
  echo "install-system-deps: installing ${missing[*]}"
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [ "$(qemu_major)" -lt "$QEMU_MIN_MAJOR" ]; then
  . /etc/os-release
  codename="${VERSION_CODENAME:-bookworm}"
  # Reuse the URI of the machine's own Debian mirror: no registry host is named here.
  uri=$(grep -hE '^URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null | grep -v security | head -n1 | awk '{print $2}')
  if [ -z "$uri" ]; then
    uri=$(grep -hE '^deb ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null | grep -v security | head -n1 | awk '{print $2}')
  fi
  [ -n "$uri" ] || { echo "install-system-deps: cannot find the Debian mirror in apt sources" >&2; exit 1; }
  keyring=/usr/share/keyrings/debian-archive-keyring.gpg
  cat > /etc/apt/sources.list.d/vmferry-backports.sources <<SRC
Types: deb
URIs: $uri
Suites: ${codename}-backports
Components: main
Signed-By: $keyring
SRC
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends -t "${codename}-backports" qemu-system-x86 qemu-utils >/dev/null
fi

libvirt_major() {
  command -v libvirtd >/dev/null || { echo 0; return; }
  libvirtd --version | head -n1 | sed -E 's/.* ([0-9]+)\.[0-9]+.*/\1/'
}
if [ "$(libvirt_major)" -lt "$LIBVIRT_MIN_MAJOR" ] || ! pkg-config --atleast-version=11 libvirt 2>/dev/null; then
  . /etc/os-release
  [ -f /etc/apt/sources.list.d/vmferry-backports.sources ] || {
    echo "install-system-deps: libvirt needs the backports source (written with QEMU's)" >&2; exit 1; }
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends -t "${VERSION_CODENAME:-bookworm}-backports" \
    "${LIBVIRT_PKGS[@]}" >/dev/null
fi

major=$(qemu_major)
if [ "$major" -lt "$QEMU_MIN_MAJOR" ]; then
  echo "install-system-deps: QEMU >= $QEMU_MIN_MAJOR is required, found $(qemu-system-x86_64 --version | head -n1)" >&2
  exit 1
fi
# The system-wide OVS/OVN/PostgreSQL/Prometheus services are not used: vmferry runs its own
# daemons, and only promtool of the prometheus package is needed.
# The lab starts its own libvirtd per host (lab/libvirt.py); the system's stay off.
for svc in openvswitch-switch ovn-central ovn-host postgresql prometheus libvirtd \
           libvirtd.socket libvirtd-ro.socket libvirtd-admin.socket virtlogd virtlogd.socket \
           virtlockd virtlockd.socket libvirt-guests; do
  systemctl disable --now "$svc" >/dev/null 2>&1 || true
done
echo "install-system-deps: ok (qemu $(qemu-system-x86_64 --version | head -n1 | awk '{print $4}'), $(ovs-vsctl --version | head -n1))"
