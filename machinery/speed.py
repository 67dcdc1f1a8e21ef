"""
Speed: how well the hardware is used. The model's FLOPs per second (from GPT.flops_per_token) against
the GPU's dense bf16 peak, from a table of the GPUs reproducers use: the TFLOP/s and MFU on every step
line and in the log. tests/benchmark.py uses the same table.
"""

import re

import torch


# Dense bfloat16 tensor-core peaks in TFLOP/s (without sparsity: NVIDIA quotes twice these "with
# sparsity"), from NVIDIA's datasheets and architecture whitepapers, matched against
# torch.cuda.get_device_name() in this order (the first match wins).
BF16_PEAK_TFLOPS = (
    (r"H100.*PCIe", 756.5),  # H100 PCIe datasheet: 1,513 with sparsity
    (r"H100 NVL", 835.5),  # H100 NVL datasheet: 1,671 with sparsity
    (r"H100", 989.5),  # H100 SXM5 datasheet ("NVIDIA H100 80GB HBM3"): 1,979 with sparsity
    (r"H200 NVL", 835.5),  # H200 NVL datasheet: 1,671 with sparsity
    (r"H200", 989.5),  # H200 SXM datasheet: 1,979 with sparsity
    (r"A100", 312.0),  # A100 datasheet, SXM4 and PCIe, 40 and 80 GB: 624 with sparsity
    (r"L40S", 362.05),  # L40S datasheet: 733 with sparsity
    (r"\bL40\b", 181.05),  # L40 datasheet: 362.1 with sparsity
    (r"\bL4\b", 121.0),  # L4 datasheet: 242 with sparsity
    (r"\bA10\b", 125.0),  # A10 datasheet: 250 with sparsity (not the A10G, whose clocks differ)
    (r"RTX A6000", 154.8),  # RTX A6000 datasheet: 309.7 with sparsity
    (r"RTX 4090", 165.2),  # Ada (AD102) whitepaper, BF16 with FP32 accumulate: 330.4 with sparsity
    (r"RTX 3090", 71.0),  # Ampere (GA102) whitepaper, BF16 with FP32 accumulate: 142 with sparsity
)


def bf16_peak_tflops(device):
    """The dense bf16 peak of this process's GPU ("cuda:1", or "cuda": the current one), or None where it is not
    known (CPUs, MPS, other GPUs)."""
    if torch.device(device).type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for pattern, peak in BF16_PEAK_TFLOPS if re.search(pattern, name)), None)


def hardware_use(flops_per_token, tokens, seconds, peak_tflops):
    """{"tflops": model TFLOP/s of one process, "mfu": percent of the bf16 peak, where it is known}.
    Model FLOPs count the arithmetic the model needs, not what the kernels do (no recomputation)."""
    tflops = flops_per_token * tokens / seconds / 1e12
    return dict(tflops=tflops, **({"mfu": 100 * tflops / peak_tflops} if peak_tflops else {}))
