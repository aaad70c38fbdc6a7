#!/usr/bin/env bash
# The aarch64 cross toolchain and user-mode emulator for tests/quant/test_arm64.py (the C++ kernels
# cross-compiled for ARM64 and run under qemu, NEON build against portable build, byte for byte).
#
#   g++-aarch64-linux-gnu   aarch64-linux-gnu-g++ and the aarch64 glibc/libstdc++ (static libs too)
#   qemu-user-static        qemu-aarch64-static, one self-contained binary (qemu-user's qemu-aarch64
#                           is accepted as well when it is already there)
#
# Idempotent and quiet: when both tools are on PATH it returns at once (no apt at all); otherwise it
# installs without recommends, running `apt-get update` only if the packages cannot be found in the
# current lists (a fresh machine has none). Exits non-zero if the tools are still missing after that;
# the test then skips with the reason.
set -euo pipefail

have_tools() {
  command -v aarch64-linux-gnu-g++ >/dev/null 2>&1 &&
    { command -v qemu-aarch64-static >/dev/null 2>&1 || command -v qemu-aarch64 >/dev/null 2>&1; }
}

if have_tools; then
  exit 0
fi

SUDO=()
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then
    SUDO=(sudo -n)
  else
    echo "install_arm64_tools: not root and no sudo: install g++-aarch64-linux-gnu and qemu-user-static" >&2
    exit 1
  fi
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "install_arm64_tools: no apt-get here: install an aarch64 cross g++ and qemu-aarch64 by hand" >&2
  exit 1
fi

PACKAGES=(g++-aarch64-linux-gnu qemu-user-static)
export DEBIAN_FRONTEND=noninteractive
APT=("${SUDO[@]}" apt-get -qq -o Dpkg::Use-Pty=0 -o DPkg::Lock::Timeout=300)

# A package is installable from the current lists when apt-cache shows a candidate for it.
candidates_known() {
  local p policy
  for p in "${PACKAGES[@]}"; do
    policy=$(apt-cache policy "$p" 2>/dev/null || true)  # no pipe into grep -q: SIGPIPE under pipefail
    [[ $policy == *"Candidate: "[0-9]* ]] || return 1
  done
}

log=$(mktemp)
trap 'rm -f "$log"' EXIT
t0=$SECONDS
if ! candidates_known; then
  "${APT[@]}" update >"$log" 2>&1 || { cat "$log" >&2; exit 1; }
fi
if ! "${APT[@]}" install -y --no-install-recommends "${PACKAGES[@]}" >"$log" 2>&1; then
  # stale lists (a package version gone from the mirror): refresh once and retry
  "${APT[@]}" update >>"$log" 2>&1 &&
    "${APT[@]}" install -y --no-install-recommends "${PACKAGES[@]}" >>"$log" 2>&1 ||
    { tail -n 30 "$log" >&2; exit 1; }
fi

if ! have_tools; then
  echo "install_arm64_tools: installed ${PACKAGES[*]} but aarch64-linux-gnu-g++ / qemu-aarch64 are not on PATH" >&2
  exit 1
fi
echo "install_arm64_tools: installed ${PACKAGES[*]} ($((SECONDS - t0)) s)"
