"""The frozen encoder's embedding cache: one encoding per tile for all folds of an ensemble."""
from __future__ import annotations

import torch

from samnnu.modeling.frozen_encoder import FrozenSAMEncoder


def _encoder() -> FrozenSAMEncoder:
    return FrozenSAMEncoder(encoder="tiny", input_size=64, in_channels=1, intensity_windows=[(-2.0, 2.0)]).eval()


def _counting(module: FrozenSAMEncoder) -> list[int]:
    calls = []
    module.image_encoder.register_forward_hook(lambda m, inp, out: calls.append(inp[0].shape[0]))
    return calls


def test_cached_embeddings_equal_fresh_ones_and_are_computed_once():
    torch.manual_seed(0)
    enc = _encoder()
    calls = _counting(enc)
    x = torch.randn(4, 1, 56, 40)
    fresh, content = enc(x)
    enc.use_embedding_cache(True)
    first, c1 = enc(x)
    second, c2 = enc(torch.cat([x[2:], torch.randn(1, 1, 56, 40)]))  # two known tiles and one new
    assert torch.equal(first, fresh) and c1 == c2 == content
    assert torch.equal(second[:2], fresh[2:])
    assert calls == [4, 4, 1]  # uncached, then every tile once, then only the new one
    enc.use_embedding_cache(False)
    enc(x)
    assert calls[-1] == 4  # switched off: encoded again


def test_folds_with_other_frozen_weights_never_share_an_embedding():
    torch.manual_seed(0)
    fold0, fold1 = _encoder(), _encoder()  # a random encoder: each fold has its own weights
    x = torch.randn(2, 1, 56, 40)
    expected1, _ = fold1(x)
    enc = _encoder()
    calls = _counting(enc)
    enc.use_embedding_cache(True)
    for fold in (fold0, fold1):  # the predictor loads each fold's weights into one network, and says so
        enc.load_state_dict(fold.state_dict())
        enc.weights_loaded()
        got, _ = enc(x)
    assert calls == [2, 2] and torch.equal(got, expected1)
    enc.load_state_dict(fold0.state_dict())  # the same weights as the first fold: cached
    enc.weights_loaded()
    enc(x)
    assert calls == [2, 2]
