"""
The Hugging Face hub, where OpenAI's GPT-2 weights and HellaSwag come from: on a machine that cannot
reach it, its libraries retry every request for half a minute and print each retry. hub_or_cache()
looks the hub's name up each time it is entered; where that fails (no network, no DNS), it puts the
libraries in their offline mode, so that what the hub's cache holds still loads and anything else fails
at once, in our one line. A name that resolves behind a firewall that drops the connection is not
caught: the libraries' own retries then run as before. Used around
GPT-2's weights (pretrained.py) and HellaSwag's download (hellaswag_eval.py).
"""

import contextlib
import os
import socket
import sys
from urllib.parse import urlparse

# where the hub's libraries keep their offline switch once imported
OFFLINE_CONSTANTS = (("huggingface_hub.constants", "HF_HUB_OFFLINE"), ("datasets.config", "HF_HUB_OFFLINE"))


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
    # the libraries read the variable when first imported and keep it as a constant: set both
    imported = [(sys.modules[name], attr) for name, attr in OFFLINE_CONSTANTS if name in sys.modules]
    saved_env, saved = os.environ.get("HF_HUB_OFFLINE"), [getattr(module, attr) for module, attr in imported]
    os.environ["HF_HUB_OFFLINE"] = "1"
    for module, attr in imported:
        setattr(module, attr, True)
    try:
        yield False
    finally:
        for (module, attr), value in zip(imported, saved):
            setattr(module, attr, value)
        if saved_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = saved_env
