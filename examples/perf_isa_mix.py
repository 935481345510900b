"""Which vector width a profiled process ran: reads a `perf record` file, disassembles the
instruction at every sampled address in one shared object (objdump; works on stripped libraries such
as ONNX Runtime's wheel) and prints the share of samples on instructions that use zmm, ymm or xmm
registers, and the hottest code blocks with their FMA instructions. Used in docs/benchmarks.md to show
that ONNX Runtime under examples/cpuid_avx2_mask.c runs its AVX2/FMA3 GEMM kernel, not the AVX-512 one.

    perf record -F 499 -o ort.data -- python examples/bert_ort_compare.py --ort-child /tmp/minilm-l6-v2.onnx
    python examples/perf_isa_mix.py ort.data onnxruntime_pybind11_state [--top 6]
"""

import argparse
import collections
import re
import subprocess


def samples(data, dso_part):
    out = subprocess.run(["perf", "script", "-i", data, "-F", "ip,dso", "--show-mmap-events"],
                         capture_output=True, text=True, check=True).stdout
    path, offset, start = None, 0, 0
    counts = collections.Counter()
    total = 0
    for line in out.splitlines():
        if "PERF_RECORD_MMAP" in line and dso_part in line and " r-xp " in line:
            m = re.search(r"\[(0x[0-9a-f]+)\((0x[0-9a-f]+)\) @ (0x[0-9a-f]+|0) .*? r-xp (\S+)", line)
            if m:
                start, offset, path = int(m.group(1), 16), int(m.group(3), 16), m.group(4)
            continue
        parts = line.split()
        if len(parts) < 2 or "PERF_RECORD" in line:
            continue
        total += 1
        if dso_part in parts[1]:
            counts[int(parts[0], 16)] += 1
    return path, start, offset, counts, total


def main():
    p = argparse.ArgumentParser()
    p.add_argument("data")
    p.add_argument("dso")
    p.add_argument("--top", type=int, default=6)
    a = p.parse_args()
    path, start, offset, counts, total = samples(a.data, a.dso)
    if path is None:
        raise SystemExit(f"no executable mapping of {a.dso} in {a.data}")
    # perf script prints runtime addresses; objdump wants file addresses (offset in the file + the
    # segment's virtual address, equal for these libraries' text segments).
    objdump = subprocess.run(["objdump", "-d", "--no-show-raw-insn", path], capture_output=True, text=True,
                             check=True).stdout
    insn = {}
    for line in objdump.splitlines():
        m = re.match(r"\s*([0-9a-f]+):\s+(.*)", line)
        if m:
            insn[int(m.group(1), 16)] = m.group(2)
    width = collections.Counter()
    blocks = collections.Counter()
    in_dso = sum(counts.values())
    for ip, n in counts.items():
        addr = ip - start + offset
        text = insn.get(addr, "")
        kind = "zmm" if "zmm" in text else "ymm" if "ymm" in text else "xmm" if "xmm" in text else "other"
        width[kind] += n
        blocks[addr & ~0xFF] += n
    print(f"{a.data}: {total} samples, {in_dso} in {path.split('/')[-1]}")
    for kind in ("zmm", "ymm", "xmm", "other"):
        print(f"  {kind:5}: {100.0 * width[kind] / max(in_dso, 1):5.1f} % of its samples")
    for base, n in blocks.most_common(a.top):
        body = [insn[x] for x in sorted(insn) if base <= x < base + 0x100]
        fma = [t for t in body if t.startswith("vfmadd")]
        head = " | ".join(body[:3]) if not fma else f"{len(fma)} FMA, e.g. {fma[0]}"
        print(f"  block {base:#x}: {100.0 * n / max(in_dso, 1):5.1f} %  {head}")


if __name__ == "__main__":
    main()
