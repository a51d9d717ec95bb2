"""Shared fixtures. One local Ray cluster per pytest session: starting Ray costs seconds, so every Ray test
asks for the ``ray_cluster`` fixture instead of calling ``ray.init`` itself."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
# Importing the example plugin registers its score, metric and method: only the tests that load it (the
# toy_plugin fixture) may, not --doctest-modules' collection, or every other test would see them.
collect_ignore = ["toy_plugin.py"]
# Source listings are cached in the user's cache folder (stages.sources.listing): tests keep theirs apart.
os.environ["CACT_CACHE_DIR"] = tempfile.mkdtemp(prefix="cact-test-cache-")


# Object-store tests talk to an in-process S3 server (the s3_uri fixture); pyarrow's S3 client, in this process
# and in the Ray workers (they inherit this environment), needs credentials of some kind and no EC2 metadata probe.
for _key, _value in (("AWS_ACCESS_KEY_ID", "cact-test"), ("AWS_SECRET_ACCESS_KEY", "cact-test"),
                     ("AWS_EC2_METADATA_DISABLED", "true")):
    os.environ.setdefault(_key, _value)


def pytest_unconfigure(config):
    shutil.rmtree(os.environ["CACT_CACHE_DIR"], ignore_errors=True)  # made above, so ours to remove


@pytest.fixture(scope="session")
def ray_cluster():
    # Set before ray.init: Ray Train's worker health check otherwise adds seconds to every fit.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    if not ray.is_initialized():
        # The dashboard hosts the state API that Ray Train's PlacementGroupCleaner needs: without it the placement
        # group of a controller that dies early (a finished Tune trial) is never removed and its CPUs leak.
        ray.init(num_cpus=2, include_dashboard=True, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def _s3_server():
    """An S3-compatible server in this process (moto), with one bucket; skips when moto is not installed."""
    server_mod = pytest.importorskip("moto.server", reason="moto[server] not installed (pip install 'moto[server]')")
    import logging

    import pyarrow.fs as pafs

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # not a line per request in a failing test's log
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    options = f"endpoint_override={host}:{port}&scheme=http&region=us-east-1"
    pafs.S3FileSystem(endpoint_override=f"{host}:{port}", scheme="http", region="us-east-1",
                      allow_bucket_creation=True).create_dir("cact-test")
    yield options
    server.stop()


@pytest.fixture
def s3_uri(_s3_server, request) -> str:
    """A fresh prefix in the test server's bucket, as a URI (``s3://cact-test/<test>?endpoint_override=...``)."""
    import re
    import uuid

    name = re.sub(r"[^A-Za-z0-9_-]", "-", request.node.name)[:40]
    return f"s3://cact-test/{name}-{uuid.uuid4().hex[:8]}?{_s3_server}"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Path of ../shared/data; skips the test when it is absent (a fresh clone has no data files)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real datasets not found at {SHARED_DATA} (optional; see README)")
    return SHARED_DATA


@pytest.fixture
def toy_plugin():
    """tests/toy_plugin.py loadable as a plugin (``--plugins tests.toy_plugin``) by the test, and its toy score,
    metric and method removed afterwards, so no other test sees them."""
    import sys

    from cact_ops import methods
    from cact_ops.metrics import unregister_metric
    from cact_ops.scores import unregister_score

    sys.modules.pop("tests.toy_plugin", None)  # loading it registers again
    yield "tests.toy_plugin"
    if sys.modules.pop("tests.toy_plugin", None) is not None:
        unregister_score("class_offset")
        unregister_metric("singletons")
        methods.unregister("ce_smoothed")
