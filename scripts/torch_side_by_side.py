"""PyTorch optimizers beside adamax-cuda on one GPU, in one table.

Run on a GPU machine with PyTorch (see ../shared/GPU.md), from the repository root:

    python3 scripts/torch_side_by_side.py --crate-bin .gpu/examples/throughput

For every shape (flat 2^16..2^28 elements, GPT-2 small's 148 tensors, and one flat
tensor of GPT-2 small's size) it times, with CUDA events, median of 5 runs of 50 steps
after warm-up, with several independent sets rotated when a set would fit in L2:
torch.optim.Adamax with foreach=False and foreach=True, a torch.compile'd Adamax step,
and torch.optim.Adam(fused=True), the best single-pass fused optimizer of the same memory
shape; and a device-to-device copy of the same bytes. GB/s counts the bytes the step
must move, 28 per element (read param, grad, m, u; write param, m, u), for every
implementation alike, so the GB/s column is a speed, not a claim about their traffic.
Fused Adam moves 4 bytes more per element (it reads and writes two moments and the
param: 32); its GB/s column uses 32. The crate's rows come from --crate-bin, which prints
JSON lines measured the same way (examples/throughput.rs).
"""

import argparse
import json
import statistics
import subprocess
import sys

import torch

WARMUP, ITERS, REPEATS = 10, 50, 5
BYTES = {"adamax": 28, "adam": 32}
ROTATE_BYTES = 128 << 20


def gpt2_small():
    d, vocab, ctx = 768, 50257, 1024
    t = [vocab * d, ctx * d]
    for _ in range(12):
        t += [d, d, d * 3 * d, 3 * d, d * d, d, d, d, d * 4 * d, 4 * d, 4 * d * d, d]
    return t + [d, d]


def shapes():
    out = [(f"flat_2^{k}", [1 << k]) for k in (16, 20, 24, 28)]
    g = gpt2_small()
    out.append(("gpt2_small_148_tensors", g))
    out.append((f"flat_{sum(g)}", [sum(g)]))
    return out


def sets_needed(n):
    return min(ROTATE_BYTES // max(n * 28, 1) + 1, 64)


def time_ms(fn):
    for i in range(WARMUP):
        fn(i)
    samples = []
    for _ in range(REPEATS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for i in range(ITERS):
            fn(i)
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / ITERS)
    return statistics.median(samples)


def make_optimizers(kind, lens, k, dtype):
    sets = []
    for s in range(k):
        gen = torch.Generator(device="cuda").manual_seed(s)
        params = [torch.randn(n, device="cuda", dtype=dtype, generator=gen) for n in lens]
        for p in params:
            p.grad = torch.randn(p.shape, device="cuda", dtype=dtype, generator=gen) * 0.01
        if kind == "adamax_for_loop":
            opt = torch.optim.Adamax(params, foreach=False)
        elif kind in ("adamax_foreach", "adamax_compiled"):
            opt = torch.optim.Adamax(params, foreach=True)
        else:
            opt = torch.optim.Adam(params, fused=True)
        sets.append(opt)
    if kind == "adamax_compiled":
        steps = [torch.compile(opt.step) for opt in sets]
        return lambda i: steps[i % k]()
    return lambda i: sets[i % k].step()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--crate-bin", help="path to the built examples/throughput binary")
    ap.add_argument("--skip", default="", help="comma-separated implementations to skip")
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    print(f"# {torch.cuda.get_device_name()}, PyTorch {torch.__version__}, CUDA {torch.version.cuda}")
    rows = []
    if args.crate_bin:
        out = subprocess.run([args.crate_bin], check=True, capture_output=True, text=True).stdout
        rows += [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    copy_ms = {}
    for name, lens in shapes():
        n = sum(lens)
        k = sets_needed(n)
        src = [torch.empty(n * 14 // 4, device="cuda") for _ in range(k)]
        dst = [torch.empty_like(x) for x in src]
        copy_ms[name] = time_ms(lambda i: dst[i % k].copy_(src[i % k]))
        del src, dst
        for kind in ("adamax_for_loop", "adamax_foreach", "adamax_compiled", "adam_fused"):
            if kind in skip or (kind == "adamax_for_loop" and len(lens) == 1 and n > 1 << 26):
                continue
            step = make_optimizers(kind, lens, k, torch.float32)
            ms = time_ms(step)
            per = BYTES["adam" if kind == "adam_fused" else "adamax"]
            rows.append(dict(impl=f"torch.{kind}", storage="f32", shape=name, tensors=len(lens),
                             elements=n, ms=ms, gbps=n * per / ms / 1e6, copy_ms=copy_ms[name],
                             ratio_to_copy=copy_ms[name] * per / 28 / ms))
            del step
            torch.cuda.empty_cache()
    print(f"| implementation | storage | shape | tensors | ms | GB/s | ratio to copy |")
    print(f"| --- | --- | --- | --- | --- | --- | --- |")
    for r in sorted(rows, key=lambda r: (r["shape"], r["storage"], r["ms"])):
        print(f"| {r['impl']} | {r['storage']} | {r['shape']} | {r['tensors']} | {r['ms']:.4f} | "
              f"{r['gbps']:.0f} | {r['ratio_to_copy']:.3f} |")
    json.dump(rows, sys.stderr)


if __name__ == "__main__":
    main()
