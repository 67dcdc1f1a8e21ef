"""The model: attention paths, initialisation, weight tying, the loss at init, learning, generation."""

import math

import pytest
import torch

import torch.nn.functional as F

from machinery.loss import linear_cross_entropy
from machinery.tokens import GPT2_VOCAB_SIZE
from train_gpt2 import GPT, CausalSelfAttention, GPTConfig

TINY = GPTConfig(block_size=64, vocab_size=GPT2_VOCAB_SIZE, n_layer=2, n_head=2, n_embd=32)


@pytest.mark.parametrize("T", [1, 7, 64])
def test_fused_and_explicit_attention_agree(T):
    """F.scaled_dot_product_attention(is_causal=True) computes the explicit masked softmax (fp32, 1e-5)."""
    torch.manual_seed(0)
    config = GPTConfig(block_size=64, n_head=4, n_embd=64)
    explicit = CausalSelfAttention(GPTConfig(**{**config.__dict__, "sdpa": False}))
    fused = CausalSelfAttention(config)
    fused.load_state_dict(explicit.state_dict())
    x = torch.randn(3, T, 64)
    diff = (explicit(x) - fused(x)).abs().max().item()
    assert diff <= 1e-5


def test_attention_is_causal():
    """Changing a later token never changes an earlier position's output, on both paths."""
    torch.manual_seed(0)
    for sdpa in (True, False):
        model = GPT(GPTConfig(**{**TINY.__dict__, "sdpa": sdpa})).eval()
        idx = torch.randint(0, 1000, (1, 16))
        changed = idx.clone()
        changed[0, 10:] = 7
        a, _ = model(idx)
        b, _ = model(changed)
        torch.testing.assert_close(a[:, :10], b[:, :10])
        assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_the_causal_mask_is_a_constant_buffer_checkpoints_do_not_carry():
    """Each attention's mask is the buffer `bias` (GPT-2's name), (1, 1, block_size, block_size), lower
    triangular; it is not persistent, so the state dict holds the parameters and nothing else (FSDP's other
    processes get the masks from rank 0 apart: tests/test_scale.py trains with --no-sdpa to check it)."""
    model = GPT(TINY)
    n = TINY.block_size
    for block in model.transformer.h:
        assert block.attn.bias.shape == (1, 1, n, n)
        assert torch.equal(block.attn.bias[0, 0], torch.tril(torch.ones(n, n, dtype=torch.bool)))
    assert [name for name, _ in model.named_buffers()] == [f"transformer.h.{i}.attn.bias" for i in range(TINY.n_layer)]
    assert set(model.state_dict()) == {name for name, _ in model.named_parameters(remove_duplicate=False)}


@pytest.fixture(scope="module")
def gpt2_124m():
    torch.manual_seed(1337)
    return GPT(GPTConfig())


def test_124m_parameter_count_and_tying(gpt2_124m):
    model = gpt2_124m
    assert model.lm_head.weight is model.transformer.wte.weight
    # the tied matrix is one Parameter, counted once: GPT-2 small has 124,439,808 parameters
    assert sum(p.numel() for p in model.parameters()) == 124_439_808


def test_init_stds(gpt2_124m):
    """normal(0, 0.02) everywhere, 0.02 / sqrt(2 * n_layer) on the residual projections, zero biases."""
    model = gpt2_124m
    scaled = 0.02 * (2 * 12) ** -0.5
    for name, p in model.named_parameters():
        if name.endswith("bias") and "ln_" not in name:
            assert torch.count_nonzero(p) == 0, name
        elif name.endswith("c_proj.weight"):
            assert p.std().item() == pytest.approx(scaled, rel=0.02), name
        elif p.dim() == 2:  # c_attn, c_fc, wte (= lm_head), wpe
            assert p.std().item() == pytest.approx(0.02, rel=0.02), name
            assert abs(p.mean().item()) < 1e-3, name
        else:  # LayerNorm: gain 1, shift 0
            assert torch.all(p == (1.0 if name.endswith("weight") else 0.0)), name


def test_initial_loss_is_uniform_guess(gpt2_124m):
    """A fresh model predicts nearly uniformly: loss close to ln(50257) = 10.82."""
    torch.manual_seed(0)
    idx = torch.randint(0, GPT2_VOCAB_SIZE, (2, 64))
    targets = torch.randint(0, GPT2_VOCAB_SIZE, (2, 64))
    with torch.no_grad():
        logits, loss = gpt2_124m(idx, targets)
    assert logits.shape == (2, 64, GPT2_VOCAB_SIZE)
    assert abs(loss.item() - math.log(GPT2_VOCAB_SIZE)) < 0.2


def test_weight_tying_survives_to_and_load_state_dict():
    model = GPT(TINY)
    model.to(torch.float64)
    assert model.lm_head.weight is model.transformer.wte.weight
    assert model.lm_head.weight.dtype == torch.float64
    other = GPT(TINY).to(torch.float64)
    other.load_state_dict(model.state_dict())
    assert other.lm_head.weight is other.transformer.wte.weight
    torch.testing.assert_close(other.lm_head.weight, model.transformer.wte.weight, rtol=0, atol=0)


def test_no_targets_gives_no_loss():
    logits, loss = GPT(TINY)(torch.zeros((2, 5), dtype=torch.long))
    assert loss is None and logits.shape == (2, 5, GPT2_VOCAB_SIZE)


def test_sequence_longer_than_block_size_is_a_value_error():
    with pytest.raises(ValueError, match=r"T=65.*block_size=64"):
        GPT(TINY)(torch.zeros((1, 65), dtype=torch.long))


def test_tiny_model_overfits_one_batch():
    """Memorising one batch is the simplest proof that forward, backward and AdamW fit together."""
    torch.manual_seed(0)
    model = GPT(TINY)
    x = torch.randint(0, GPT2_VOCAB_SIZE, (2, 16))
    y = torch.randint(0, GPT2_VOCAB_SIZE, (2, 16))
    optimizer = model.configure_optimizers(weight_decay=0.0, learning_rate=3e-3, device_type="cpu")
    first = None
    for _ in range(150):
        optimizer.zero_grad()
        _, loss = model(x, y)
        loss.backward()
        optimizer.step()
        first = first if first is not None else loss.item()
    assert loss.item() < 0.05 * first


def test_greedy_generation_is_deterministic_and_argmax():
    torch.manual_seed(0)
    model = GPT(TINY).eval()
    idx = torch.tensor([[1, 2, 3]])
    out = model.generate(idx, 5, temperature=0)
    assert out.shape == (1, 8) and torch.equal(out[:, :3], idx)
    # each new token is the argmax of the logits given everything before it
    logits, _ = model(out[:, :-1])
    assert torch.equal(logits[0, 2:].argmax(-1), out[0, 3:])
    assert torch.equal(model.generate(idx, 5, top_k=1), out)  # top-1 sampling is greedy too


def test_a_temperature_near_zero_samples_the_greedy_tokens():
    """Sampling's limit as the temperature goes to 0 is greedy. Logits of about 100 divided by 1e-37
    overflow float32 (inf, and inf - inf is NaN in softmax): taken relative to the best first, they are 0
    for it and -inf for the rest. 1e-300 is 0 in float32: greedy, the limit."""
    torch.manual_seed(0)
    model = GPT(TINY).eval()
    with torch.no_grad():
        model.transformer.ln_f.weight.mul_(1000)  # logits 1000 times as big
    idx = torch.tensor([[1, 2, 3], [4, 5, 6]])
    assert model(idx)[0].max() > 40  # over float32's largest, 3.4e38, once divided by 1e-37
    greedy = model.generate(idx, 6, temperature=0)
    for temperature in (1e-37, 1e-300):
        assert torch.equal(model.generate(idx, 6, temperature=temperature), greedy), temperature


@pytest.mark.parametrize("temperature, top_k", [(0.5, 0), (2.0, 0), (0.7, 20)])
def test_sampling_draws_from_the_softmax_of_the_logits_over_the_temperature(temperature, top_k, monkeypatch):
    """The distribution each token is drawn from is softmax(logits / temperature) over the top_k most likely
    (all of GPT-2's tokens for top_k 0), computed here another way: from the model's own logits, in float64."""
    torch.manual_seed(0)
    model = GPT(TINY).eval()
    idx = torch.tensor([[1, 2, 3], [4, 5, 6]])
    drawn_from, multinomial = [], torch.multinomial
    monkeypatch.setattr(torch, "multinomial", lambda probs, *a, **k: drawn_from.append(probs) or multinomial(probs, *a,
                                                                                                            **k))
    model.generate(idx, 1, temperature=temperature, top_k=top_k)
    with torch.no_grad():
        logits = model(idx)[0][:, -1, :GPT2_VOCAB_SIZE].double()  # (B, V)
    logits = logits.topk(top_k or GPT2_VOCAB_SIZE, dim=-1).values  # (the top_k, best first, as generate orders them)
    expected = torch.softmax(logits / temperature, dim=-1)
    assert torch.allclose(drawn_from[0].double(), expected, rtol=1e-4, atol=1e-7)  # (float32 softmax)


def test_sampling_has_its_own_random_stream():
    """Sampling never draws from torch's global generator, so it cannot change training."""
    model = GPT(TINY).eval()
    idx = torch.zeros((3, 2), dtype=torch.long)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = model.generate(idx, 8, seed=7)
    assert torch.equal(torch.get_rng_state(), before)
    b = model.generate(idx, 8, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)  # the same seed gives the same samples
    assert not torch.equal(a, model.generate(idx, 8, seed=8))


def test_generation_never_emits_padding_ids():
    """With the table padded to 50304, ids 50257.. are not tokens: make them the most likely, and check."""
    model = GPT(GPTConfig(**{**TINY.__dict__, "vocab_size": 50304})).eval()
    with torch.no_grad():
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.fill_(1.0)  # every position's final vector is all ones
        model.lm_head.weight[GPT2_VOCAB_SIZE:] = 1.0  # so padding rows get logit n_embd, far above the rest
    idx = torch.zeros((4, 1), dtype=torch.long)
    logits, _ = model(idx)
    assert logits[0, -1].argmax() >= GPT2_VOCAB_SIZE  # the trap is set
    for kwargs in (dict(temperature=0), dict(top_k=50), dict(top_k=0)):
        out = model.generate(idx, 6, **kwargs)
        assert out.max() < GPT2_VOCAB_SIZE, kwargs


def test_generation_crops_context_to_block_size():
    """Past block_size (64) the model reads the last 64 tokens: every one of them, none dropped."""
    model = GPT(TINY).eval()
    idx = torch.randint(0, 1000, (1, 60), generator=torch.Generator().manual_seed(0))
    seen = []  # the input of each forward pass
    model.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    out = model.generate(idx, 10, temperature=0)
    assert out.shape == (1, 70)
    assert [x.shape[1] for x in seen] == [60, 61, 62, 63, 64, 64, 64, 64, 64, 64]
    assert all(torch.equal(x, out[:, max(0, n - 64):n]) for x, n in zip(seen, range(60, 70)))


def test_the_loss_without_the_logits_matches_the_float64_reference(monkeypatch):
    """linear_cross_entropy(x, W, targets) is F.cross_entropy(x @ W.T, targets): loss and both gradients,
    in float64 by finite differences, and from float32 and bf16-autocast inputs to their precision, with
    chunks of rows that do not divide N (13 and 37 rows in chunks of 4)."""
    import machinery.loss

    monkeypatch.setattr(machinery.loss, "CHUNK_ROWS", 4)
    torch.manual_seed(0)
    small_x, small_w = torch.randn(13, 8, dtype=torch.float64), torch.randn(64, 8, dtype=torch.float64)
    small_targets = torch.randint(0, 64, (13,))
    assert torch.autograd.gradcheck(lambda x, w: linear_cross_entropy(x, w, small_targets),
                                    (small_x.requires_grad_(), small_w.requires_grad_()))
    x64, w64 = torch.randn(37, 16, dtype=torch.float64), torch.randn(1000, 16, dtype=torch.float64)
    targets = torch.randint(0, 1000, (37,))
    x_ref, w_ref = x64.clone().requires_grad_(), w64.clone().requires_grad_()
    ref = F.cross_entropy(x_ref @ w_ref.T, targets)
    ref.backward()
    for autocast, tol in ((False, 2e-6), (True, 2e-2)):
        x, w = x64.float().requires_grad_(), w64.float().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = linear_cross_entropy(x, w, targets)
        loss.backward()
        assert loss.dtype == torch.float32 and (x.grad.dtype, w.grad.dtype) == (torch.float32, torch.float32)
        assert abs(loss.item() - ref.item()) <= tol * ref.item()
        for ours, theirs in ((x.grad, x_ref.grad), (w.grad, w_ref.grad)):
            torch.testing.assert_close(ours.double(), theirs, rtol=0, atol=tol * theirs.abs().max())


def test_the_model_computes_the_same_loss_and_gradients_without_its_logits():
    """GPT.forward with loss_in_chunks (the CPU's path) returns no logits and the plain path's loss and
    gradients (float32: to 1e-5 of each gradient's largest entry)."""
    torch.manual_seed(0)
    plain, chunked = GPT(TINY), GPT(TINY)
    chunked.load_state_dict(plain.state_dict())
    chunked.loss_in_chunks = True
    idx, targets = torch.randint(0, 1000, (2, 9)), torch.randint(0, 1000, (2, 9))
    (logits, loss), (no_logits, chunked_loss) = plain(idx, targets), chunked(idx, targets)
    assert logits.shape == (2, 9, TINY.vocab_size) and no_logits is None
    assert abs(loss.item() - chunked_loss.item()) <= 1e-5
    loss.backward()
    chunked_loss.backward()
    for (name, p), q in zip(plain.named_parameters(), chunked.parameters()):
        assert (q.grad - p.grad).abs().max() <= 1e-5 * p.grad.abs().max(), name


@pytest.mark.parametrize("loss_in_chunks", [False, True])
def test_inputs_and_targets_may_be_two_slices_of_one_batch(loss_in_chunks):
    """model(tokens[:, :-1], tokens[:, 1:]): the targets a slice, not contiguous in memory; the loss is the one
    of contiguous copies (on both loss paths)."""
    torch.manual_seed(0)
    model = GPT(TINY)
    model.loss_in_chunks = loss_in_chunks
    tokens = torch.randint(0, 1000, (3, 10))
    assert not tokens[:, 1:].is_contiguous()
    _, loss = model(tokens[:, :-1], tokens[:, 1:])
    _, copied = model(tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous())
    assert loss.item() == copied.item()


def test_model_loss_equals_f_cross_entropy_on_its_logits():
    model = GPT(TINY)
    idx, targets = torch.randint(0, 1000, (2, 9)), torch.randint(0, 1000, (2, 9))
    logits, loss = model(idx, targets)
    ref = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))
    assert abs(loss.item() - ref.item()) <= 1e-6


# ----------------------------------------------------------------------------- FLOPs, for MFU


@pytest.mark.parametrize("n_layer,n_head,n_embd,T", [(2, 2, 32, 16), (3, 4, 64, 64)])
def test_flops_per_token_is_what_the_matmuls_of_a_training_step_do(n_layer, n_head, n_embd, T):
    """GPT.flops_per_token(T) against torch's own FLOP counter over one forward and backward of the
    explicit attention path (sdpa=False: on the CPU the counter does not see inside SDPA), per token.
    The counter counts matmuls only; 6 N also counts the biases and LayerNorm parameters, 6 FLOPs each
    per token, which no matmul does: with those taken out the two are equal, to the FLOP, and as they
    are within 0.1% (those parameters' share of N, here and at 124M). The counter counts the full T x T
    score matrix, as the 12 L C T term does (causal attention needs half of it; MFU counts it all)."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    B = 3
    model = GPT(GPTConfig(block_size=64, vocab_size=GPT2_VOCAB_SIZE, n_layer=n_layer, n_head=n_head,
                          n_embd=n_embd, sdpa=False))
    idx = torch.randint(0, 1000, (B, T))
    with FlopCounterMode(display=False) as counter:
        model(idx, idx)[1].backward()
    counted = counter.get_total_flops() / (B * T)
    not_matmul = sum(p.numel() for p in model.parameters() if p.dim() == 1)  # biases, LayerNorms
    assert model.flops_per_token(T) - 6 * not_matmul == counted
    assert model.flops_per_token(T) == pytest.approx(counted, rel=1e-3)


def test_flops_per_token_counted_from_the_shapes(gpt2_124m):
    """6 per weight of every matmul (attention 4 C^2 and MLP 8 C^2 per layer, lm_head V C: the tied
    token table once, the position table not at all), 6 per bias and LayerNorm parameter, plus
    attention's q @ k^T and att @ v (4 T C per layer forward, twice that backward). GPT-2 124M at
    T=1024: 855,166,464 FLOPs per token, as nanoGPT's estimate_mfu counts it (6 N + 12 L C T, N without
    the position table)."""
    L, C, V = 12, 768, 50257
    matmul_weights = L * 12 * C * C + V * C
    other = L * (3 * C + C + 4 * C + C + 4 * C) + 2 * C  # c_attn, attn.c_proj, c_fc, mlp.c_proj biases; ln_1/2, ln_f
    for T in (1, 64, 1024):
        assert gpt2_124m.flops_per_token(T) == 6 * (matmul_weights + other) + 12 * L * C * T
    assert gpt2_124m.flops_per_token(1024) == 855_166_464


@pytest.mark.parametrize("probe, values", [
    ("COMPILE_PROBE", dict(how="eager", n_layer=1, n_head=2, n_embd=32, B=1, T=16)),
    ("LOSS_PROBE", dict(how="chunked", rows=64)),
    ("CHECKPOINTING_PROBE", dict(mode="selective", n_layer=2, n_head=2, n_embd=32, B=1, T=16, steps=2))])
def test_each_benchmark_probe_runs_and_gives_its_numbers(probe, values):
    """tests/benchmark.py measures compile time, the loss's memory and checkpointing's costs in fresh processes
    (probe), and prints a probe's error as its row: a probe that stopped with an error (a name the script lacks)
    would fill a GPU session's table with one line each. Here each runs at a tiny shape on the CPU."""
    import benchmark

    result = benchmark.probe(getattr(benchmark, probe), **values)
    assert isinstance(result, list) and result, result  # (an error: its first line, a string)


def test_benchmark_counts_flops_as_the_training_script_does(gpt2_124m, capsys):
    """tests/benchmark.py's GFLOP/s and MFU columns use GPT.flops_per_token, so its figures and the step
    line's agree. Importing it runs nothing (pytest does not collect it; this imports it, again if an
    earlier test did)."""
    import importlib

    import benchmark

    importlib.reload(benchmark)
    assert capsys.readouterr() == ("", "")
    for B, T in ((4, 32), (16, 1024)):
        assert benchmark.model_flops_per_step(B, T, 50257) == B * T * gpt2_124m.flops_per_token(T)
    # the GPU runs' padded table (50304 rows) counts too: 47 more rows of lm_head, 6 FLOPs a weight
    assert benchmark.model_flops_per_step(2, 8, 50304) - benchmark.model_flops_per_step(2, 8, 50257) == \
        2 * 8 * 6 * 47 * 768
