"""CaCT on CIFAR-10-LT: the official python pickles (cifar-10-batches-py/) or a Parquet image table.

The defaults follow the LDAM-DRW protocol (ResNet-32, SGD 0.1 with 5 warm-up epochs, decay at 160 and 180,
200 epochs, batch 128, crop + flip): a GPU job. On a CPU, shorten it (e.g. --epochs 5); where the CPU has
avx512_bf16 or AMX, --amp-cpu (bf16 autocast) about halves the step time (benchmarks/cpu_amp.py).

    python pipelines/cifar10_lt.py --data-root ~/data/cifar-10-batches-py --use-gpu
    python pipelines/cifar10_lt.py --data-root ../shared/data/cifar10-jpeg --imbalance-factor 10
"""
from pathlib import Path

from _common import Preset, parser, run

PRESET = Preset(dataset="cifar10", imbalance_factor=100, epochs=200, finetune_epochs=20, model="cifar_resnet32",
                data_root="cifar-10-batches-py/ (the official python pickles: data_batch_1..5, test_batch, "
                          "batches.meta), or a folder with train.parquet and test.parquet (image bytes + label)",
                loop={"lr": 0.1, "weight_decay": 2e-4, "schedule": "step", "milestones": (160, 180),
                      "warmup_epochs": 5, "augment": "crop_flip"})


def source(data_root: str, dataset: str) -> dict:
    """The official pickles, or a Parquet image table (train.parquet/test.parquet) such as cifar10-jpeg."""
    root = Path(data_root)
    if (root / "train.parquet").is_file():
        return {"dataset": "parquet", "data_root": data_root}
    return {"dataset": dataset, "data_root": data_root}


if __name__ == "__main__":
    p = parser(__doc__.splitlines()[0], PRESET)
    args = p.parse_args()
    run(args, PRESET, source(args.data_root, "cifar10"))
