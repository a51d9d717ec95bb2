"""CaCT on CIFAR-100-LT: the official python pickles (cifar-100-python/), fine (100) or coarse (20) labels.

    python pipelines/cifar100_lt.py --data-root ~/data/cifar-100-python --use-gpu
"""
import dataclasses

from _common import parser, run
from cifar10_lt import PRESET as CIFAR10

PRESET = dataclasses.replace(CIFAR10, dataset="cifar100", data_root="cifar-100-python/ (the official python pickles: "
                                                                  "train, test, meta)")

if __name__ == "__main__":
    p = parser(__doc__.splitlines()[0], PRESET)
    p.add_argument("--label-kind", choices=("fine", "coarse"), default="fine", help="CIFAR-100 label set")
    args = p.parse_args()
    run(args, PRESET, {"dataset": "cifar100", "data_root": args.data_root, "label_kind": args.label_kind})
