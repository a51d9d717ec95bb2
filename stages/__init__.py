"""Ray stages of the CaCT pipeline: thin adapters around :mod:`cact_ops`.

One module per stage (ingest, longtail, train, infer, evaluate, sweep); each takes one config dataclass and
returns a small result object holding paths and a manifest.
"""
