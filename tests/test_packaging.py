import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_subpackage_is_listed_and_importable():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(cfg["packages"])
    found = {"paretoq." + p.parent.relative_to(ROOT / "paretoq").as_posix().replace("/", ".")
             for p in (ROOT / "paretoq").rglob("__init__.py") if p.parent != ROOT / "paretoq"} | {"paretoq"}
    assert found <= listed
    import importlib

    for name in listed:
        importlib.import_module(name)


def test_data_files_ship_inside_the_package():
    from paretoq.search_spaces import path

    assert {p.name for p in path().glob("*.yaml")} >= {"default.yaml", "component.yaml"}
    import paretoq.zoo

    zoo = Path(paretoq.zoo.__file__).parent
    assert (zoo / "demo" / "model.safetensors").is_file() and (zoo / "tasks" / "paretoq_demo_mc.jsonl").is_file()
