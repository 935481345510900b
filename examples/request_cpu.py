#!/usr/bin/env python3
"""Server CPU per request for the built-in `linear` model over gRPC, measured with perf_analyzer.

Starts each worker binary given (side by side, on free 127.0.0.1 ports, built-in models, CPU
backend), then for every round, concurrency and worker in turn (A, B, A, B...) runs

    perf_analyzer -i grpc -u 127.0.0.1:PORT -m linear --shape INPUT0:64 -b 1
        --concurrency-range C:C --measurement-interval MS --percentile 99 -s 25

(-s: --stability)

and prints infer/s, p99 and the worker's CPU per request: the change of utime + stime
(/proc/PID/stat fields 14 and 15, in CLK_TCK ticks) over the change of the model's
`neuron_worker_inference_request_success` counter (its /metrics endpoint) around the run,
warm-up included. `uptime` is printed before and after every run: the client shares the
machine's CPUs with the worker, so other processes move the figures.

Run (standard library only; perf_analyzer from ../shared/tools/triton-clients.sh):

    cargo build --release --bin neuron-worker
    source ~/.cache/triton-clients/env.sh
    python3 examples/request_cpu.py target/release/neuron-worker
    # A/B: two binaries, or one binary with other flags or environment; label=command
    python3 examples/request_cpu.py --rounds 2 "old=/tmp/old-worker" "new=target/release/neuron-worker --io-threads 1"
"""

import argparse
import os
import re
import shlex
import socket
import subprocess
import sys
import time
import urllib.request


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_ticks(pid):
    """(utime, stime) of a process, in clock ticks."""
    with open(f"/proc/{pid}/stat") as f:
        # The command name (field 2) may hold spaces: split after its closing parenthesis.
        rest = f.read().rsplit(")", 1)[1].split()
    return int(rest[11]), int(rest[12])


def successes(metrics_port, model):
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith("neuron_worker_inference_request_success") and f'model="{model}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def uptime():
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


class Worker:
    def __init__(self, label, command, log_dir):
        self.label = label
        self.grpc, self.http, self.metrics = free_port(), free_port(), free_port()
        words = shlex.split(command)
        env = dict(os.environ)
        while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", words[0]):
            k, _, v = words.pop(0).partition("=")
            env[k] = v
        binary, *flags = words
        argv = [
            binary, "serve",
            "--backend", "cpu",
            "--grpc-addr", f"127.0.0.1:{self.grpc}",
            "--http-addr", f"127.0.0.1:{self.http}",
            "--metrics-addr", f"127.0.0.1:{self.metrics}",
            *flags,
        ]
        self.log = open(os.path.join(log_dir, f"worker-{label}.log"), "w")
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        deadline = time.time() + 60
        while True:
            if self.proc.poll() is not None:
                sys.exit(f"worker {label} exited with {self.proc.returncode}; see {self.log.name}")
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.http}/v2/health/ready", timeout=1)
                break
            except OSError:
                if time.time() > deadline:
                    sys.exit(f"worker {label} not ready within 60 s; see {self.log.name}")
                time.sleep(0.1)

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def run_pa(worker, c, args):
    cmd = [
        "perf_analyzer", "-i", "grpc", "-u", f"127.0.0.1:{worker.grpc}", "-m", args.model,
        "--shape", f"INPUT0:{args.width}", "-b", "1", "--concurrency-range", f"{c}:{c}",
        "--measurement-interval", str(args.interval_ms), "--percentile", "99", "-s", str(args.stability),
    ]
    tick = os.sysconf("SC_CLK_TCK")
    u0, s0 = cpu_ticks(worker.proc.pid)
    n0 = successes(worker.metrics, args.model)
    out = subprocess.run(cmd, capture_output=True, text=True)
    u1, s1 = cpu_ticks(worker.proc.pid)
    n1 = successes(worker.metrics, args.model)
    m = re.search(r"Concurrency: \d+, throughput: ([\d.]+) infer/sec, latency (\d+) usec", out.stdout)
    if out.returncode != 0 or not m:
        tail = (out.stdout + out.stderr).strip().splitlines()[-3:]
        return None, None, None, None, None, " | ".join(tail)
    n = max(n1 - n0, 1)
    per = lambda ticks: ticks / tick / n * 1e6
    return float(m.group(1)), int(m.group(2)), per(u1 - u0 + s1 - s0), per(u1 - u0), per(s1 - s0), ""


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("workers", nargs="+", help="[label=]command: the worker binary, optionally with serve flags")
    p.add_argument("--concurrency", default="1,16", help="comma-separated (default 1,16)")
    p.add_argument("--rounds", type=int, default=1, help="rounds over every concurrency and worker (default 1)")
    p.add_argument("--interval-ms", type=int, default=3000, help="perf_analyzer --measurement-interval")
    p.add_argument("--stability", type=int, default=25, help="perf_analyzer -s (percent; raise it on a busy machine)")
    p.add_argument("--model", default="linear")
    p.add_argument("--width", type=int, default=64, help="INPUT0 elements per row (linear: 64)")
    p.add_argument("--log-dir", default="/tmp", help="where the workers' logs go")
    args = p.parse_args()

    workers = []
    try:
        for i, spec in enumerate(args.workers):
            first = spec.split()[0]
            labelled = "=" in first and not re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", first)
            label, _, command = spec.partition("=") if labelled else (chr(ord("A") + i), "", spec)
            workers.append(Worker(label, command, args.log_dir))
        print("| round | worker | c | infer/s | p99 µs | CPU µs/request | user | sys | load before → after |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for r in range(1, args.rounds + 1):
            for c in [int(x) for x in args.concurrency.split(",")]:
                for w in workers:
                    before = uptime()
                    rate, p99, cpu, user, sys_, err = run_pa(w, c, args)
                    after = uptime()
                    if rate is None:
                        print(f"| {r} | {w.label} | {c} | failed: {err} | | | | | {before} → {after} |", flush=True)
                        continue
                    print(
                        f"| {r} | {w.label} | {c} | {rate:,.0f} | {p99:,} | {cpu:.1f} | {user:.1f} | {sys_:.1f} "
                        f"| {before} → {after} |",
                        flush=True,
                    )
    finally:
        for w in workers:
            w.stop()


if __name__ == "__main__":
    main()
