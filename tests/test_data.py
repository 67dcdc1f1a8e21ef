"""Tokenizer (offline) and DataLoaderLite."""

import numpy as np
import pytest
import torch

import machinery.tokens
from machinery.files import SettingError
from machinery.tokens import get_tokenizer, tokenize_file
from train_gpt2 import DataLoaderLite


def test_tokenizer_works_with_the_network_disabled(no_network, tmp_path, monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))  # no cached download to fall back on
    get_tokenizer.cache_clear()
    enc = get_tokenizer()
    # GPT-2's ids for this sentence, as tiktoken.get_encoding("gpt2") gives them
    assert enc.encode("Hello, I'm a language model,") == [15496, 11, 314, 1101, 257, 3303, 2746, 11]
    assert enc.n_vocab == 50257 and enc.eot_token == 50256
    text = "To be, or not to be: that is the question.\n  Ünïcödé ✓ 日本語 \t<|endoftext|>"
    ids = enc.encode_ordinary(text)
    assert enc.decode(ids) == text
    assert 50256 not in ids  # a literal "<|endoftext|>" in data is plain text, not the special token


def test_a_tiktoken_cache_that_cannot_be_written_is_one_line_naming_it(tmp_path, monkeypatch):
    """tiktoken copies even the local vocabulary files into its cache, and a cache folder the user set that
    cannot be written (here a file) stops it: one line that names the setting, not a bare "File exists"."""
    (tmp_path / "a_file").write_text("")
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "a_file"))
    with pytest.raises(SettingError, match=f"tiktoken's cache folder '{tmp_path / 'a_file'}' .* cannot be written "
                                           r"\(File exists\): name another, or set it empty for no cache"):
        get_tokenizer.__wrapped__()  # (not the cached one)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")  # as the line says: no cache, the files read as they are
    assert get_tokenizer.__wrapped__().encode("Hello, I'm a language model,")[:3] == [15496, 11, 314]


def test_data_is_held_compactly_and_split_90_10(text_file):
    tokens = tokenize_file(text_file)
    assert tokens.dtype == np.uint16
    train = DataLoaderLite(2, 8, text_file, split="train")
    val = DataLoaderLite(2, 8, text_file, split="val")
    n_train = int(len(tokens) * 0.9)
    assert np.array_equal(train.tokens, tokens[:n_train])
    assert np.array_equal(val.tokens, tokens[n_train:])  # validation is never trained on


def counting_tokens(monkeypatch, n):
    """Make every text file read as the tokens 0, 1, ..., n-1, so positions are visible in batches."""
    monkeypatch.setattr(machinery.tokens, "tokenize_file", lambda path: np.arange(n, dtype=np.uint16))


def test_batches_are_shifted_contiguous_and_wrap(tmp_path, monkeypatch):
    counting_tokens(monkeypatch, 100)
    loader = DataLoaderLite(B=3, T=10, input_file=tmp_path / "any.txt")
    seen = []
    for _ in range(4):
        x, y = loader.next_batch()
        assert x.shape == y.shape == (3, 10) and x.dtype == torch.long
        assert torch.equal(y.flatten()[:-1], x.flatten()[1:])  # y is x shifted by one
        seen.append(x.flatten())
    assert torch.equal(seen[0], torch.arange(0, 30))  # contiguous rows, in order
    assert torch.equal(seen[1], torch.arange(30, 60))
    assert torch.equal(seen[2], torch.arange(60, 90))  # 90..120 would run past 100 tokens:
    assert torch.equal(seen[3], torch.arange(0, 30))  # so it wraps to the start


@pytest.mark.parametrize("n_tokens,starts", [(91, [0, 30, 60]), (90, [0, 30]), (31, [0])])
def test_a_window_is_served_exactly_when_its_last_target_fits(tmp_path, monkeypatch, n_tokens, starts):
    """Windows of W = B*T = 30 tokens start at p = 0, 30, 60, ... and one is served when p + W + 1 <= L,
    the +1 for its last target. L = 91: the window at 60 ends exactly there (its last target is token
    90, the last one), then the loader wraps. L = 90: that window would need token 90, so the loader
    wraps after the window at 30. L = 31, the shortest text that holds a batch: its one window, again."""
    counting_tokens(monkeypatch, n_tokens)
    loader = DataLoaderLite(B=3, T=10, input_file=tmp_path / "any.txt")
    served = []
    for _ in range(2 * len(starts)):  # the windows of the text, twice over
        x, y = loader.next_batch()
        p = int(x[0, 0])
        assert torch.equal(x.flatten(), torch.arange(p, p + 30))
        assert torch.equal(y.flatten(), torch.arange(p + 1, p + 31))
        served.append(p)
    assert served == starts * 2


@pytest.mark.parametrize("n_tokens, B, T, processes", [(100, 2, 8, 1), (96, 2, 8, 2), (33, 2, 8, 2), (97, 3, 4, 3)])
def test_batches_per_pass_is_what_the_loader_serves_before_it_starts_over(tmp_path, monkeypatch, n_tokens, B, T,
                                                                          processes):
    """batches_per_pass counts from the lengths; here the loader is read until it serves its first batch again."""
    counting_tokens(monkeypatch, n_tokens)
    (tmp_path / "t.txt").write_text("counted")
    loader = DataLoaderLite(B, T, str(tmp_path / "t.txt"), num_processes=processes)
    first, served = loader.next_batch()[0], 1
    while not torch.equal(loader.next_batch()[0], first):
        served += 1
    assert machinery.tokens.batches_per_pass(loader) == served


def test_processes_read_interleaved_slices(tmp_path, monkeypatch):
    counting_tokens(monkeypatch, 100)
    loaders = [DataLoaderLite(2, 5, tmp_path / "any.txt", process_rank=r, num_processes=2) for r in range(2)]
    x0, _ = loaders[0].next_batch()
    x1, _ = loaders[1].next_batch()
    assert torch.equal(torch.cat([x0.flatten(), x1.flatten()]), torch.arange(0, 20))
    x0, _ = loaders[0].next_batch()
    assert torch.equal(x0.flatten(), torch.arange(20, 30))


def test_position_state_round_trips(text_file):
    a = DataLoaderLite(2, 8, text_file)
    for _ in range(3):
        a.next_batch()
    b = DataLoaderLite(2, 8, text_file)
    b.load_state_dict(a.state_dict())
    assert all(torch.equal(p, q) for p, q in zip(a.next_batch(), b.next_batch()))


def test_text_shorter_than_one_batch_is_a_clear_error(tmp_path):
    """The line names what a batch needs: B x T of every process (+1), and so the processes where there are
    several (B x T alone may fit: lowering --B/--T is not the only way)."""
    path = tmp_path / "short.txt"
    path.write_text("Only a few words here.")
    with pytest.raises(ValueError, match=r"fewer than the 129 one batch needs \(B=4, T=32\); use more data or "
                                         r"lower --B/--T$"):
        DataLoaderLite(4, 32, path)
    path.write_text(" ".join(["word"] * 40))  # 40 tokens: one process's batch of 4 x 8 fits, two processes' not
    DataLoaderLite(4, 8, path)
    with pytest.raises(ValueError, match=r"has 40 tokens, fewer than the 65 one batch needs \(B=4, T=8, 2 "
                                         r"processes\); use more data or lower --B/--T or use fewer processes$"):
        DataLoaderLite(4, 8, path, num_processes=2)


@pytest.mark.parametrize("content,message", [
    (None, "not found"),
    (b"", "is empty"),
    (b"  \n\n ", "holds only whitespace"),
    (b"\xff\xfe\x00binary", "not UTF-8"),
])
def test_bad_files_are_clear_errors(tmp_path, content, message):
    path = tmp_path / "data.txt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ValueError, match=message):
        DataLoaderLite(1, 4, path)


def test_file_is_tokenized_once_and_rereads_after_a_change(tmp_path, monkeypatch):
    path = tmp_path / "t.txt"
    path.write_text(" a" * 50)
    calls = []
    encode = machinery.tokens.tiktoken.Encoding.encode_ordinary
    monkeypatch.setattr(machinery.tokens.tiktoken.Encoding, "encode_ordinary",
                        lambda self, text: calls.append(1) or encode(self, text))
    DataLoaderLite(1, 4, path, split="train")
    DataLoaderLite(1, 4, path, split="val")
    assert len(calls) == 1
    path.write_text(" b" * 60)
    assert len(DataLoaderLite(1, 4, path).tokens) == 60
