"""CaCT on ImageNet-LT (or any ImageFolder tree such as Imagenette): ROOT/<split>/<wnid>/*.JPEG.

With the official ImageNet-LT list files (ImageNet_LT_train.txt, _val, _test) the splits are exactly the
published ones; without lists an exponential long tail is built from the train folder, with D_val and the
pool taken from the val folder (so it runs on Imagenette).

    python pipelines/imagenet_lt.py --data-root /data/imagenet --train-list ImageNet_LT_train.txt \\
        --val-list ImageNet_LT_val.txt --test-list ImageNet_LT_test.txt --use-gpu --num-workers 8
    python pipelines/imagenet_lt.py --data-root ../shared/data/imagenette2-128 --imbalance-factor 10 \\
        --image-size 64 --model imagenet_resnet18 --epochs 5
"""
from _common import Preset, parser, run

PRESET = Preset(dataset="imagefolder", imbalance_factor=10, epochs=90, finetune_epochs=10, model="imagenet_resnet50",
                image_size=224,
                data_root="an ImageFolder root: train/<wnid>/*.JPEG and val/<wnid>/*.JPEG (ImageNet, Imagenette); "
                          "with --train-list/--val-list/--test-list, the root their paths are relative to",
                loop={"batch_size": 256, "lr": 0.1, "warmup_epochs": 5, "augment": "resized_crop_flip"})

if __name__ == "__main__":
    p = parser(__doc__.splitlines()[0], PRESET)
    p.add_argument("--train-list", default=None, help="ImageNet-LT train list (paths relative to --data-root)")
    p.add_argument("--val-list", default=None, help="ImageNet-LT val list (D_val for the dual step)")
    p.add_argument("--test-list", default=None, help="ImageNet-LT test list (the calibration/test pool)")
    p.add_argument("--on-corrupt", choices=("fail", "skip"), default="fail", help="what to do with a bad JPEG")
    args = p.parse_args()
    lists = {k: getattr(args, k) for k in ("train_list", "val_list", "test_list") if getattr(args, k)}
    source = {"dataset": "imagefolder", "data_root": args.data_root, "on_corrupt": args.on_corrupt, **lists}
    if lists:
        source["profile"] = "lists"
    run(args, PRESET, source)
