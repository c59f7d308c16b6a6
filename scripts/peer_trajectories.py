"""Writes AdaMax reference trajectories from real peers to tests/data/.

Run through scripts/peer_trajectories.sh, which installs the peers into a throwaway
virtual environment. Each trajectory steps a few tensors of odd lengths for tens of
steps with one peer (torch.optim.Adamax, optax.adamax/adamaxw, keras.optimizers.Adamax
on the JAX backend) and records the parameters after every step and the final state.

Every configuration is also run in float64 with the same peer; the largest difference
between the peer's float32 and float64 parameters is stored as `f32_vs_f64_max_abs`, the
spread the Rust tests use to justify their tolerance.

Numbers are written as the shortest decimal that round-trips their float32 value, and
the script checks that parsing that decimal as float64 and rounding to float32 (what
serde_json followed by `as f32` does in the tests) gives the same value back.
"""

import json
import os
import sys

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import torch  # noqa: E402

LENGTHS = [1, 7, 33, 127]  # odd lengths, 168 elements in all
STEPS = 20
OUT = sys.argv[1] if len(sys.argv) > 1 else "tests/data"


def f32_text(v):
    """Shortest decimal that round-trips the float32 value `v`."""
    v = np.float32(v)
    if not np.isfinite(v):
        raise ValueError(f"non-finite value {v} in a trajectory")
    s = str(v)
    # serde_json parses to f64, the test then rounds to f32: check that path.
    assert np.float32(float(s)) == v, (s, v)
    return float(s)


def rounded(x, digits=5):
    """float32 values with few significant digits, so the inputs stay short."""
    return np.array([np.float32(float(f"{v:.{digits}g}")) for v in np.ravel(x)], dtype=np.float32)


def to_storage(x, storage):
    if storage == "f16":
        return x.astype(np.float16).astype(np.float32)
    if storage == "bf16":
        return torch.from_numpy(x).to(torch.bfloat16).float().numpy()
    return x


def make_inputs(seed, storage, pattern):
    """Initial parameters and gradients for every tensor, as float32 arrays."""
    rng = np.random.default_rng(seed)
    inits, grads = [], []
    for k, n in enumerate(LENGTHS):
        inits.append(to_storage(rounded(rng.normal(0.0, 1.0, n)), storage))
        steps = []
        for t in range(STEPS):
            scale = 10.0 ** rng.uniform(-3, 0)
            g = rng.normal(0.0, scale, n)
            if pattern == "zero_and_tiny":
                if k == 0:
                    g = np.zeros(n)  # never a non-zero gradient
                elif k == 1:
                    g = g * 1e-30  # tiny but normal float32 values
                    g[rng.random(n) < 0.3] = 0.0
                elif k == 2 and t < 6:
                    g = np.zeros(n)  # zero history, then real gradients
                else:
                    g[rng.random(n) < 0.2] = 0.0
            steps.append(to_storage(rounded(g), storage))
        grads.append(steps)
    return inits, grads


def run_torch(cfg, inits, grads, bits):
    dtype = torch.float64 if bits == 64 else torch.float32
    params = [torch.tensor(p, dtype=dtype) for p in inits]
    opt = torch.optim.Adamax(
        params,
        lr=cfg["lr"],
        betas=(cfg["beta1"], cfg["beta2"]),
        eps=cfg["eps"],
        weight_decay=cfg["weight_decay"],
        maximize=cfg["maximize"],
        foreach=False,
    )
    traj = [[] for _ in params]
    for t in range(STEPS):
        for p, g in zip(params, grads):
            p.grad = torch.tensor(g[t], dtype=dtype)
        opt.step()
        for i, p in enumerate(params):
            traj[i].append(p.detach().numpy().copy())
    m = [opt.state[p]["exp_avg"].numpy().copy() for p in params]
    u = [opt.state[p]["exp_inf"].numpy().copy() for p in params]
    return traj, m, u


def run_torch_fused(cfg, inits, grads, bits):
    """torch.optim.Adamax behind torch.amp.GradScaler (unscale_, step, update) and/or
    torch.nn.utils.clip_grad_norm_, the order PyTorch's AMP recipe uses. `grads` are
    the unscaled gradients; with a scaler, the gradient fed in is grad * current scale
    (what backward of the scaled loss gives) plus any injected infinities."""
    dtype = torch.float64 if bits == 64 else torch.float32
    params = [torch.tensor(p, dtype=dtype) for p in inits]
    opt = torch.optim.Adamax(params, lr=cfg["lr"], betas=(cfg["beta1"], cfg["beta2"]), eps=cfg["eps"],
                             weight_decay=cfg["weight_decay"], foreach=False)
    sc = cfg.get("scaler")
    scaler = torch.amp.GradScaler("cpu", init_scale=sc["init_scale"], growth_factor=sc["growth_factor"],
                                  backoff_factor=sc["backoff_factor"], growth_interval=sc["growth_interval"]) if sc else None
    traj = [[] for _ in params]
    fed, skipped, scales, norms = [[] for _ in params], [], [], []
    inf_at = []
    for t in range(STEPS):
        if scaler:
            scaler.scale(torch.ones((), dtype=dtype))  # GradScaler sets its scale up lazily here
        scale = scaler.get_scale() if scaler else 1.0
        for i, (p, g) in enumerate(zip(params, grads)):
            x = np.asarray(g[t], np.float32) * np.float32(scale)
            fed[i].append(x.astype(np.float32))  # JSON has no inf: inf_at records them
            if sc and t in sc["inf_at_steps"] and i == len(params) - 1:
                x = x.copy()
                x[0] = np.inf
                inf_at.append([t, i, 0])
            p.grad = torch.tensor(x, dtype=dtype)
        step_before = opt.state[params[0]]["step"].item() if opt.state else 0
        if scaler:
            scaler.unscale_(opt)
        norm = torch.nn.utils.clip_grad_norm_(params, cfg["max_norm"]) if cfg.get("max_norm") else None
        if scaler:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        step_after = opt.state[params[0]]["step"].item() if opt.state else 0
        skipped.append(step_after == step_before)
        scales.append(scaler.get_scale() if scaler else None)
        norms.append(float(norm) if norm is not None and np.isfinite(float(norm)) else None)
        for i, p in enumerate(params):
            traj[i].append(p.detach().numpy().copy())
    m = [opt.state[p]["exp_avg"].numpy().copy() for p in params]
    u = [opt.state[p]["exp_inf"].numpy().copy() for p in params]
    return traj, m, u, dict(fed=fed, skipped=skipped, scales=scales, norms=norms, inf_at=inf_at)


def run_optax(cfg, inits, grads, bits):
    dtype = jnp.float64 if bits == 64 else jnp.float32
    if cfg["weight_decay_mode"] == "decoupled":
        tx = optax.adamaxw(cfg["lr"], cfg["beta1"], cfg["beta2"], cfg["eps"], cfg["weight_decay"])
    else:
        tx = optax.adamax(cfg["lr"], cfg["beta1"], cfg["beta2"], cfg["eps"])
    params = [jnp.asarray(p, dtype=dtype) for p in inits]
    state = tx.init(params)
    traj = [[] for _ in params]
    for t in range(STEPS):
        g = [jnp.asarray(gs[t], dtype=dtype) for gs in grads]
        updates, state = tx.update(g, state, params)
        params = optax.apply_updates(params, updates)
        for i, p in enumerate(params):
            traj[i].append(np.asarray(p))
    inner = state[0] if isinstance(state, tuple) else state
    while not hasattr(inner, "mu"):
        inner = inner[0]
    return traj, [np.asarray(x) for x in inner.mu], [np.asarray(x) for x in inner.nu]


def run_keras(cfg, inits, grads, bits):
    kdtype = f"float{bits}"
    variables = [keras.Variable(p.astype(kdtype), dtype=kdtype) for p in inits]
    opt = keras.optimizers.Adamax(
        learning_rate=cfg["lr"],
        beta_1=cfg["beta1"],
        beta_2=cfg["beta2"],
        epsilon=cfg["eps"],
        weight_decay=cfg["weight_decay"] if cfg["weight_decay"] else None,
    )
    opt.build(variables)
    traj = [[] for _ in variables]
    for t in range(STEPS):
        g = [keras.ops.convert_to_tensor(gs[t].astype(kdtype)) for gs in grads]
        opt.apply_gradients(zip(g, variables))
        for i, v in enumerate(variables):
            traj[i].append(np.asarray(v.value))
    m = [np.asarray(opt._m[opt._get_variable_index(v)].value) for v in variables]
    u = [np.asarray(opt._u[opt._get_variable_index(v)].value) for v in variables]
    return traj, m, u


PEERS = {
    "torch": (run_torch, f"torch.optim.Adamax (PyTorch {torch.__version__}, foreach=False)"),
    "torch_fused": (run_torch_fused, f"torch.optim.Adamax with torch.amp.GradScaler and/or "
                    f"clip_grad_norm_ (PyTorch {torch.__version__})"),
    "optax": (run_optax, f"optax.adamax / optax.adamaxw (optax {optax.__version__}, JAX {jax.__version__})"),
    "keras": (run_keras, f"keras.optimizers.Adamax (Keras {keras.__version__}, JAX backend)"),
}

TORCH_DEFAULTS = dict(lr=2e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0,
                      weight_decay_mode="none", eps_mode="torch", maximize=False)
KERAS_DEFAULTS = dict(TORCH_DEFAULTS, lr=1e-3, eps=1e-7, eps_mode="keras")

CASES = [
    # name, peer, config, storage, input pattern, seed
    ("torch_defaults", "torch", TORCH_DEFAULTS, "f32", "normal", 1),
    ("torch_coupled_weight_decay", "torch",
     dict(TORCH_DEFAULTS, lr=1e-2, weight_decay=0.1, weight_decay_mode="coupled"), "f32", "normal", 2),
    ("torch_maximize", "torch", dict(TORCH_DEFAULTS, maximize=True, beta1=0.8, beta2=0.99), "f32", "normal", 3),
    ("torch_zero_and_tiny_grads", "torch", TORCH_DEFAULTS, "f32", "zero_and_tiny", 4),
    ("torch_f16_master", "torch", dict(TORCH_DEFAULTS, lr=1e-2), "f16", "normal", 5),
    ("torch_bf16_master", "torch", dict(TORCH_DEFAULTS, lr=1e-2, weight_decay=0.01,
                                        weight_decay_mode="coupled"), "bf16", "normal", 6),
    ("optax_adamax", "optax", TORCH_DEFAULTS, "f32", "normal", 7),
    ("optax_adamaxw_decoupled", "optax",
     dict(TORCH_DEFAULTS, lr=1e-2, weight_decay=0.1, weight_decay_mode="decoupled"), "f32", "normal", 8),
    ("keras_defaults", "keras", KERAS_DEFAULTS, "f32", "normal", 9),
    ("keras_decoupled_weight_decay", "keras",
     dict(KERAS_DEFAULTS, lr=1e-2, weight_decay=0.05, weight_decay_mode="decoupled"), "f32", "normal", 10),
    ("keras_zero_and_tiny_grads", "keras", KERAS_DEFAULTS, "f32", "zero_and_tiny", 11),
    ("torch_clip_grad_norm", "torch_fused", dict(TORCH_DEFAULTS, lr=1e-2, max_norm=0.5), "f32", "normal", 12),
    ("torch_grad_scaler_and_clipping", "torch_fused",
     dict(TORCH_DEFAULTS, lr=1e-2, weight_decay=0.01, weight_decay_mode="coupled", max_norm=0.5,
          scaler=dict(init_scale=1024.0, growth_factor=2.0, backoff_factor=0.5, growth_interval=3,
                      inf_at_steps=[4, 5, 12])), "f32", "normal", 13),
]


def main():
    os.makedirs(OUT, exist_ok=True)
    torch.manual_seed(0)
    for name, peer, cfg, storage, pattern, seed in CASES:
        run, peer_name = PEERS[peer]
        inits, grads = make_inputs(seed, storage, pattern)
        out32, out64 = run(cfg, inits, grads, 32), run(cfg, inits, grads, 64)
        traj, m, u = out32[:3]
        traj64 = out64[0]
        fused = out32[3] if len(out32) > 3 else None
        if fused:
            # The f64 run must take the same path (same skips) for its spread to mean anything.
            assert fused["skipped"] == out64[3]["skipped"], name
            grads = [[g for g in fused["fed"][i]] for i in range(len(LENGTHS))]
        spread = max(
            float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))
            for ta, tb in zip(traj, traj64) for a, b in zip(ta, tb)
        )
        tensors = []
        for i in range(len(LENGTHS)):
            entry = {
                "init": [f32_text(v) for v in inits[i]],
                "grads": [[f32_text(v) for v in g] for g in grads[i]],
                "expected": [[f32_text(v) for v in p] for p in traj[i]],
                "final_exp_avg": [f32_text(v) for v in m[i]],
                "final_exp_inf": [f32_text(v) for v in u[i]],
            }
            if storage != "f32":
                entry["expected_16bit"] = [[f32_text(v) for v in to_storage(np.asarray(p), storage)]
                                           for p in traj[i]]
            tensors.append(entry)
        extra = {}
        if fused:
            extra = {"skipped": fused["skipped"], "scales": fused["scales"],
                     "total_norms": fused["norms"], "inf_at": fused["inf_at"]}
        doc = {
            **extra,
            "name": name,
            "peer": peer_name,
            "made_by": "scripts/peer_trajectories.sh",
            "config": cfg,
            "storage": storage,
            "master_weights": "f32 master stepped by the peer; 16-bit copy = round-to-nearest-even of it"
            if storage != "f32" else None,
            "steps": STEPS,
            "f32_vs_f64_max_abs": spread,
            "tensors": tensors,
        }
        path = os.path.join(OUT, f"{name}.json")
        with open(path, "w") as f:
            json.dump(doc, f, separators=(",", ":"))
            f.write("\n")
        print(f"{path}: {peer_name}, spread {spread:.3g}")


if __name__ == "__main__":
    main()
