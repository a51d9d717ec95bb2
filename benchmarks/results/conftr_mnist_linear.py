"""Our ConfTr in DeepMind's ConfTr MNIST setting (google-deepmind/conformal_training, README "Reproducing
experiments"): a linear model on balanced MNIST, evaluated with the threshold (THR = LAC) conformal predictor at
alpha = 0.01. Their README reports, for one training trial and 10 random calibration/test splits:

    CE (experiment "models"):                 accuracy 0.92399, coverage 0.99083, size 2.238840
    ConfTr (experiment "conformal.training"): accuracy 0.90378, coverage 0.99023, size 2.147300

Their settings (experiments/run_mnist.py and config.py of that repository):
    both:    architecture 'mlp' with mlp.layers = 0 (a linear model), 50 epochs, SGD momentum 0.9 Nesterov,
             weight decay 5e-4, exponential learning-rate decay, whitened inputs, 5000 training images held out
    models:  learning_rate 0.05, batch_size 100, cross-entropy
    conformal.training (from scratch): learning_rate 0.05, batch_size 500, conformal.method 'threshold_logp',
             temperature 0.5, alpha 0.01 (training), dispersion 0.1 (their sorting network), size_loss 'valid'
             (hinge max(0, S - 1), i.e. kappa = 1), size_transform identity, loss_transform 'log' (the log of
             size_weight * size loss + 1e-8: size_weight 0.01 is then only an additive constant),
             coverage_loss 'none', cross_entropy_weight 0, calibration fraction 0.5 of each batch
    eval.py: alpha 0.01, THR on softmax probabilities, 10 trials; each trial permutes the 10000 test images and
             calibrates on 5000, tests on the other 5000.

What our switches allow (the pipeline flags plus TrainConfig fields passed through Preset.loop):
    model 'linear' (784 -> 10 logits, inputs in [0, 1], not whitened), --from-scratch, 50 epochs, SGD momentum 0.9
    (not Nesterov), weight decay 5e-4, cosine schedule (not exponential), batch 100 (CE) / 500 (ConfTr), lr 0.05,
    --train-alpha 0.01, --temperature 0.5, size_transform 'log', kappa 1, cal_fraction 0.5, conftr_lambda 1.
    Not used here: cross-entropy weight 0 (TrainConfig.ce_weight, which this reproduction leaves at 1). Not
    available: their sorting network (we use
    torchsort with regularization_strength 1.0, our default), Nesterov, the exponential decay, whitening.
    Evaluation: the pipeline keeps a stratified 20% of the test set as D_val and splits the remaining 8000 into
    stratified calibration/test halves (4000/4000) --n-splits times; we use 10 like their 10 trials.

    python benchmarks/results/conftr_mnist_linear.py --part ce --data-root DATA/mnist --out RUNS/conftr-mnist-linear-ce
    python benchmarks/results/conftr_mnist_linear.py --part conftr --data-root DATA/mnist --out RUNS/conftr-mnist-linear-conftr

``--data-root`` may be left out when ``$CACT_DATA`` is set (its ``mnist`` folder is then used). Any other
pipeline flag can be appended (e.g. --epochs 20).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "pipelines"))

from _common import Preset, parser, run  # noqa: E402

COMMON = dict(dataset="mnist", imbalance_factor=1, epochs=50, finetune_epochs=50, model="linear")
PARTS = {
    "ce": Preset(loop={"batch_size": 100}, **COMMON),
    "conftr": Preset(loop={"batch_size": 500, "size_transform": "log", "kappa": 1.0, "cal_fraction": 0.5}, **COMMON),
}
FLAGS = {
    "ce": ["--methods", "ce", "--from-scratch", "--alpha", "0.01", "--n-splits", "10"],
    "conftr": ["--methods", "conftr", "--from-scratch", "--alpha", "0.01", "--n-splits", "10",
               "--train-alpha", "0.01", "--temperature", "0.5", "--conftr-lambda", "1.0"],
}

if __name__ == "__main__":
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--part", choices=sorted(PARTS), required=True)
    known, rest = pre.parse_known_args()
    d = PARTS[known.part]
    p = parser(f"ConfTr MNIST linear reproduction, part {known.part}", d)
    # a --data-root given on the command line comes later and wins over the one from $CACT_DATA
    data = ["--data-root", os.path.join(os.environ["CACT_DATA"], "mnist")] if os.environ.get("CACT_DATA") else []
    args = p.parse_args([*data, *FLAGS[known.part], *rest])
    run(args, d, {"dataset": "mnist", "data_root": args.data_root})
