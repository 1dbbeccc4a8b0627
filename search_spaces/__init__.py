"""Search-space YAML files: which kinds get which bit choices and how components are grouped.

Installed as `paretoq.search_spaces`; `path()` finds the bundled files wherever paretoq is installed.
"""

from pathlib import Path


def path() -> Path:
    return Path(__file__).resolve().parent
