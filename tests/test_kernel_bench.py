"""`paretoq bench`: refuses cleanly without CUDA; its target summary reads the rows it measured."""

import pytest
import torch

from paretoq.cli import main
from paretoq.kernels.bench import Row, targets
from paretoq.kernels.configs import key, m_bucket, qmm_config, save_user_table


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the bench runs")
def test_bench_without_cuda_exits_2(capsys):
    assert main(["bench", "--shapes", "mixtral"]) == 2
    err = capsys.readouterr().err
    assert "no CUDA device" in err and err.count("\n") == 1


def test_bench_rejects_bad_token_counts(capsys):
    assert main(["bench", "--m", "1,x"]) == 2
    assert "--m" in capsys.readouterr().err


def test_targets_say_met_or_missed():
    rows = [Row("paretoq qmm", 4, 1, 14336, 4096, 10.0, 2300, 0.69), Row("paretoq qmm", 4, 16, 14336, 4096, 12.0),
            Row("torch _weight_int4pack_mm", 4, 1, 14336, 4096, 16.0)]
    text = targets(rows, 4096, 14336)
    assert "69.0% of copy (target 70%) MISSED" in text
    assert "M=16 / M=1 time: 1.20x (target <= 1.3x) met" in text
    assert "1.60x faster (target >= 1.5x) met" in text


def test_tuned_table_is_read_before_the_heuristic(monkeypatch):
    monkeypatch.setattr("paretoq.kernels.configs.device_name", lambda device: "NVIDIA_H100_80GB_HBM3")
    cfg = {"BLOCK_M": 1, "BLOCK_N": 8, "BLOCK_K": 64, "num_warps": 2, "num_stages": 5}
    save_user_table("NVIDIA_H100_80GB_HBM3", {key("qmm", 4, 1, 14336, 4096): cfg})
    assert qmm_config(1, 14336, 4096, 4, "cuda") == cfg
    assert qmm_config(3, 14336, 4096, 4, "cuda") != cfg  # another M bucket
    assert [m_bucket(m) for m in (1, 3, 16, 17, 1000)] == [1, 4, 16, 32, 512]
