import csv
import json

from paretoq.cli import main


def test_probe_on_the_demo_writes_three_files_and_reuses_the_cache(tmp_path, capsys):
    out = tmp_path / "probes"
    assert main(["probe", "--out", str(out), "--calib-tokens", "4096", "--eval-tokens", "1024"]) == 0
    text = capsys.readouterr().out
    assert "capture computed" in text
    assert sorted(p.name for p in out.iterdir()) == ["features.csv", "features.json", "probes.png"]
    png = (out / "probes.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 50_000  # a real plot, not an empty canvas
    data = json.loads((out / "features.json").read_text())
    rows = list(csv.DictReader(open(out / "features.csv")))
    assert len(rows) == len(data["components"]) == 136
    assert {r["kind"] for r in rows} == {"attn", "dense", "shared", "expert"}
    assert set(data["blocks"]) == {"0", "1", "2", "3", "4"} and set(data["jenks"]) == {"1", "2", "3", "4"}
    assert main(["probe", "--out", str(out), "--calib-tokens", "4096", "--eval-tokens", "1024"]) == 0
    assert "(from cache" in capsys.readouterr().out
    assert json.loads((out / "features.json").read_text()) == data


def test_probe_bad_calibration_file(tmp_path, capsys):
    assert main(["probe", "--calib", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not exist" in err
    assert not (tmp_path / "o").exists()
