"""CaCT on scikit-learn's digits, made long-tailed: the embedded default that needs no data files.

    python pipelines/digits_lt.py                 # all six methods, about 25 s on 2 CPU cores (local mode)
    python pipelines/digits_lt.py --methods ce,cact --epochs 10
"""
from _common import Preset, parser, run

PRESET = Preset(dataset="digits", imbalance_factor=10, epochs=15, finetune_epochs=6, model="small_cnn",
                needs_data_root=False, loop={"batch_size": 64}, num_workers=0,
                data_root="not needed: scikit-learn's bundled digits")

if __name__ == "__main__":
    args = parser(__doc__.splitlines()[0], PRESET).parse_args()
    run(args, PRESET, {"dataset": "digits"})
