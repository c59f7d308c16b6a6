"""PyTorch optimizers beside adamax-cuda on one GPU, in one table.

Run on a GPU machine with PyTorch (see ../shared/GPU.md), from the repository root:

    python3 scripts/torch_side_by_side.py --crate-bin .gpu/examples/throughput

For every shape (flat 2^16..2^28 elements, GPT-2 small's 148 tensors, and one flat
tensor of GPT-2 small's size) it times, with CUDA events, median of 5 runs of 50 steps
after warm-up, with several independent sets rotated when a set would fit in L2:
torch.optim.Adamax with foreach=False and foreach=True, a torch.compile'd Adamax step,
and torch.optim.Adam(fused=True), the best single-pass fused optimizer of the same memory
shape; and a device-to-device copy of the same bytes. GB/s counts the bytes the step
must move, 28 per element, for every implementation: AdaMax reads param, grad, m, u and
writes param, m, u; Adam reads param, grad, exp_avg, exp_avg_sq and writes param,
exp_avg, exp_avg_sq, also 7 x 4 bytes. The crate's rows come from --crate-bin, which
prints JSON lines measured the same way (examples/throughput.rs), including its storage
modes that move fewer bytes (bf16_sr: 22, f32_q8 and bf16_q8: 16.06, bf16_sr_q8: 10.06
per element; their ratio is to a copy of their own bytes, and the ms column compares
them with PyTorch per parameter).

The compiled step follows PyTorch's recipe (a function around opt.step() under
torch.compile). Every rotated set is a different optimizer object, so Dynamo compiles
once per set; its recompile limit is raised to cover them, and after warm-up the script
checks Dynamo's counters that every set was compiled. If not, the row is reported as a
failed compile and not timed: eager code is never timed under the compiled name.
"""

import argparse
import json
import statistics
import subprocess
import sys

import torch

WARMUP, ITERS, REPEATS = 10, 50, 5
BYTES_PER_ELEMENT = 28
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
        return compiled_steps(sets)
    return lambda i: sets[i % k].step()


class CompileFailed(RuntimeError):
    pass


def compiled_steps(sets):
    """One compiled step per set, warmed up and checked to be compiled graphs."""
    import torch._dynamo as dynamo
    from torch._dynamo.utils import counters

    k = len(sets)
    limit = max(getattr(dynamo.config, "recompile_limit", 8), k + 8)
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo.config, name):
            setattr(dynamo.config, name, limit)
    if hasattr(dynamo.config, "accumulated_recompile_limit"):
        dynamo.config.accumulated_recompile_limit = max(dynamo.config.accumulated_recompile_limit, 4 * limit)
    dynamo.reset()
    counters.clear()

    def make(opt):
        @torch.compile(fullgraph=False)
        def step():
            opt.step()
        return step

    steps = [make(opt) for opt in sets]
    try:
        for s in steps:  # compile every set now, outside the timed region
            s()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    except Exception as e:  # noqa: BLE001 - reported, not timed
        raise CompileFailed(f"torch.compile raised {type(e).__name__}: {e}") from e
    graphs = counters["stats"].get("unique_graphs", 0)
    if graphs < k:
        raise CompileFailed(f"Dynamo compiled {graphs} graphs for {k} optimizers: some steps would run eagerly")
    return lambda i: steps[i % k]()


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
    copy_ms, failed = {}, []
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
            try:
                step = make_optimizers(kind, lens, k, torch.float32)
            except CompileFailed as e:
                print(f"# {kind} on {name}: not timed, compile failed: {e}", file=sys.stderr)
                failed.append(f"{kind} {name}")
                continue
            ms = time_ms(step)
            rows.append(dict(impl=f"torch.{kind}", storage="f32", shape=name, tensors=len(lens),
                             elements=n, ms=ms, gbps=n * BYTES_PER_ELEMENT / ms / 1e6,
                             copy_ms=copy_ms[name], ratio_to_copy=copy_ms[name] / ms))
            del step
            torch.cuda.empty_cache()
    print(f"| implementation | storage | shape | tensors | bytes/element | ms | GB/s | ratio to copy |")
    print(f"| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in sorted(rows, key=lambda r: (r["shape"], r["storage"], r["ms"])):
        print(f"| {r['impl']} | {r['storage']} | {r['shape']} | {r['tensors']} | "
              f"{r.get('bytes_per_element', BYTES_PER_ELEMENT):g} | {r['ms']:.4f} | "
              f"{r['gbps']:.0f} | {r['ratio_to_copy']:.3f} |")
    for f in failed:
        print(f"| {f.split()[0]} | f32 | {f.split()[1]} | | | compile failed: not timed | | |")
    json.dump(rows, sys.stderr)


if __name__ == "__main__":
    main()
