"""CaCT on 20 Newsgroups-LT: the official bydate tarball (or its unpacked folder), bag-of-words model.

    python pipelines/newsgroups_lt.py --data-root ../shared/data/20news-bydate.tar.gz --imbalance-factor 10
"""
from _common import Defaults, parser, run

DEFAULTS = Defaults(dataset="newsgroups", imbalance_factor=10, epochs=20, finetune_epochs=10, batch_size=64,
                    lr=2e-3, optimizer="adamw", weight_decay=1e-4, model="text")

if __name__ == "__main__":
    p = parser(__doc__.splitlines()[0], DEFAULTS)
    p.add_argument("--strip-headers", action="store_true", help="drop each message's header block")
    args = p.parse_args()
    run(args, DEFAULTS, {"dataset": "newsgroups", "data_root": args.data_root, "strip_headers": args.strip_headers})
