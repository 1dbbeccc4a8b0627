import json

import pytest
import torch

from conftest import tiny_model
from paretoq.capture import capture
from paretoq.data import TokenSet
from paretoq.models import get_adapter
from paretoq.probes.features import Features, compute_features


@pytest.fixture(scope="module")
def features():
    adapter = get_adapter(tiny_model("qwen2_moe"))
    ids = torch.randint(3, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    return adapter, compute_features(adapter, capture(adapter, TokenSet(ids, "test"), progress=False))


def test_every_component_gets_the_features_that_apply(features):
    adapter, f = features
    assert [c.key for c in f.components] == [c.key for c in adapter.components]
    for c in f.components:
        if c.kind == "expert":
            assert 0 <= c.usage <= 1 and c.significance is not None and c.cosine is not None
        else:
            assert c.usage == 1.0 and c.significance is None  # shared experts and attention see every token
        assert (c.cosine is None) == (c.kind == "attn")
        assert c.outlier >= 1.0
    for layer in (0, 1):
        experts = [c for c in f.components if c.kind == "expert" and c.layer == layer and c.proj == "down_proj"]
        assert sum(c.usage for c in experts) == pytest.approx(1.0)
        assert sum(c.significance for c in experts) == pytest.approx(1.0)
        assert set(f.jenks[layer]["high"]) <= {c.expert for c in experts}


def test_json_and_csv_round_trip(features):
    _, f = features
    back = Features.from_dict(json.loads(json.dumps(f.to_dict())))
    assert back.components == f.components and back.blocks == f.blocks and back.jenks == f.jenks
    lines = f.to_csv().splitlines()
    assert lines[0] == "key,kind,layer,expert,proj,params,tokens,usage,outlier,significance,cosine"
    assert len(lines) == 1 + len(f.components)
