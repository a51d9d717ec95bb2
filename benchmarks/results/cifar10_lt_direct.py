"""CIFAR-10-LT with ResNet-32 on one GPU, in one process (no Ray): the CE backbone with the LDAM protocol, then
ce_finetune, conftr and cact fine-tuned from it, each evaluated with hard split CP over R random cal/test splits.

The same library code as the pipeline (``stages.longtail`` splits, ``cact_ops.training.fit_in_process``, the
``cact_ops.engine``), with every split decoded once and held on the device: the route for a GPU lease too short
for Ray's start-up. ``pipelines/cifar10_lt.py`` (``benchmarks/results/cifar10_lt_gpu.sh``) is the Ray route.

    python benchmarks/results/cifar10_lt_direct.py --data-root DATA/cifar10-jpeg --out OUT.json            # GPU
    python benchmarks/results/cifar10_lt_direct.py --data-root DATA/cifar10-jpeg --out OUT.json \\
        --device cpu --epochs 1 --finetune-epochs 1 --limit 2000                                          # smoke

LDAM protocol (Cao et al. 2019): SGD momentum 0.9, lr 0.1, 5 warm-up epochs, x0.1 at 160 and 180 of 200 epochs,
batch 128, weight decay 2e-4, pad-4 crop + flip. ``--epochs`` shortens it (the milestones scale with it).
Fine-tunes: ``--finetune-epochs`` at lr 0.01, the pipeline's defaults otherwise (CaCT eta_relative 0.9). A
JSON line per finished stage goes to ``--out`` (rewritten atomically), so a run stopped early keeps what it did.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def _write(out: Path, doc: dict) -> None:
    fd, tmp = tempfile.mkstemp(dir=out.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(doc, f, indent=1)
    os.replace(tmp, out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-root", required=True, help="cifar-10-batches-py/ or a folder with train/test.parquet")
    p.add_argument("--out", type=Path, required=True, help="JSON file of the results")
    p.add_argument("--work", type=Path, default=None, help="split folder location (default: beside --out)")
    p.add_argument("--imbalance-factor", type=float, default=100)
    p.add_argument("--epochs", type=int, default=200)
    p.add_argument("--finetune-epochs", type=int, default=20)
    p.add_argument("--methods", nargs="+", default=["ce_finetune", "conftr", "cact"])
    p.add_argument("--device", default="cuda")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-splits", type=int, default=20)
    p.add_argument("--limit", type=int, default=None, help="smoke: keep only this many training rows")
    a = p.parse_args(argv)

    import torch

    from cact_ops import engine
    from cact_ops.models import build_model
    from cact_ops.training import TrainConfig, fit_in_process
    from stages import longtail
    from stages.payload import read_split_tensors

    t_start = time.time()
    a.out.parent.mkdir(parents=True, exist_ok=True)
    root = Path(a.data_root)
    source = {"dataset": "parquet" if (root / "train.parquet").is_file() else "cifar10", "data_root": str(root)}
    work = a.work or a.out.parent / f"splits-cifar10-if{a.imbalance_factor:g}-s{a.seed}"
    splits = longtail.build(longtail.LongTailConfig(out=str(work), imbalance_factor=a.imbalance_factor,
                                                    seed=a.seed, **source))
    dev = torch.device(a.device)
    data = {s: read_split_tensors(splits, s) for s in ("train", "val", "pool")}
    if a.limit:
        step = max(1, len(data["train"][1]) // a.limit)  # rows are ordered by class: a stride keeps every class
        data["train"] = tuple(t[::step][:a.limit] for t in data["train"])
    data = {s: (x.to(dev), y.to(dev)) for s, (x, y) in data.items()}
    doc = {"what": "CIFAR-10-LT ResNet-32, one process, data on the device", "device": a.device,
           "gpu": torch.cuda.get_device_name() if dev.type == "cuda" else None, "imbalance_factor": a.imbalance_factor,
           "train_counts": splits.train_counts, "epochs": a.epochs, "finetune_epochs": a.finetune_epochs,
           "seed": a.seed, "setup_seconds": round(time.time() - t_start, 1), "methods": {}}
    scale = a.epochs / 200
    base = TrainConfig(method="ce", epochs=a.epochs, batch_size=128, lr=0.1, optimizer="sgd", weight_decay=2e-4,
                       schedule="step", warmup_epochs=max(1, round(5 * scale)) if a.epochs > 1 else 0,
                       milestones=(round(160 * scale), round(180 * scale)), augment="crop_flip", seed=a.seed)

    def evaluate(model) -> dict:
        model.eval()
        with torch.no_grad():
            x, y = data["pool"]
            logits = torch.cat([model(x[i:i + 1000]).float() for i in range(0, len(y), 1000)]).cpu()
        acc, results = engine.evaluate_pool(logits, y.cpu(), splits.train_counts, scores=("lac", "aps"),
                                            predictors=("standard", "classwise"), alphas=(0.1,),
                                            n_splits=a.n_splits, seed=a.seed)
        row = {"accuracy": float(acc.mean())}
        for r in results:
            for m in ("coverage", "size", "covgap", "few_size"):
                row[f"{r.score}_{r.predictor}_{m}"] = float(r.metrics[m][:, 0].mean())
        return row

    def train(method: str, cfg: TrainConfig, init=None) -> dict:
        torch.manual_seed(a.seed)
        model = build_model("cifar_resnet32", splits.num_classes)
        if init is not None:
            model.load_state_dict(init)
        t0 = time.time()
        loop = fit_in_process(model, cfg, data["train"], data["val"], device=a.device)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.time() - t0
        row = {"train_seconds": round(seconds, 1), "epochs": cfg.epochs, **evaluate(model)}
        if loop.dual is not None:
            row["lambda_max"] = float(loop.dual.lam.max())
        doc["methods"][method] = row
        doc["total_seconds"] = round(time.time() - t_start, 1)
        _write(a.out, doc)
        print(f"{method}: {json.dumps(row)}", flush=True)
        return {k: v.detach().clone() for k, v in model.state_dict().items()}

    backbone = train("ce", base)
    for method in a.methods:
        # stages.train.finetune_config's rule, written out: that module needs Polars, absent on a bare GPU machine
        cfg = dataclasses.replace(base, method=method, epochs=a.finetune_epochs, lr=base.lr / 10, warmup_epochs=0,
                                  milestones=())
        train(method, cfg, backbone)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
