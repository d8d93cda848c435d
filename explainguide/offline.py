"""Whether the Hugging Face hub may be asked, and a switch that stops every hub request for one load.

Datasets (data/hub.py) and pretrained CLIP weights (models/loading.py) both come through huggingface_hub, which
otherwise retries a dead network for most of a minute before it says the file is missing.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request
from contextlib import contextmanager

OFFLINE_FLAGS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
_TRUE = {"1", "ON", "YES", "TRUE"}
PROBE_TIMEOUT_S = 3.0


def offline_reason() -> str | None:
    """Why the hub must not be asked (an env flag, or no answer), or None when it is reachable."""
    from huggingface_hub import constants

    flags = [flag for flag in OFFLINE_FLAGS if os.environ.get(flag, "").strip().upper() in _TRUE]
    if flags:
        return f"offline ({'/'.join(flags)} is set)"
    endpoint = constants.ENDPOINT
    try:
        urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=PROBE_TIMEOUT_S).close()
    except urllib.error.HTTPError:
        return None  # an error status is still an answer
    except OSError:  # DNS failure, refused, timed out
        return f"unreachable ({endpoint} did not answer within {PROBE_TIMEOUT_S:g} s)"
    return None


@contextmanager
def hub_requests_off(offline: bool):
    """huggingface_hub (and datasets, when imported) read their offline flag once, at import; a flag set later
    (or a dead hub) must still stop every request, so flip them for the duration of one load."""
    from huggingface_hub import constants

    modules = [constants] + ([sys.modules["datasets"].config] if "datasets" in sys.modules else [])
    saved = [module.HF_HUB_OFFLINE for module in modules]
    if offline:
        for module in modules:
            module.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        for module, value in zip(modules, saved):
            module.HF_HUB_OFFLINE = value
