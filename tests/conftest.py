"""Shared fixtures. No test reaches the network: the hub endpoint points at a closed local
port, and every model comes from a package on disk or is made here."""

import atexit
import os
import shutil
import tempfile

import pytest


def _own_folder(variable: str, prefix: str, replace: bool = False) -> None:
    """Point `variable` at a fresh temp folder (unless it is set and not `replace`), removed
    when the test run ends: a run leaves nothing behind (the cache alone is ~750 MB)."""
    if os.environ.get(variable) and not replace:
        return
    folder = tempfile.mkdtemp(prefix=prefix)
    atexit.register(shutil.rmtree, folder, True)
    os.environ[variable] = folder


# Set before mmcore reads them: a cache of this test session's own, and a hub that is
# certainly unreachable (a closed port on this machine).
_own_folder("MMCORE_CACHE", "mmcore-test-cache-")
# fine-tuned models made by tests go to a folder of this session's own, not the shared cache
_own_folder("MMCORE_DATA_DIR", "mmcore-test-data-", replace=True)
os.environ["HF_ENDPOINT"] = "http://127.0.0.1:9"
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
# Kits load at exact (fp32) precision in tests, so they compare token for token with
# transformers; tests/test_precision.py loads `fast` kits itself and gates them against these.
os.environ.setdefault("MMCORE_PRECISION", "exact")
_own_folder("GRADIO_TEMP_DIR", "mmcore-test-gradio-")
# and every other temp file of the run, in this process and the apps it starts: gradio_client
# downloads each file through a folder of its own in the temp dir that it never removes (a
# full run left ~1,200 empty folders in /tmp)
_own_folder("TMPDIR", "mmcore-test-tmp-", replace=True)
tempfile.tempdir = None                     # gettempdir() reads TMPDIR again


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
