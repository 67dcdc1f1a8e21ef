"""
The loss without the logits: lm_head and the cross-entropy computed together a chunk of rows at a time,
so the (B*T, V) logits, the largest tensors of a training step, are never all in memory. GPT.forward in
train_gpt2.py uses it where the model's `loss_in_chunks` is set (CPUs, where RAM runs out first; see
docs/performance.md for what it saves and costs). The arithmetic is the plain path's: logits in the
autocast dtype, their softmax in float32.
"""

import torch

CHUNK_ROWS = 1024  # rows of logits made at once: 206 MB in float32 at V = 50,304


def linear_cross_entropy(x, weight, targets):
    """F.cross_entropy(x @ weight.T, targets), the mean over the N rows, for x (N, C), weight (V, C) and
    targets (N,), with at most CHUNK_ROWS rows of logits alive at a time. Its gradients are made in the
    same pass (there are no logits left for backward to use); without grad mode, none are."""
    return LinearCrossEntropy.apply(x, weight, targets, torch.is_grad_enabled())


class LinearCrossEntropy(torch.autograd.Function):
    """For each chunk of rows: logits = x @ weight.T, the loss's log-sum-exp and target logit, and the
    gradient of the summed loss with respect to the logits, softmax - one_hot, which gives the chunk's
    share of d/dx (grad_logits @ weight) and d/dweight (grad_logits.T @ x). Backward only scales them.
    The same multiplications as logits, loss and backward unchunked; the memory of one chunk."""

    @staticmethod
    def forward(ctx, x, weight, targets, needs_grad):
        device_type = x.device.type
        # what lm_head would multiply under autocast (bf16, say); float32 without it
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype
        x_low, w_low = x.to(dtype), weight.to(dtype)  # (N, C), (V, C)
        wide = torch.promote_types(dtype, torch.float32)  # softmax and sums: float32 at least
        n = x.size(0)
        total = torch.zeros((), dtype=wide, device=x.device)
        grad_x = torch.empty(x.shape, dtype=wide, device=x.device) if needs_grad else None
        grad_w = torch.zeros(weight.shape, dtype=wide, device=x.device) if needs_grad else None
        for start in range(0, n, CHUNK_ROWS):
            rows = slice(start, start + CHUNK_ROWS)
            logits = (x_low[rows] @ w_low.T).to(wide)  # (rows, V): the only logits there are
            lse = torch.logsumexp(logits, dim=-1)  # (rows,): log of the softmax's denominator
            total += (lse - logits.gather(1, targets[rows, None]).squeeze(1)).sum()  # -log p(target)
            if needs_grad:
                probs = logits.sub_(lse[:, None]).exp_()  # softmax, in the logits' memory
                probs[torch.arange(probs.size(0), device=x.device), targets[rows]] -= 1.0  # minus one-hot
                grad_logits = probs.to(dtype)
                grad_x[rows] = grad_logits @ w_low  # (rows, V) x (V, C) -> (rows, C)
                grad_w += grad_logits.T @ x_low[rows]  # (V, rows) x (rows, C) -> (V, C)
        if needs_grad:
            ctx.save_for_backward(grad_x, grad_w)
            ctx.n, ctx.dtypes = n, (x.dtype, weight.dtype)
        return total / n

    @staticmethod
    def backward(ctx, grad_loss):
        grad_x, grad_w = ctx.saved_tensors
        scale = grad_loss / ctx.n  # the loss is the mean over rows: each row's gradient counts 1/n
        return (grad_x * scale).to(ctx.dtypes[0]), (grad_w * scale).to(ctx.dtypes[1]), None, None
