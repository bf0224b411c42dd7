"""Shared fixtures. No test reaches the network: the hub endpoint points at a closed local
port, and every model comes from a package on disk or is made here."""

import os
import tempfile

import pytest

# Set before mmcore reads them: a cache of this test session's own, and a hub that is
# certainly unreachable (a closed port on this machine).
os.environ.setdefault("MMCORE_CACHE", tempfile.mkdtemp(prefix="mmcore-test-cache-"))
# fine-tuned models made by tests go to a folder of this session's own, not the shared cache
os.environ["MMCORE_DATA_DIR"] = tempfile.mkdtemp(prefix="mmcore-test-data-")
os.environ["HF_ENDPOINT"] = "http://127.0.0.1:9"
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
# Kits load at exact (fp32) precision in tests, so they compare token for token with
# transformers; tests/test_precision.py loads `fast` kits itself and gates them against these.
os.environ.setdefault("MMCORE_PRECISION", "exact")
os.environ.setdefault("GRADIO_TEMP_DIR", tempfile.mkdtemp(prefix="mmcore-test-gradio-"))


@pytest.fixture(scope="session")
def tiny_kit():
    import mmcore

    return mmcore.load_kit("tiny")


@pytest.fixture(scope="session")
def offline_kit():
    import mmcore

    return mmcore.load_kit("offline")


@pytest.fixture(scope="session")
def chelsea():
    from PIL import Image
    from skimage import data

    return Image.fromarray(data.chelsea())
