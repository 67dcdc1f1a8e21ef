"""
The random streams a checkpoint holds, so that a resumed run draws what the uninterrupted one would have:
Python's, NumPy's, torch's (every GPU's too) and the generator the samples are drawn with. Saved as plain
data (lists, tuples, tensors), which torch.load(weights_only=True) reads back.
"""

import random

import numpy as np
import torch


def get_rng_state(sample_generator):
    """Python's, NumPy's, torch's (every GPU's too) and sampling's random streams, as plain data."""
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "sample": sample_generator.get_state()}
    kind, key, pos, has_gauss, gauss = np.random.get_state()
    state["numpy"] = (kind, key.tolist(), pos, has_gauss, gauss)  # plain types: weights_only loads them
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state, sample_generator):
    """Every random stream back as get_rng_state saved it."""
    random.setstate(state["python"])
    kind, key, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.array(key, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    sample_generator.set_state(state["sample"])
    if "cuda" in state and torch.cuda.is_available():
        # one state for each GPU the saving process saw (all of its machine's, under torchrun): a resume that sees
        # fewer (1 GPU of 8, CUDA_VISIBLE_DEVICES) restores those it has, where setting the others would fail
        torch.cuda.set_rng_state_all(state["cuda"][:torch.cuda.device_count()])
