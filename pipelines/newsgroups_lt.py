"""CaCT on 20 Newsgroups-LT: the official bydate tarball (or its unpacked folder), bag-of-words model.

    python pipelines/newsgroups_lt.py --data-root ../shared/data/20news-bydate.tar.gz --imbalance-factor 10
"""
from _common import Preset, parser, run

PRESET = Preset(dataset="newsgroups", imbalance_factor=10, epochs=20, finetune_epochs=10, model="text",
                data_root="20news-bydate.tar.gz, or the folder it unpacks to (20news-bydate-train/, "
                          "20news-bydate-test/, one folder per newsgroup)",
                loop={"batch_size": 64, "lr": 2e-3, "optimizer": "adamw", "weight_decay": 1e-4})

if __name__ == "__main__":
    p = parser(__doc__.splitlines()[0], PRESET)
    p.add_argument("--strip-headers", action="store_true", help="drop each message's header block")
    args = p.parse_args()
    run(args, PRESET, {"dataset": "newsgroups", "data_root": args.data_root, "strip_headers": args.strip_headers})
