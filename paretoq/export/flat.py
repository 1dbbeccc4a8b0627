"""The plan as a flat module -> bits map, for any tool that reads one.

Keys are paretoq's defused module paths (what ``paretoq info --components`` lists); components
the plan keeps in full precision are absent.
"""

from __future__ import annotations

import json

from paretoq.export.common import Context, Export

FILE = "bits.json"


def write(ctx: Context) -> Export:
    bits = {c.key: ctx.plan.bits[c.key] for c in ctx.adapter.components if c.key in ctx.plan.bits}
    return Export({FILE: json.dumps(bits, indent=1) + "\n"}, f"cat {{out}}/{FILE}")
