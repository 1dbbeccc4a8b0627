"""Anchored regular expressions that match exactly a given set of dotted module names.

Quantizers differ in how they apply rules (GPTQModel and vLLM: ``re.match``, first rule wins;
compressed-tensors: exact names before regexes, regexes in alphabetical order; llama.cpp:
``regex_search``, first or last rule wins by version). Rules that each match exactly their own
names, anchored at both ends, mean the same under all of them, whatever their order.

Names are split at dots into a trie; children whose subtrees are alike share one alternation, so a
layer's 3 x 64 expert projections become ``experts\\.(?:0|1|...|63)\\.(?:gate_proj|up_proj|down_proj)``,
and layers with the same contents share one rule.
"""

from __future__ import annotations

import re
from collections import defaultdict

_END = ""  # marks a trie node that is itself a name


def _trie(names) -> dict:
    root: dict = {}
    for name in names:
        node = root
        for part in name.split("."):
            node = node.setdefault(part, {})
        node[_END] = {}
    return root


def _key_order(k: str):
    return (0, int(k), "") if k.isdigit() else (1, 0, k)


def _alternation(node: dict) -> str:
    """Regex for the rest of a name below ``node`` (its children and what follows them)."""
    by_tail: dict[str, list[str]] = defaultdict(list)
    for key in sorted((k for k in node if k != _END), key=_key_order):
        by_tail[_tail(node[key])].append(re.escape(key))
    alts = [(keys[0] if len(keys) == 1 else f"(?:{'|'.join(keys)})") + tail for tail, keys in by_tail.items()]
    return alts[0] if len(alts) == 1 else f"(?:{'|'.join(alts)})"


def _tail(node: dict) -> str:
    if set(node) <= {_END}:
        return ""
    rest = r"\." + _alternation({k: v for k, v in node.items() if k != _END})
    return f"(?:{rest})?" if _END in node else rest


def names_regex(names) -> str:
    """``^...$``: a regex that fully matches exactly ``names`` (non-empty, dotted)."""
    names = list(names)
    if not names:
        raise ValueError("names_regex needs at least one name")
    return f"^{_alternation(_trie(names))}$"


def layer_rules(names, layers_prefix: str) -> list[str]:
    """Regexes that together match exactly ``names``: one per group of layers with the same contents.

    Names under ``{layers_prefix}.{i}.`` are grouped by layer; layers whose names are alike apart
    from the index share one rule (``^model\\.layers\\.(?:3|7)\\.self_attn\\.q_proj$``). Other names get
    one rule between them.
    """
    per_layer: dict[int, list[str]] = defaultdict(list)
    others = []
    head = layers_prefix + "."
    for name in names:
        idx, dot, rest = name[len(head):].partition(".") if name.startswith(head) else ("", "", "")
        if idx.isdigit() and dot and rest:
            per_layer[int(idx)].append(rest)
        else:
            others.append(name)
    by_body: dict[str, list[int]] = defaultdict(list)
    for i in sorted(per_layer):
        by_body[_alternation(_trie(per_layer[i]))].append(i)
    rules = []
    for body, layers in by_body.items():
        idx = str(layers[0]) if len(layers) == 1 else f"(?:{'|'.join(map(str, layers))})"
        rules.append(f"^{re.escape(layers_prefix)}\\.{idx}\\.{body}$")
    if others:
        rules.append(names_regex(others))
    return rules
