"""CaCT on MNIST-LT: the official idx files (gzipped or not), exponential long tail over the 10 digits.

    python pipelines/mnist_lt.py --data-root ../shared/data/mnist --imbalance-factor 100
"""
from _common import Preset, parser, run

PRESET = Preset(dataset="mnist", imbalance_factor=100, epochs=10, finetune_epochs=5, model="small_cnn",
                data_root="the folder of the official idx files: train-images-idx3-ubyte, train-labels-idx1-ubyte, "
                          "t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte (gzipped or not)")

if __name__ == "__main__":
    args = parser(__doc__.splitlines()[0], PRESET).parse_args()
    run(args, PRESET, {"dataset": "mnist", "data_root": args.data_root})
