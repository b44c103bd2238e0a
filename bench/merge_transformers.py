"""Benchmark: merging two independently trained transformers (and ViTs) by activation matching vs plain averaging.

For each seed, two models with different initialisations and data orders are trained on the same
training set, then merged 50/50 four ways: plain averaging, DIMAT activation matching with the
declared spec, the same with the spec traced by ``derive_spec``, and weight matching. Reported:
held-out loss and accuracy of each endpoint and each merge.

- ``transformer``: the character-level LM (``dimat.models.transformer``) on the ``text`` task
  (next character after 32 characters of Python standard-library docstrings, 70 classes).
- ``vit``: the tiny ViT on scikit-learn's 8x8 digits (2x2 patches, 10 classes).
- ``gpt2``: a Hugging Face GPT-2 (``model=hf``, built from ``GPT2Config``: fused ``c_attn``
  projections in ``Conv1D`` layers) on the same ``text`` task; it declares no spec, so the DIMAT
  merge traces it (``dimat.align.derive_spec``, verified by a planted permutation).

Run: ``PYTHONPATH=. python bench/merge_transformers.py [--models transformer vit gpt2] [--seeds 0 1 2]
[--steps 1500] [--json out.json]``. CPU: a few minutes per seed and model.
"""
from __future__ import annotations

import argparse
import copy
import json
import time

import torch
import torch.nn.functional as F

from dimat.align import derive_spec, find_permutations, permute_state
from dimat.data import load_dataset
from dimat.merge import merge
from dimat.models import build_model

TASKS = {
    "transformer": dict(data=("text", dict(stride=4)), model=dict(dim=64, depth=2, heads=4), lr=3e-3),
    "vit": dict(data=("digits", {}), model=dict(patch=2, dim=64, depth=2, heads=4), lr=2e-3),
    "gpt2": dict(data=("text", dict(stride=4)), build="hf", lr=3e-3,
                 model=dict(source="GPT2Config", config=dict(n_embd=64, n_layer=2, n_head=4, n_positions=32,
                                                             resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))),
}


def train(model, x, y, steps, batch, lr, seed):
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(y), (batch,), generator=g)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()


@torch.no_grad()
def evaluate(model, x, y, bs=2048):
    model.eval()
    loss = correct = 0.0
    for i in range(0, len(y), bs):
        out = model(x[i:i + bs])
        loss += float(F.cross_entropy(out, y[i:i + bs], reduction="sum"))
        correct += int((out.argmax(1) == y[i:i + bs]).sum())
    return loss / len(y), correct / len(y)


def traced_merge(a, b, data):
    spec = derive_spec(a, data[0])
    (p,) = find_permutations(a, [b], data, spec=spec)
    sb = permute_state(b.state_dict(), spec, p)
    out = copy.deepcopy(a)
    out.load_state_dict({k: (v + sb[k]) / 2 if v.is_floating_point() else v for k, v in a.state_dict().items()})
    return out


def run(name, seed, steps, batch, align_batches):
    task = TASKS[name]
    dname, dkw = task["data"]
    bundle = load_dataset(dname, **dkw)
    x, y = bundle.train.tensors
    xt, yt = bundle.test.tensors
    models = []
    t0 = time.perf_counter()
    for k in range(2):
        torch.manual_seed(1000 * seed + k)
        m = build_model(task.get("build", name), num_classes=bundle.num_classes, input_shape=bundle.input_shape,
                        **task["model"])
        models.append(train(m, x, y, steps, batch, task["lr"], seed=1000 * seed + k + 17))
    train_s = time.perf_counter() - t0
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(y), generator=g)[: align_batches * 128]
    data = [x[idx[i:i + 128]] for i in range(0, len(idx), 128)]
    a, b = models
    rows = {"model A": a, "model B": b}
    t0 = time.perf_counter()
    rows["average"] = merge([a, b], [1, 1], data, alignment=None)
    if hasattr(a, "permutation_spec"):
        rows["dimat (declared spec)"] = merge([a, b], [1, 1], data, alignment="activation")
    merge_s = time.perf_counter() - t0
    rows["dimat (traced spec)"] = traced_merge(a, b, data)
    rows["weight matching"] = merge([a, b], [1, 1], data, alignment="weight")
    out = {k: dict(zip(("loss", "acc"), evaluate(m, xt, yt))) for k, m in rows.items()}
    out["_timing"] = {"train_s": train_s, "average_plus_dimat_merge_s": merge_s}
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["transformer", "vit", "gpt2"], choices=sorted(TASKS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--align-batches", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    ap.add_argument("--table-from", nargs="+", default=None,
                    help="only print the table of earlier --json outputs (e.g. one process per seed)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    results = {}
    if args.table_from:
        for path in args.table_from:
            with open(path) as f:
                results.update(json.load(f))
    else:
        for name in args.models:
            for seed in args.seeds:
                r = run(name, seed, args.steps, args.batch, args.align_batches)
                results[f"{name}/{seed}"] = r
                print(f"{name} seed {seed}: " + ", ".join(f"{k} {v['loss']:.3f}/{v['acc']:.3f}"
                                                          for k, v in r.items() if not k.startswith("_")), flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1)
    print("\n| model | merge | test loss (mean ± sd over seeds) | test acc |")
    print("|---|---|---|---|")
    for name in dict.fromkeys(k.split("/")[0] for k in results):
        runs = [v for k, v in results.items() if k.split("/")[0] == name]
        for key in [k for k in runs[0] if not k.startswith("_")]:
            loss = torch.tensor([r[key]["loss"] for r in runs])
            acc = torch.tensor([r[key]["acc"] for r in runs])
            sd = (lambda t: f" ± {t.std().item():.3f}" if len(t) > 1 else "")
            print(f"| {name} | {key} | {loss.mean():.3f}{sd(loss)} | {acc.mean():.3f}{sd(acc)} |")


if __name__ == "__main__":
    main()
