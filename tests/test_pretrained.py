"""GPT-2 weights in and out: parity with transformers' GPT2LMHeadModel, export, round trip.

Real OpenAI checkpoints cannot be downloaded here, so each test builds a random-weight transformers
GPT-2 of the shape it needs and saves it with save_pretrained: the same directory format the hub serves.
"""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import GPT2LMHeadModel

import hellaswag
import train_gpt2
from conftest import run_script, step_losses
from machinery.pretrained import PRETRAINED
from machinery.tokens import GPT2_VOCAB_SIZE, tokenize_file
from train_gpt2 import GPT, GPTConfig, main

SHAPES = [  # (n_layer, n_head, n_embd, n_positions)
    (2, 2, 32, 64),
    (3, 4, 64, 128),
    (12, 12, 768, 1024),  # GPT-2 124M
]


@pytest.mark.parametrize("n_layer,n_head,n_embd,n_positions", SHAPES)
def test_logits_loss_and_greedy_generation_match_transformers(hf_gpt2_dir, n_layer, n_head, n_embd, n_positions):
    path, hf = hf_gpt2_dir(n_layer, n_head, n_embd, n_positions)
    ours = GPT.from_pretrained(str(path)).eval()
    assert (ours.config.n_layer, ours.config.n_head, ours.config.n_embd, ours.config.block_size) == \
        (n_layer, n_head, n_embd, n_positions)
    assert ours.lm_head.weight is ours.transformer.wte.weight  # still tied after loading

    torch.manual_seed(0)
    idx = torch.randint(0, GPT2_VOCAB_SIZE, (2, 24))
    targets = torch.randint(0, GPT2_VOCAB_SIZE, (2, 24))
    with torch.no_grad():
        logits, loss = ours(idx, targets)
        ref = hf(idx, labels=None)
    ref_loss = torch.nn.functional.cross_entropy(ref.logits.view(-1, ref.logits.size(-1)), targets.view(-1))
    assert (logits - ref.logits).abs().max().item() <= 1e-4  # fp32
    assert abs(loss.item() - ref_loss.item()) <= 1e-5

    prompt = idx[:1, :8]
    greedy = ours.generate(prompt, 20, temperature=0)
    ref_greedy = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=20,
                             min_new_tokens=20, do_sample=False, pad_token_id=0)
    assert torch.equal(greedy, ref_greedy)


def test_explicit_attention_path_matches_transformers_too(hf_gpt2_dir):
    path, hf = hf_gpt2_dir(2, 2, 32, 64)
    ours = GPT.from_pretrained(str(path), sdpa=False)
    assert not any(block.attn.sdpa for block in ours.transformer.h)
    idx = torch.randint(0, GPT2_VOCAB_SIZE, (2, 30))
    with torch.no_grad():
        assert (ours(idx)[0] - hf(idx).logits).abs().max().item() <= 1e-4


def test_unknown_name_lists_valid_ones():
    with pytest.raises(ValueError) as err:
        GPT.from_pretrained("gpt3")
    for name in PRETRAINED:
        assert name in str(err.value)


def test_transformers_4_style_state_dict_loads(hf_gpt2_dir, monkeypatch):
    """transformers 4.x kept mask buffers (attn.bias, attn.masked_bias) in state dicts; 5.x does not
    and may leave out the tied lm_head.weight. Both load."""
    path, hf = hf_gpt2_dir(2, 2, 32, 64)
    load = GPT2LMHeadModel.from_pretrained

    def load_v4_style(*args, **kwargs):
        model, info = load(*args, **kwargs)  # (output_loading_info=True: what the file lacked)
        sd = dict(model.state_dict())
        for i in range(model.config.n_layer):
            sd[f"transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(64, 64)).view(1, 1, 64, 64)
            sd[f"transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
        sd.pop("lm_head.weight")
        model.state_dict = lambda *a, **k: sd
        return model, info

    monkeypatch.setattr(GPT2LMHeadModel, "from_pretrained", load_v4_style)
    ours = GPT.from_pretrained(str(path))
    idx = torch.randint(0, GPT2_VOCAB_SIZE, (1, 10))
    with torch.no_grad():
        assert (ours(idx)[0] - hf(idx).logits).abs().max().item() <= 1e-4


def test_padded_vocabulary_loads_a_50257_checkpoint(hf_gpt2_dir):
    path, hf = hf_gpt2_dir(2, 2, 32, 64)
    ours = GPT.from_pretrained(str(path), vocab_size=50304).eval()
    assert ours.transformer.wte.weight.shape == (50304, 32)
    torch.testing.assert_close(ours.transformer.wte.weight[:GPT2_VOCAB_SIZE], hf.transformer.wte.weight,
                               rtol=0, atol=0)
    idx = torch.randint(0, GPT2_VOCAB_SIZE, (1, 10))
    with torch.no_grad():
        logits = ours(idx)[0]
        assert (logits[..., :GPT2_VOCAB_SIZE] - hf(idx).logits).abs().max().item() <= 1e-4


def test_shape_flags_that_contradict_the_weights_are_refused_in_one_line(tmp_path, hf_gpt2_dir, capsys):
    """OpenAI's weights and a save_pretrained folder decide the model's shape, as a checkpoint does: a shape
    flag that contradicts them is named in one line before anything is loaded (it used to be ignored without
    a word). A bigger --vocab_size pads the table (the test above); a smaller one is refused."""
    path, _ = hf_gpt2_dir(2, 2, 32, 64)
    capsys.readouterr()  # (save_pretrained's progress bar)
    run = ["--max_steps", "0", "--num_samples", "0", "--device", "cpu", "--out_dir", str(tmp_path / "out")]
    for flags, says in ((["--n_layer", "5"], "has n_layer=2; the command line says n_layer=5"),
                        (["--block_size", "32", "--n_head", "2"], "has block_size=64; the command line says "
                                                                  "block_size=32"),
                        (["--vocab_size", "1000"], "has vocab_size=50257; the command line says vocab_size=1000")):
        assert main(["--init_from", str(path), *flags, *run]) == 1
        assert capsys.readouterr().err == f"error: {str(path)!r} {says} (leave these flags out: the model decides " \
                                          "them)\n"
    # a table with fewer rows than GPT-2's tokens (a model of another tokenizer), as a checkpoint's
    small, _ = hf_gpt2_dir(2, 2, 32, 64, vocab_size=100)
    capsys.readouterr()
    assert main(["--init_from", str(small), *run]) == 1
    assert capsys.readouterr().err == f"error: {str(small)!r} has a vocabulary of 100 tokens, fewer than GPT-2's " \
                                      "50,257: GPT-2's tokens would index past its table\n"
    # by name: the shape is known without the weights (none are downloaded: this machine has no network)
    assert main(["--init_from", "gpt2-xl", "--n_layer", "12", *run]) == 1
    assert capsys.readouterr().err == "error: 'gpt2-xl' has n_layer=48; the command line says n_layer=12 (leave " \
                                      "these flags out: the model decides them)\n"
    # a config.json whose shape is not whole numbers: that is the line (not a traceback, not a clash)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "n_layer": 0}))
    assert main(["--init_from", str(path), "--n_layer", "2", *run]) == 1
    assert capsys.readouterr().err == f"error: {str(path)!r} config.json: n_layer is 0, not a whole number >= 1\n"
    (path / "config.json").write_text(json.dumps(config))
    # the weights' own values, or a padded vocabulary, contradict nothing
    assert main(["--init_from", str(path), "--n_layer", "2", "--block_size", "64", "--vocab_size", "50304", *run]) == 0
    assert "model " + str(path) + " | 2 layers, 2 heads, 32 channels, vocab 50304, block 64" in capsys.readouterr().out


@pytest.mark.parametrize("vocab_size", [GPT2_VOCAB_SIZE, 50304])
def test_save_pretrained_loads_in_transformers_and_back(tmp_path, vocab_size):
    """Our export is a transformers GPT-2 directory: same logits (1e-4, fp32), same greedy text;
    a padded table is trimmed to the 50257 real tokens; our from_pretrained reads it back exactly."""
    torch.manual_seed(0)
    ours = GPT(GPTConfig(block_size=64, vocab_size=vocab_size, n_layer=2, n_head=2, n_embd=32)).eval()
    with torch.no_grad():  # move off the init, so a missed transpose or bias would show
        for p in ours.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ours.save_pretrained(tmp_path)
    hf = GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    assert hf.config.vocab_size == GPT2_VOCAB_SIZE
    idx = torch.randint(0, GPT2_VOCAB_SIZE, (2, 20))
    with torch.no_grad():
        logits = ours(idx)[0][..., :GPT2_VOCAB_SIZE]
        assert (logits - hf(idx).logits).abs().max().item() <= 1e-4
    prompt = idx[:1, :5]
    ref = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=20,
                      min_new_tokens=20, do_sample=False, pad_token_id=0)
    assert torch.equal(ours.generate(prompt, 20, temperature=0), ref)

    back = GPT.from_pretrained(str(tmp_path))
    for (name, p), (name_back, p_back) in zip(ours.state_dict().items(), back.state_dict().items()):
        assert name == name_back
        torch.testing.assert_close(p[: p_back.shape[0]], p_back, rtol=0, atol=0)


def test_fine_tuning_starts_from_the_weights_of_a_local_gpt2_directory(tmp_path, hf_gpt2_dir, text_file, capsys):
    """--init_from DIR trains DIR's weights: step 0's loss (computed before the first update) is
    transformers' loss of that model on the first batch, the first B*T+1 tokens of the training split
    (x the first B*T, y the same shifted by one). float32: equal to 1e-5 nats (the losses are ~10.8).
    Two steps trained (0 and 1), then the final evaluation of the trained model, at step 2."""
    import json

    path, hf = hf_gpt2_dir(2, 2, 32, 64)
    B, T = 2, 16
    out = tmp_path / "out"
    assert main(["--init_from", str(path), "--input_file", str(text_file), "--max_steps", "2", "--B", str(B),
                 "--T", str(T), "--device", "cpu", "--dtype", "float32", "--num_samples", "1",
                 "--max_new_tokens", "4", "--out_dir", str(out)]) == 0
    printed = capsys.readouterr().out
    assert list(step_losses(printed)) == [0, 1]
    assert f"| {hf.num_parameters():,} parameters" in printed  # transformers' count (the tied matrix once)
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [0, 1, 2] and "loss" not in log[2]

    first = torch.from_numpy(tokenize_file(text_file)[: B * T + 1].astype("int64"))  # the train split starts the file
    x, y = first[:-1].view(B, T), first[1:].view(B, T)
    with torch.no_grad():
        logits = hf(x).logits  # (B, T, V)
    ref = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1)).item()
    assert abs(log[0]["loss"] - ref) <= 1e-5, (log[0]["loss"], ref)


def test_eval_only_gives_the_validation_loss_transformers_gives(tmp_path, hf_gpt2_dir, text_file, capsys, monkeypatch):
    """--init_from DIR --eval_only: the loss a run would report for DIR's model before training, without
    training or writing anything. Its validation batches are the last 10% of the file's tokens, read
    from the start in windows of B*T (+1 for the last target); transformers' mean loss over the same
    eval_iters batches, float32: equal to 1e-5 nats (losses of ~10.8, averaged over 3 batches)."""
    path, hf = hf_gpt2_dir(2, 2, 32, 64)
    B, T, eval_iters = 2, 16, 3
    monkeypatch.chdir(tmp_path)  # out_dir is the default, out/, here
    evaluate, results = train_gpt2.evaluate, []  # what it printed, unrounded
    monkeypatch.setattr(train_gpt2, "evaluate", lambda *a: results.append(evaluate(*a)) or results[-1])
    assert main(["--init_from", str(path), "--input_file", str(text_file), "--eval_only", "--B", str(B),
                 "--T", str(T), "--eval_iters", str(eval_iters), "--device", "cpu", "--dtype", "float32"]) == 0
    stdout = capsys.readouterr().out
    lines = [l for l in stdout.splitlines() if l.startswith("step")]
    assert lines == [f"step     0 | val loss {results[0]['val_loss']:.4f}"]

    tokens = tokenize_file(text_file)
    val = torch.from_numpy(tokens[int(len(tokens) * 0.9):].astype("int64"))
    losses = []
    for i in range(eval_iters):
        window = val[i * B * T: (i + 1) * B * T + 1]
        x, y = window[:-1].view(B, T), window[1:].view(B, T)
        with torch.no_grad():
            logits = hf(x).logits
        losses.append(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1)).item())
    ref = sum(losses) / eval_iters
    assert results == [{"val_loss": pytest.approx(ref, abs=1e-5)}]
    assert "| loss" not in stdout and not (tmp_path / "out").exists()


def test_transformers_that_cannot_load_pytorch_models_is_one_line(tmp_path, hf_gpt2_dir, capsys, monkeypatch):
    """transformers disables its PyTorch models when it finds a torch older than it supports, and says
    so in a long ImportError when one is loaded: one line, with both versions and what to do."""
    import transformers

    path, _ = hf_gpt2_dir(2, 2, 32, 64)

    def disabled(*args, **kwargs):
        raise ImportError("\nGPT2LMHeadModel requires PyTorch >= 2.6, but PyTorch was not found or an older "
                          "version is installed.\nPlease check out the instructions on the installation page ...")

    monkeypatch.setattr(GPT2LMHeadModel, "from_pretrained", disabled)
    monkeypatch.chdir(tmp_path)
    assert main(["--init_from", str(path), "--max_steps", "0", "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: transformers "), err
    assert f"transformers {transformers.__version__}" in err and f"torch {torch.__version__}" in err
    assert "requires PyTorch >= 2.6" in err and "pip install -r requirements.txt" in err


def bert_dir(folder):
    """A BERT saved with save_pretrained: a transformers directory, but not GPT-2's."""
    from transformers import BertConfig, BertForMaskedLM

    BertForMaskedLM(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=64)).save_pretrained(folder)
    return folder


def without_a_tensor(hf_gpt2_dir):
    """A GPT-2 directory whose model.safetensors lost one tensor (an edit, a converter that dropped it)."""
    from safetensors.torch import load_file, save_file

    path, _ = hf_gpt2_dir()
    tensors = load_file(path / "model.safetensors")
    del tensors["transformer.h.0.attn.c_attn.weight"]
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    return path


def test_a_folder_that_is_not_gpt2_is_refused_in_one_line(tmp_path, capfd, monkeypatch):
    """transformers loads a BERT into GPT-2 with random numbers for every weight it lacks: training would
    start from noise. One line instead, from the config's model_type, before any loading."""
    path = bert_dir(tmp_path / "bert")
    monkeypatch.chdir(tmp_path)
    capfd.readouterr()  # (what making it printed)
    assert main(["--init_from", str(path), "--max_steps", "0", "--device", "cpu"]) == 1
    assert capfd.readouterr().err == f"error: {str(path)!r} is a bert model, not GPT-2\n"
    assert not (tmp_path / "out").exists()


def test_a_weights_file_that_lacks_a_tensor_is_refused_in_one_line(tmp_path, hf_gpt2_dir):
    """transformers fills a tensor missing from model.safetensors with random numbers, after a table of
    what it lacked. The command (its stderr as a user sees it: the table is transformers' logging) says
    it in one line instead."""
    path = without_a_tensor(hf_gpt2_dir)
    r = run_script("--init_from", path, "--max_steps", "0", cwd=tmp_path)
    assert r.returncode == 1 and r.stderr == (f"error: {str(path)!r} lacks 1 of GPT-2's 28 tensors, "
                                              "e.g. transformer.h.0.attn.c_attn.weight\n"), r.stderr
    assert not (tmp_path / "out").exists()


# A save_pretrained folder damaged in each way a user's could be: transformers loads some of them without a
# word (a model ours cannot hold, weights that are not their config's, NaN), fails on others in a traceback
# or a line that names nothing. Each is one line naming the problem. The damages (to a 2-layer, 2-head,
# 32-channel GPT-2, hf_gpt2_dir's):

def set_config(path, **fields):
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, **fields}))


def set_tensor(path, name, value):
    """model.safetensors with tensor `name` replaced by `value` (or added)."""
    tensors = load_file(path / "model.safetensors")
    tensors[name] = value
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def poison(path, name, value):
    """One element of tensor `name` set to `value` (NaN, inf)."""
    tensors = load_file(path / "model.safetensors")
    tensors[name].view(-1)[3] = value
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def untie(path):
    """An lm_head of its own, as a model trained with tie_word_embeddings false has."""
    set_config(path, tie_word_embeddings=False)
    set_tensor(path, "lm_head.weight", torch.randn(GPT2_VOCAB_SIZE, 32))


def remove(path, name):
    (path / name).unlink()


def replace_by_folder(path, name):
    remove(path, name)
    (path / name).mkdir()


def write(path, name, text):
    (path / name).write_text(text)


def cut(path, name, keep):
    """The file cut to its first `keep` of its bytes (a copy that stopped)."""
    data = (path / name).read_bytes()
    (path / name).write_bytes(data[: int(len(data) * keep)])


def as_pytorch_bin(path, keep):
    """The weights as the older pytorch_model.bin (torch.save's zip), cut to `keep` of its bytes."""
    torch.save(load_file(path / "model.safetensors"), path / "pytorch_model.bin")
    remove(path, "model.safetensors")
    cut(path, "pytorch_model.bin", keep)


NOT_TIED = "{p}: its lm_head is not tied to its token table, as GPT-2's is: this model cannot hold it"
MISFIT = "{p}: its weights do not fit its config.json: "
DAMAGED = [  # (damage, its arguments, the line: {p} the folder's repr)
    pytest.param(untie, {}, NOT_TIED, id="untied-lm_head"),
    pytest.param(set_config, dict(n_layer=1), MISFIT + "transformer.h.1.attn.c_attn.weight is in the weights, not "
                 "in a model of config.json's shape (and 10 more)", id="config-fewer-layers"),
    pytest.param(set_config, dict(n_positions=16), MISFIT + "transformer.wpe.weight is (64, 32) in the weights, "
                 "(16, 32) by config.json", id="config-n_positions"),
    pytest.param(set_config, dict(n_embd=64), MISFIT + "transformer.h.0.attn.c_attn.bias is (96,) in the weights, "
                 "(192,) by config.json (and 27 more)", id="config-n_embd"),
    pytest.param(set_config, dict(vocab_size=60000), MISFIT + "transformer.wte.weight is (50257, 32) in the "
                 "weights, (60000, 32) by config.json", id="config-vocab_size"),
    pytest.param(set_tensor, dict(name="transformer.h.1.mlp.c_fc.weight", value=torch.zeros(32, 100)),
                 MISFIT + "transformer.h.1.mlp.c_fc.weight is (32, 100) in the weights, (32, 128) by config.json",
                 id="one-tensor-misshapen"),
    pytest.param(set_config, dict(n_head=0), "{p} config.json: n_head is 0, not a whole number >= 1", id="n_head-0"),
    pytest.param(set_config, dict(n_layer=None), "{p} config.json: n_layer is null, not a whole number >= 1",
                 id="n_layer-null"),
    pytest.param(set_config, dict(n_layer="two"), '{p} config.json: n_layer is "two", not a whole number >= 1',
                 id="n_layer-string"),
    pytest.param(set_config, dict(vocab_size=0), "{p} config.json: vocab_size is 0, not a whole number >= 1",
                 id="vocab_size-0"),  # (read before the weights: not "a vocabulary of 0 tokens")
    pytest.param(set_config, dict(vocab_size=50257.0), "{p} config.json: vocab_size is 50257.0, not a whole number "
                 ">= 1", id="vocab_size-float"),
    pytest.param(set_config, dict(resid_pdrop="x"), "{p} config.json: Field 'resid_pdrop' with value 'x' doesn't "
                 "match any type in (<class 'float'>, <class 'int'>)", id="other-field-mistyped"),
    pytest.param(set_config, dict(n_inner=16), "{p} config.json: n_inner is 16, where GPT-2's is 4 x n_embd = 128: "
                 "this model cannot hold it", id="n_inner"),
    pytest.param(set_config, dict(dtype="float99"), '{p} config.json: dtype is "float99", not one of null, "float32", '
                 '"float16", "bfloat16", "float64"', id="dtype-unknown"),
    pytest.param(set_config, dict(torch_dtype="int64"), '{p} config.json: torch_dtype is "int64", not one of null, '
                 '"float32", "float16", "bfloat16", "float64"', id="torch_dtype-integer"),
    pytest.param(set_config, dict(dtype="float8_e4m3fn"), '{p} config.json: dtype is "float8_e4m3fn", not one of '
                 'null, "float32", "float16", "bfloat16", "float64"', id="dtype-float8"),
    pytest.param(set_config, dict(n_head=3), "{p} config.json: n_embd 32 is not a multiple of n_head 3",
                 id="n_head-not-dividing"),
    pytest.param(set_config, dict(activation_function="relu"), '{p} config.json: activation_function is "relu", '
                 'where GPT-2\'s is "gelu_new": this model cannot hold it', id="relu"),
    pytest.param(remove, dict(name="config.json"), "{p} has no config.json (save_pretrained writes one beside the "
                 "weights)", id="no-config"),
    pytest.param(replace_by_folder, dict(name="config.json"), "{p} config.json is not a file", id="config-folder"),
    pytest.param(write, dict(name="config.json", text="{"), "{p} config.json is not JSON: Expecting property name "
                 "enclosed in double quotes: line 1 column 2 (char 1)", id="config-not-json"),
    pytest.param(remove, dict(name="model.safetensors"), "{p} holds no weights file (model.safetensors or "
                 "pytorch_model.bin)", id="no-weights"),
    pytest.param(cut, dict(name="model.safetensors", keep=0.5), "{p}: its weights file model.safetensors cannot be "
                 "read (damaged or truncated?): Error while deserializing header: incomplete metadata, file not "
                 "fully covered", id="safetensors-truncated"),
    pytest.param(as_pytorch_bin, dict(keep=0.5), "{p}: its weights file pytorch_model.bin cannot be read (damaged "
                 "or truncated?): PytorchStreamReader failed reading zip archive: failed finding central directory",
                 id="bin-truncated"),
    pytest.param(as_pytorch_bin, dict(keep=0), "{p}: its weights file pytorch_model.bin cannot be read (damaged or "
                 "truncated?): EOFError", id="bin-empty"),
    pytest.param(poison, dict(name="transformer.h.0.ln_1.weight", value=float("nan")), "{p}: its weight "
                 "transformer.h.0.ln_1.weight holds NaN or inf", id="nan"),
    pytest.param(poison, dict(name="transformer.h.1.mlp.c_proj.bias", value=float("inf")), "{p}: its weight "
                 "transformer.h.1.mlp.c_proj.bias holds NaN or inf", id="inf"),
]


def damaged_dir(hf_gpt2_dir, damage, arguments, capfd):
    path, _ = hf_gpt2_dir()
    damage(path, **arguments)
    capfd.readouterr()  # (what making it printed)
    return path


@pytest.mark.parametrize("damage,arguments,says", DAMAGED)
def test_a_damaged_save_pretrained_folder_is_refused_in_one_line(tmp_path, hf_gpt2_dir, capfd, monkeypatch, damage,
                                                                  arguments, says):
    path = damaged_dir(hf_gpt2_dir, damage, arguments, capfd)
    monkeypatch.chdir(tmp_path)
    assert main(["--init_from", str(path), "--max_steps", "0", "--device", "cpu"]) == 1
    assert capfd.readouterr().err == "error: " + says.format(p=repr(str(path))) + "\n"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("damage,arguments,says", [case for case in DAMAGED if case.id in
                                                   ("untied-lm_head", "vocab_size-0", "bin-truncated", "nan")])
def test_hellaswag_refuses_a_damaged_folder_in_the_same_line(items_file, hf_gpt2_dir, capfd, damage, arguments, says):
    """hellaswag.py loads through the same GPT.from_pretrained (after its own look at the vocabulary): a NaN
    scored chance (acc 0.3333 on its items), an untied lm_head another model's accuracy."""
    path = damaged_dir(hf_gpt2_dir, damage, arguments, capfd)
    assert hellaswag.main(["--init_from", str(path), "--data", str(items_file), "--device", "cpu"]) == 1
    assert capfd.readouterr() == ("", "error: " + says.format(p=repr(str(path))) + "\n")


def test_openai_weights_damaged_in_the_hubs_cache_are_named_as_such(tmp_path, hf_gpt2_dir):
    """--init_from gpt2 whose copy in the hub's cache is cut short (a download killed, a disk that filled): the
    line says the cached file is damaged and which folder to delete, not that the model is not cached."""
    path, _ = hf_gpt2_dir()
    snapshot = tmp_path / "hf" / "hub" / "models--gpt2" / "snapshots" / ("0" * 40)  # the hub cache's layout
    snapshot.mkdir(parents=True)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0" * 40)
    (snapshot / "config.json").write_bytes((path / "config.json").read_bytes())
    (snapshot / "model.safetensors").write_bytes((path / "model.safetensors").read_bytes()[:10_000])
    r = run_script("--init_from", "gpt2", "--max_steps", "0", cwd=tmp_path, env_extra={"HF_HOME": str(tmp_path / "hf")})
    assert r.returncode == 1 and r.stderr.startswith(
        "error: could not load GPT-2 weights from 'gpt2': its copy in the hub's cache cannot be read (damaged or "
        "truncated?): "), r.stderr
    assert r.stderr.endswith(f"; delete {tmp_path / 'hf' / 'hub' / 'models--gpt2'} to download it again\n")
    assert r.stderr.count("\n") == 1


def test_a_config_whose_model_ram_cannot_hold_is_said_before_transformers_builds_it(items_file, hf_gpt2_dir, capfd,
                                                                                     monkeypatch):
    """transformers makes config.json's model in float32 before reading a weight: an n_positions edited to a
    billion (32 billion parameters at this width, 119 GiB) on a machine of 16 GiB is that one line, from either
    script, not the allocator's failure blamed on the weights file (which is whole)."""
    import machinery.pretrained

    path = damaged_dir(hf_gpt2_dir, set_config, dict(n_positions=10**9), capfd)
    monkeypatch.setattr(machinery.pretrained, "ram_bytes", lambda: 16 * 2**30)
    n_params = (GPT2_VOCAB_SIZE + 10**9) * 32 + 2 * (12 * 32 * 32 + 13 * 32) + 2 * 32  # (counted as GPT's are)
    assert n_params == sum(p.numel() for p in GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=1)
                                                  ).parameters()) + (10**9 - 1) * 32
    says = (f"error: {str(path)!r} config.json describes a model of {n_params:,} parameters (n_layer 2, n_embd 32, "
            f"n_positions 1000000000): 119.2 GiB in float32, more than this machine's 16.0 GiB of RAM\n")
    assert main(["--init_from", str(path), "--max_steps", "0", "--device", "cpu"]) == 1
    assert capfd.readouterr().err == says
    assert hellaswag.main(["--init_from", str(path), "--data", str(items_file), "--device", "cpu"]) == 1
    assert capfd.readouterr() == ("", says)


def test_openai_files_with_their_mask_buffers_load(hf_gpt2_dir):
    """OpenAI's files on the hub name their tensors without "transformer." and keep transformers 4.x's
    attention masks (attn.bias, attn.masked_bias), which transformers lists as unexpected: constants, not
    weights the config has no place for. They load, with transformers' logits."""
    path, hf = hf_gpt2_dir()
    tensors = {k.removeprefix("transformer."): v for k, v in load_file(path / "model.safetensors").items()}
    for i in range(2):
        tensors[f"h.{i}.attn.bias"] = torch.tril(torch.ones(64, 64)).view(1, 1, 64, 64)
        tensors[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    idx = torch.randint(0, GPT2_VOCAB_SIZE, (1, 10))
    with torch.no_grad():
        assert (GPT.from_pretrained(str(path))(idx)[0] - hf(idx).logits).abs().max().item() <= 1e-4
