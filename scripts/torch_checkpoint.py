"""Writes a torch.optim.Adamax checkpoint in adamax-cuda's safetensors layout.

Run through scripts/torch_checkpoint.sh (which installs PyTorch and safetensors into a
throwaway virtual environment). It steps torch.optim.Adamax for 7 steps on three f32
tensors (lengths 5, 33 and 0), saves `optimizer.state_dict()` as
tests/data/checkpoint/torch_adamax_step7.safetensors with the names adamax-cuda uses
(`state.{i}.exp_avg`, `state.{i}.exp_inf`, `state.{i}.step`) and its param_groups in
the metadata, then checks the file loads back into a fresh torch optimizer with
`load_state_dict`. It also records the parameters at step 7, the gradients of steps
8..10 and PyTorch's parameters after them, in torch_adamax_resume.json, so the Rust test
can resume from the file and compare.
"""

import json
import os
import sys

import numpy as np
import torch
from safetensors.torch import load_file, save_file

OUT = sys.argv[1] if len(sys.argv) > 1 else "tests/data/checkpoint"
LENS = [5, 33, 0]
CFG = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.01, maximize=False)


def f32_text(v):
    v = np.float32(v)
    s = str(v)
    assert np.float32(float(s)) == v
    return float(s)


def grads_for(step, gen):
    return [torch.randn(n, generator=gen).mul(0.1).float() for n in LENS]


def main():
    os.makedirs(OUT, exist_ok=True)
    gen = torch.Generator().manual_seed(42)
    params = [torch.randn(n, generator=gen).float() for n in LENS]
    opt = torch.optim.Adamax(params, foreach=False, **CFG)
    for step in range(7):
        for p, g in zip(params, grads_for(step, gen)):
            p.grad = g
        opt.step()
    sd = opt.state_dict()
    tensors, meta = {}, {}
    for i in range(len(LENS)):
        st = sd["state"][i]
        tensors[f"state.{i}.exp_avg"] = st["exp_avg"].contiguous()
        tensors[f"state.{i}.exp_inf"] = st["exp_inf"].contiguous()
        tensors[f"state.{i}.step"] = st["step"].float().reshape(())
    group = sd["param_groups"][0]
    meta = {
        "format": "torch.optim.Adamax",
        "storage": "f32",
        "step": str(int(sd["state"][0]["step"].item())),
        "tensors": str(len(LENS)),
        "lr": repr(group["lr"]),
        "beta1": repr(group["betas"][0]),
        "beta2": repr(group["betas"][1]),
        "eps": repr(group["eps"]),
        "weight_decay": repr(group["weight_decay"]),
        "eps_mode": "inside_max",
        "weight_decay_mode": "coupled",
        "maximize": "true" if group["maximize"] else "false",
        "made_by": f"scripts/torch_checkpoint.py, PyTorch {torch.__version__}",
    }
    path = os.path.join(OUT, "torch_adamax_step7.safetensors")
    save_file(tensors, path, metadata=meta)

    # The names map back onto PyTorch's own state_dict.
    loaded = load_file(path)
    fresh = torch.optim.Adamax([p.detach().clone() for p in params], foreach=False, **CFG)
    fresh.load_state_dict({
        "state": {i: {"step": loaded[f"state.{i}.step"], "exp_avg": loaded[f"state.{i}.exp_avg"],
                      "exp_inf": loaded[f"state.{i}.exp_inf"]} for i in range(len(LENS))},
        "param_groups": sd["param_groups"],
    })

    at7 = [p.detach().clone() for p in params]
    grads, after = [], []
    for step in range(7, 10):
        g = grads_for(step, gen)
        grads.append([[f32_text(x) for x in t.tolist()] for t in g])
        for p, gi in zip(params, g):
            p.grad = gi
        opt.step()
        after.append([[f32_text(x) for x in p.detach().tolist()] for p in params])
    doc = {
        "made_by": meta["made_by"],
        "params_at_step7": [[f32_text(x) for x in p.tolist()] for p in at7],
        "grads_steps_8_to_10": grads,
        "params_after_steps_8_to_10": after,
    }
    with open(os.path.join(OUT, "torch_adamax_resume.json"), "w") as f:
        json.dump(doc, f, separators=(",", ":"))
        f.write("\n")
    print(f"wrote {path} and torch_adamax_resume.json")


if __name__ == "__main__":
    main()
