#!/usr/bin/env bash
# Regenerates neuron-sys's committed bindings from include/nrt/*.h with bindgen and fails, printing
# the diff, if they differ from the committed src/bindings.rs and src/bindings_optional.rs.
# Installs libclang-dev with apt-get when no libclang is found (bindgen needs it).
# The committed files are left as they were; to update them run:
#   NEURON_SYS_UPDATE_BINDINGS=1 cargo build -p neuron-sys --features bindgen
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
files=(neuron-sys/src/bindings.rs neuron-sys/src/bindings_optional.rs)

have_libclang() {
    [[ -n "${LIBCLANG_PATH:-}" ]] && return 0
    # libclang itself (libclang.so, libclang-14.so.1...), not libclang-cpp, which bindgen cannot use.
    ldconfig -p 2>/dev/null | grep -Eq 'libclang(-[0-9][.0-9]*)?\.so' && return 0
    compgen -G '/usr/lib/llvm-*/lib/libclang.so*' >/dev/null || compgen -G '/usr/lib/llvm-*/lib/libclang-[0-9]*.so*' >/dev/null
}
if ! have_libclang; then
    echo "check-bindings: libclang not found; installing libclang-dev"
    apt-get update -q && apt-get install -y -q libclang-dev
fi

saved="$(mktemp -d)"
trap 'for f in "${files[@]}"; do cp "$saved/$(basename "$f")" "$f"; done; rm -rf "$saved"' EXIT
for f in "${files[@]}"; do cp "$f" "$saved/$(basename "$f")"; done

# A value never used before makes cargo rerun the build script even when nothing else changed.
NEURON_SYS_UPDATE_BINDINGS="check-$$-$(date +%s%N)" cargo build -q -p neuron-sys --features bindgen

drift=0
for f in "${files[@]}"; do
    if ! diff -u --label "$f (committed)" --label "$f (regenerated)" "$saved/$(basename "$f")" "$f"; then
        drift=1
    fi
done
if [[ $drift -ne 0 ]]; then
    echo "check-bindings: FAIL: the committed bindings differ from what bindgen generates from" \
         "neuron-sys/include/nrt/*.h. Regenerate them with:" >&2
    echo "  NEURON_SYS_UPDATE_BINDINGS=1 cargo build -p neuron-sys --features bindgen" >&2
    exit 1
fi
echo "check-bindings: OK: committed bindings match the headers"
