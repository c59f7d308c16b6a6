"""torch.optim.Adamax state of a real model, to adamax-cuda's checkpoint files and back.

Run through scripts/torch_checkpoint.sh, which installs PyTorch and safetensors into a
throwaway virtual environment (CI never runs it). Three commands:

  to-crate OPTIMIZER.pt OUT.safetensors [PARAMS.pt]
      A `torch.save`d `optimizer.state_dict()` of torch.optim.Adamax (one parameter
      group) as a crate file: `state.{i}.exp_avg`, `state.{i}.exp_inf` in each
      parameter's own shape (N-D), `state.{i}.step`, the group's settings in the
      metadata, and the parameters' names (`tensor.{i}.name`) when the optimizer was
      built from `model.named_parameters()` (PyTorch 2.6 and later). With f16 or bf16 parameters PyTorch keeps the moments in that type:
      they are widened to f32 (exactly), `m` is brought within AdaMax's bound
      |m| <= c * u (c = (1 - beta1) / (1 - beta1 / beta2)), which a moment rounded to
      16 bits can miss by its last bit and which the crate checks on load, and the f32
      master weights are the parameters, widened (PARAMS.pt: the list of parameter
      tensors in the optimizer's order, needed then, and for parameters that have no
      state yet, which get zero moments at step 0).
  to-torch IN.safetensors OUT.pt
      A crate file (f32 state; 8-bit state first goes through the crate's
      `Checkpoint::convert_state`) as a state dict for `optimizer.load_state_dict`
      (with `param_names` when the file names every tensor: build the optimizer from
      `model.named_parameters()` then),
      the moments in the shapes the file holds (`Optimizer::set_tensor_shape` gives
      them their parameters' shapes before saving). Refuses what torch.optim.Adamax
      has no setting for: decoupled weight decay, eps in the denominator, per-tensor
      settings, 16-bit parameters (their masters would be lost); says which step
      options and loss-scaler settings to set on PyTorch's side.
  generate OUT_DIR
      The test data of tests/checkpoint.rs: a CNN with a transformer encoder (4-D
      convolution weights, 2-D projections, 1-D biases and norms) trained 5 steps with
      torch.optim.Adamax in f32, converted with to-crate
      (torch_model_adamax_step5.safetensors), converted back with to-torch and checked
      to equal PyTorch's own state exactly (the optimizer is built from the model's
      named parameters, so the file names its tensors), with the parameters at step 5, the
      gradients of steps 6 to 8 and PyTorch's parameters after each
      (torch_model_resume.json); and the same model in bf16 after 3 steps, converted
      with its parameters (torch_model_bf16_step3.safetensors).
"""

import json
import os
import sys

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

CFG = dict(lr=2e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)


def f32_text(v):
    v = np.float32(v)
    s = str(v)
    assert np.float32(float(s)) == v
    return float(s)


def storage_of(dtype):
    return {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}[dtype]


def to_crate(sd, out, params=None, made_by="scripts/torch_model.py"):
    (group,) = sd["param_groups"]
    order = group["params"]
    beta1, beta2 = group["betas"]
    c = (1.0 - beta1) / (1.0 - beta1 / beta2) if beta1 < beta2 else float("inf")
    # A parameter that never had a gradient has no state in PyTorch: zero moments at
    # step 0 in the crate, in its parameter's shape (from PARAMS.pt).
    missing = [i for i, k in enumerate(order) if k not in sd["state"]]
    if missing and params is None:
        raise SystemExit(f"parameters {missing} have no state yet (no gradient): pass PARAMS.pt for their shapes")
    dtypes = {sd["state"][k]["exp_avg"].dtype for k in order if k in sd["state"]}
    dtypes |= {params[i].dtype for i in missing}
    if len(dtypes) != 1:
        raise SystemExit(f"parameters of several types {dtypes}: one optimizer per type")
    (dtype,) = dtypes
    storage = storage_of(dtype)
    if storage != "f32" and params is None:
        raise SystemExit(f"{storage} parameters: pass them (PARAMS.pt), they become the f32 master weights")
    tensors, steps = {}, set()
    for i, k in enumerate(order):
        st = sd["state"].get(k) or {
            "exp_avg": torch.zeros_like(params[i], dtype=torch.float32),
            "exp_inf": torch.zeros_like(params[i], dtype=torch.float32),
            "step": torch.tensor(0.0),
        }
        m = st["exp_avg"].float().contiguous()
        u = st["exp_inf"].float().contiguous()
        if storage != "f32":
            # 16-bit moments can miss the bound by their rounding: brought within it.
            lim = (u * c) if c != float("inf") else None
            if lim is not None:
                m = torch.maximum(torch.minimum(m, lim), -lim)
            tensors[f"master.{i}"] = params[i].detach().float().contiguous()
            assert tensors[f"master.{i}"].shape == m.shape
        tensors[f"state.{i}.exp_avg"] = m
        tensors[f"state.{i}.exp_inf"] = u
        tensors[f"state.{i}.step"] = st["step"].float().reshape(())
        steps.add(int(st["step"].item()))
    meta = {
        "format": "torch.optim.Adamax",
        "storage": storage,
        "step": str(max(steps)),
        "tensors": str(len(order)),
        "lr": repr(float(group["lr"])),
        "beta1": repr(float(beta1)),
        "beta2": repr(float(beta2)),
        "eps": repr(float(group["eps"])),
        "weight_decay": repr(float(group["weight_decay"])),
        "eps_mode": "inside_max",
        "weight_decay_mode": "coupled",
        "maximize": "true" if group.get("maximize") else "false",
        "made_by": f"{made_by}, PyTorch {torch.__version__}",
    }
    # An optimizer built from `model.named_parameters()` (PyTorch 2.6 and later) keeps
    # the names in its group: they become the tensors' names in the crate's file.
    for i, name in enumerate(group.get("param_names") or []):
        meta[f"tensor.{i}.name"] = name
    save_file(tensors, out, metadata=meta)


def to_torch(path):
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        meta = f.metadata()
    t = load_file(path)
    refuse = []
    if meta.get("storage") != "f32" or meta.get("param_mode"):
        refuse.append(
            f"{meta.get('storage')} parameters with {meta.get('param_mode', 'master')} weights (PyTorch keeps "
            "16-bit moments and no master: the masters, the truth of such a run, would be lost)"
        )
    if meta.get("state_format"):
        refuse.append("8-bit state (convert it with Checkpoint::convert_state first)")
    if meta.get("weight_decay_mode") != "coupled":
        refuse.append("decoupled weight decay (torch.optim.Adamax couples it)")
    if meta.get("eps_mode") != "inside_max":
        refuse.append("eps in the denominator (torch.optim.Adamax adds it inside the max)")
    if any(k.startswith("tensor.") and not k.endswith((".step", ".name")) for k in meta):
        refuse.append("per-tensor settings (give PyTorch one parameter group per setting)")
    if refuse:
        raise SystemExit(f"{path}: " + "; ".join(refuse))
    # Kept by PyTorch outside the optimizer: said, not refused.
    outside = sorted(k for k in meta if k.startswith(("options.", "scaler.")))
    if outside:
        print(
            f"{path}: {', '.join(outside)} are not optimizer state in PyTorch "
            "(clip_grad_norm_, GradScaler): set them there",
            file=sys.stderr,
        )
    n = int(meta["tensors"])
    state = {}
    for i in range(n):
        state[i] = {
            "step": t[f"state.{i}.step"].reshape(()),
            "exp_avg": t[f"state.{i}.exp_avg"],
            "exp_inf": t[f"state.{i}.exp_inf"],
        }
    group = {
        "lr": float(meta["lr"]),
        "betas": (float(meta["beta1"]), float(meta["beta2"])),
        "eps": float(meta["eps"]),
        "weight_decay": float(meta["weight_decay"]),
        "foreach": None,
        "maximize": meta["maximize"] == "true",
        "capturable": False,
        "differentiable": False,
        "params": list(range(n)),
    }
    names = [meta.get(f"tensor.{i}.name") for i in range(n)]
    if all(names):
        # For an optimizer built from `model.named_parameters()`.
        group["param_names"] = names
    return {"state": state, "param_groups": [group]}


class Model(nn.Module):
    """A small CNN whose feature map is read as tokens by a transformer encoder."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 8, 3, padding=1)
        self.proj = nn.Linear(8, 16)
        layer = nn.TransformerEncoderLayer(
            d_model=16, nhead=2, dim_feedforward=32, dropout=0.0, batch_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, num_layers=1, enable_nested_tensor=False)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        h = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        h = self.proj(h.flatten(2).transpose(1, 2))
        return self.head(self.encoder(h).mean(1))


def batch(gen, dtype):
    x = torch.randn(8, 1, 6, 6, generator=gen).to(dtype)
    y = torch.randint(0, 10, (8,), generator=gen)
    return x, y


def train_step(model, opt, gen, dtype):
    x, y = batch(gen, dtype)
    opt.zero_grad()
    nn.functional.cross_entropy(model(x).float(), y).backward()
    grads = [p.grad.detach().clone() for p in model.parameters()]
    opt.step()
    return grads


def generate(out):
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    model = Model()
    # Built from the named parameters, so the file carries the names.
    opt = torch.optim.Adamax(model.named_parameters(), foreach=False, **CFG)
    for _ in range(5):
        train_step(model, opt, gen, torch.float32)
    sd = opt.state_dict()
    path = os.path.join(out, "torch_model_adamax_step5.safetensors")
    to_crate(sd, path)
    # And back: PyTorch's own state, exactly, in its own shapes.
    back = to_torch(path)
    for k, i in zip(sd["param_groups"][0]["params"], range(len(back["state"]))):
        for name in ("exp_avg", "exp_inf", "step"):
            a, b = sd["state"][k][name], back["state"][i][name]
            assert a.shape == b.shape and torch.equal(a.float(), b.float()), (i, name)
    assert back["param_groups"][0]["param_names"] == sd["param_groups"][0]["param_names"]
    fresh = torch.optim.Adamax(
        [(n, p.detach().clone()) for n, p in model.named_parameters()], foreach=False, **CFG
    )
    fresh.load_state_dict(back)

    flat = lambda ts: [[f32_text(x) for x in t.detach().flatten().tolist()] for t in ts]
    at5 = flat(model.parameters())
    grads, after = [], []
    for _ in range(3):
        grads.append(flat(train_step(model, opt, gen, torch.float32)))
        after.append(flat(model.parameters()))
    doc = {
        "made_by": f"scripts/torch_model.py, PyTorch {torch.__version__}",
        "names": [n for n, _ in model.named_parameters()],
        "shapes": [list(p.shape) for p in model.parameters()],
        "params_at_step5": at5,
        "grads_steps_6_to_8": grads,
        "params_after_steps_6_to_8": after,
    }
    with open(os.path.join(out, "torch_model_resume.json"), "w") as f:
        json.dump(doc, f, separators=(",", ":"))
        f.write("\n")

    # bf16 parameters: PyTorch keeps the moments in bf16.
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(2)
    model = Model().to(torch.bfloat16)
    opt = torch.optim.Adamax(model.parameters(), foreach=False, **CFG)
    for _ in range(3):
        train_step(model, opt, gen, torch.bfloat16)
    to_crate(opt.state_dict(), os.path.join(out, "torch_model_bf16_step3.safetensors"), list(model.parameters()))
    print(f"wrote {path}, torch_model_resume.json and torch_model_bf16_step3.safetensors")


def main():
    args = sys.argv[1:]
    if len(args) >= 3 and args[0] == "to-crate":
        params = torch.load(args[3]) if len(args) > 3 else None
        to_crate(torch.load(args[1]), args[2], params)
    elif len(args) == 3 and args[0] == "to-torch":
        torch.save(to_torch(args[1]), args[2])
    elif len(args) == 2 and args[0] == "generate":
        generate(args[1])
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main()
