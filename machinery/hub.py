"""
The Hugging Face hub, where OpenAI's GPT-2 weights and HellaSwag come from: on a machine that cannot
reach it, its libraries retry every request for half a minute and print each retry. hub_or_cache()
looks the hub's name up each time it is entered; where that fails (no network, no DNS), it puts the
libraries in their offline mode, so that what the hub's cache holds still loads and anything else fails
at once, in our one line. A name that resolves behind a firewall that drops the connection is not
caught: the libraries' own retries then run as before. Used around
GPT-2's weights (pretrained.py) and HellaSwag's download (hellaswag_eval.py); prepare.py asks
hub_reachable() before it lists FineWeb-Edu's files.
"""

import contextlib
import os
import socket
import sys
from urllib.parse import urlparse

# the offline switches: environment variables the hub's libraries read when first imported, and the
# constants they keep them in after (datasets has its own too, HF_DATASETS_OFFLINE, which a user may set)
OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
OFFLINE_CONSTANTS = (("huggingface_hub.constants", "HF_HUB_OFFLINE"), ("datasets.config", "HF_HUB_OFFLINE"),
                     ("datasets.config", "HF_DATASETS_OFFLINE"))


def hub_reachable():
    """Whether the hub's host name resolves (HF_ENDPOINT's, for a mirror); offline mode counts as no."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co").hostname
    try:
        socket.getaddrinfo(host, 443)
    except (OSError, UnicodeError):
        return False
    return True


@contextlib.contextmanager
def hub_or_cache():
    """Within: the hub if it can be reached, else only its local cache (offline mode, set back after).
    Yields whether the hub is reachable."""
    if hub_reachable():
        yield True
        return
    # the libraries read the variables when first imported and keep them as constants: set both
    imported = [(sys.modules[name], attr) for name, attr in OFFLINE_CONSTANTS
                if name in sys.modules and hasattr(sys.modules[name], attr)]
    saved_env = {name: os.environ.get(name) for name in OFFLINE_VARIABLES}
    saved = [getattr(module, attr) for module, attr in imported]
    os.environ.update({name: "1" for name in OFFLINE_VARIABLES})
    for module, attr in imported:
        setattr(module, attr, True)
    try:
        yield False
    finally:
        for (module, attr), value in zip(imported, saved):
            setattr(module, attr, value)
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
