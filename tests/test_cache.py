"""paretoq/cache.py: checksummed entries are never trusted when damaged; killed runs' temp dirs go."""

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from paretoq.cache import (CorruptEntry, atomic_directory, load_checked_tensors, load_entry, payload_checksum,
                           read_checked, read_checked_json, save_checked_tensors, write_checked, write_checked_json)


def _flip(path, at=-3):
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


def test_payload_checksum_is_sha256():
    assert payload_checksum(b"abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_a_json_entry_round_trips_and_a_flipped_or_cut_one_is_refused(tmp_path):
    path = tmp_path / "e.json"
    write_checked_json(path, {"a": [1, 2.5]})
    assert read_checked_json(path) == {"a": [1, 2.5]}
    size = path.stat().st_size
    _flip(path)
    assert path.stat().st_size == size
    with pytest.raises(CorruptEntry, match="checksum mismatch"):
        read_checked_json(path)
    write_checked(path, b"payload")
    path.write_bytes(path.read_bytes()[:-2])
    with pytest.raises(CorruptEntry, match="checksum mismatch"):
        read_checked(path)
    path.write_text('{"written": "by an older paretoq"}')
    with pytest.raises(CorruptEntry, match="no checksum"):
        read_checked_json(path)


def test_a_tensor_entry_is_plain_safetensors_and_checked(tmp_path):
    path = tmp_path / "t.safetensors"
    tensors = {"codes": torch.arange(12, dtype=torch.uint8).view(3, 4), "scales": torch.rand(3, 1)}
    save_checked_tensors(path, tensors, {"bits": "4"})
    for got in (load_checked_tensors(path), load_file(path)):  # other tools read it too
        assert all(torch.equal(got[k], v) for k, v in tensors.items())
    _flip(path)
    with pytest.raises(CorruptEntry, match="checksum mismatch"):
        load_checked_tensors(path)
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(CorruptEntry, match="cut short"):
        load_checked_tensors(path)


def test_load_entry_warns_in_one_line_and_deletes_a_damaged_entry(tmp_path, capsys):
    path = tmp_path / "e.json"
    assert load_entry(path, read_checked_json, "features") is None  # missing: silent
    write_checked_json(path, [1])
    assert load_entry(path, read_checked_json, "features") == [1]
    _flip(path)
    assert load_entry(path, read_checked_json, "features") is None
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "features cache entry" in err and "recomputing it" in err
    assert not path.exists()


def test_atomic_directory_removes_what_a_killed_run_left(tmp_path, capsys):
    out = tmp_path / "q"
    dead = tmp_path / ".q.dead123"
    dead.mkdir()
    (dead / "model.safetensors").write_bytes(b"half")
    pid = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                         text=True).stdout.strip()  # a process that has ended
    (dead / ".paretoq-owner").write_text(f"{os.uname().nodename} {pid}\n")
    alive = tmp_path / ".q.alive456"
    alive.mkdir()
    (alive / ".paretoq-owner").write_text(f"{os.uname().nodename} {os.getpid()}\n")
    with atomic_directory(out) as tmp:
        (tmp / "x.json").write_text("{}")
    assert not dead.exists() and alive.exists()
    assert sorted(p.name for p in out.iterdir()) == ["x.json"]
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and ".q.dead123" in err and "killed" in err
