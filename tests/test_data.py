import json

import pytest
import torch

from paretoq.data import load_token_sets, read_documents
from paretoq.errors import ParetoqError
from paretoq.models import load_tokenizer
from paretoq.models.loading import demo_dir


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(demo_dir())


def _rows(t: torch.Tensor) -> set[tuple]:
    return {tuple(r) for r in t.tolist()}


def test_sizes_disjointness_and_determinism(tokenizer):
    sets = load_token_sets(tokenizer, "demo", calib_tokens=2560, eval_tokens=1000, seq_len=128, seed=0)
    assert sets.calib.input_ids.shape == (20, 128)
    assert sets.eval.input_ids.shape == (8, 128)  # 1000 tokens rounds up to whole windows
    assert not _rows(sets.calib.input_ids) & _rows(sets.eval.input_ids)
    again = load_token_sets(tokenizer, "demo", calib_tokens=2560, eval_tokens=1000, seq_len=128, seed=0)
    assert torch.equal(again.calib.input_ids, sets.calib.input_ids)
    other = load_token_sets(tokenizer, "demo", calib_tokens=2560, eval_tokens=1000, seq_len=128, seed=1)
    assert not torch.equal(other.eval.input_ids, sets.eval.input_ids)
    assert other.eval.fingerprint() != sets.eval.fingerprint()


def test_windows_are_pieces_of_the_token_stream(tokenizer):
    """Every window is a contiguous run of the text's tokens, at a window-aligned offset."""
    from paretoq.data import token_stream

    stream = token_stream(tokenizer, read_documents("demo"))
    sets = load_token_sets(tokenizer, "demo", calib_tokens=512, eval_tokens=512, seq_len=64)
    for row in torch.cat([sets.calib.input_ids, sets.eval.input_ids]):
        starts = [s for s in range(0, stream.numel() - 63, 64) if torch.equal(stream[s : s + 64], row)]
        assert starts


def test_eval_set_does_not_depend_on_calibration_size(tokenizer):
    small = load_token_sets(tokenizer, "demo", calib_tokens=1024, eval_tokens=2048)
    large = load_token_sets(tokenizer, "demo", calib_tokens=8192, eval_tokens=2048)
    assert torch.equal(small.eval.input_ids, large.eval.input_ids)


def test_user_txt_and_jsonl(tokenizer, tmp_path):
    text = "def f(x):\n    return x + 1\n" * 400
    (tmp_path / "a.txt").write_text(text)
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"text": text[i::3]}) for i in range(3)) + "\n\n")
    assert read_documents(tmp_path / "a.txt") == [text]
    assert len(read_documents(tmp_path / "b.jsonl")) == 3
    sets = load_token_sets(tokenizer, tmp_path / "b.jsonl", calib_tokens=256, eval_tokens=256, seq_len=64)
    assert sets.calib.num_tokens == 256 and sets.eval.num_tokens == 256


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("empty.txt", "   \n", "holds no text"),
        ("bad.jsonl", "{not json}\n", "line 1 is not JSON"),
        ("field.jsonl", json.dumps({"content": "x"}) + "\n", "no string field 'text'"),
        ("doc.pdf", "x", "pass a .txt file or a .jsonl"),
    ],
)
def test_bad_text_files(tokenizer, tmp_path, name, content, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(ParetoqError, match=message):
        load_token_sets(tokenizer, tmp_path / name)


def test_too_short_and_missing(tokenizer, tmp_path):
    (tmp_path / "short.txt").write_text("import os\n" * 50)
    with pytest.raises(ParetoqError, match="--calib-tokens"):
        load_token_sets(tokenizer, tmp_path / "short.txt")
    with pytest.raises(ParetoqError, match="does not exist"):
        load_token_sets(tokenizer, tmp_path / "missing.txt")
    with pytest.raises(ParetoqError, match="must be positive"):
        load_token_sets(tokenizer, "demo", calib_tokens=0)
