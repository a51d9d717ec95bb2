"""CaCT on CIFAR-100-LT: the official python pickles (cifar-100-python/), fine (100) or coarse (20) labels.

    python pipelines/cifar100_lt.py --data-root ~/data/cifar-100-python --use-gpu
"""
from _common import Defaults, parser, run
from cifar10_lt import DEFAULTS as CIFAR10

DEFAULTS = Defaults(**{**CIFAR10.__dict__, "dataset": "cifar100"})

if __name__ == "__main__":
    p = parser(__doc__.splitlines()[0], DEFAULTS)
    p.add_argument("--label-kind", choices=("fine", "coarse"), default="fine", help="CIFAR-100 label set")
    args = p.parse_args()
    run(args, DEFAULTS, {"dataset": "cifar100", "data_root": args.data_root, "label_kind": args.label_kind})
