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


def test_a_loaded_fold_is_digested_once_for_the_cache_key_and_the_folded_copy(monkeypatch):
    """The embedding cache's key and the folded copy's check share one digest of the image encoder's state,
    so a fold loaded for a volume costs one pass over its weights, not two; a change of weights is still seen."""
    from samnnu.modeling import frozen_encoder

    digested = []
    real = frozen_encoder.tensor_digest
    monkeypatch.setattr(frozen_encoder, "tensor_digest", lambda ts: digested.append(len(ts)) or real(ts))
    torch.manual_seed(0)
    fold0, fold1 = _encoder(), _encoder()
    enc = _encoder()
    calls = _counting(enc)
    state = len(enc._encoder_state())
    x = torch.randn(2, 1, 56, 40)
    enc.use_embedding_cache(True)
    with torch.no_grad():
        for fold in (fold0, fold1, fold0):  # as the predictor loads the folds of an ensemble, volume after volume
            digested.clear()
            enc.load_state_dict(fold.state_dict())
            enc.weights_loaded()
            enc(x)
            assert digested.count(state) == 1  # the encoder's state digested once (and the small rest once)
            assert sum(digested) < 2 * state
    assert calls == [2, 2]  # fold0's embeddings were remembered, fold1's weights differ
    digested.clear()
    with torch.no_grad():
        enc(x)  # nothing loaded: nothing digested
    assert digested == []


def _litemedsam_unet():
    from samnnu.modeling.samunet import SAMUNet
    net = SAMUNet(encoder="litemedsam", input_size=56, in_channels=1, num_classes=3, intensity_windows=[(-2.0, 2.0)])
    net.load_pretrained()  # real BatchNorm statistics, so that folding them changes the arithmetic
    return net


def _plain_probabilities(net, x: torch.Tensor) -> torch.Tensor:
    """The network's softmax with the encoder module itself, not its folded channels-last copy."""
    enc = net.sam
    object.__setattr__(enc, "_run_encoder", enc.image_encoder)  # shadows the method: the unfolded path
    try:
        return torch.softmax(net(x), 1)
    finally:
        del enc._run_encoder


def test_the_folded_channels_last_encoder_gives_the_same_probabilities_within_1e_4():
    torch.manual_seed(0)
    net = _litemedsam_unet().eval()
    state_keys = set(net.state_dict())
    x = torch.randn(3, 1, 56, 40)
    with torch.inference_mode():
        plain = _plain_probabilities(net, x)
        fast = torch.softmax(net(x), 1)
    copy_ = net.sam.__dict__["_inference_encoder"][0]
    assert copy_ is not net.sam.image_encoder
    assert not any(type(m).__name__ == "Conv2d_BN" for m in copy_.modules())  # BatchNorm folded
    assert any(type(m).__name__ == "Conv2d_BN" for m in net.sam.image_encoder.modules())  # the module untouched
    assert set(net.state_dict()) == state_keys  # the copy is not part of the checkpoint
    assert not torch.equal(fast, plain)  # really another computation ...
    assert (fast - plain).abs().max().item() < 1e-4  # ... with the same probabilities


def test_the_folded_copy_follows_every_change_of_the_weights():
    torch.manual_seed(0)
    net = _litemedsam_unet().eval()
    x = torch.randn(2, 1, 56, 40)

    def copy_():
        return net.sam.__dict__["_inference_encoder"][0]

    with torch.no_grad():
        net(x)
        first = copy_()
        net.train()
        net.eval()  # what nnU-Net's predictor does for every volume: the weights stay, so does the copy
        net(x)
        assert copy_() is first
        net.load_state_dict({k: v.clone() for k, v in net.state_dict().items()})  # the same values again
        net(x)
        assert copy_() is first  # (nnU-Net's predictor reloads a fold for every volume: no new copy)
        other = _litemedsam_unet()
        for p in other.sam.image_encoder.parameters():
            p.mul_(0.9)
        other.eval()  # after the change: TinyViT's eval() caches its attention biases
        expected = _plain_probabilities(other, x)
        net.load_state_dict(other.state_dict())  # a fold's weights loaded into the same network
        assert (torch.softmax(net(x), 1) - expected).abs().max().item() < 1e-4
        assert copy_() is not first
        loaded = copy_()
        next(net.sam.image_encoder.parameters()).add_(1.0)  # an in-place change (an optimiser step)
        net(x)
        assert copy_() is not loaded
        net.double()
        assert net(x.double()).dtype == torch.float64 and next(copy_().parameters()).dtype == torch.float64


def test_training_without_lora_runs_the_frozen_encoder_through_the_copy_and_still_trains_the_rest():
    torch.manual_seed(0)
    net = _litemedsam_unet().train()
    x = torch.randn(2, 1, 56, 40)
    net(x).mean().backward()
    assert "_inference_encoder" in net.sam.__dict__
    assert all(p.grad is None for p in net.sam.parameters())
    assert all(p.grad is not None for p in net.decoder.parameters())


def test_under_torch_compile_the_module_itself_is_traced(monkeypatch):
    enc = _encoder()
    x = torch.randn(2, 1, 56, 40)
    with torch.no_grad():
        expected, _ = enc(x)
        assert "_inference_encoder" in enc.__dict__
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
        fresh = _encoder()
        fresh.load_state_dict(enc.state_dict())
        got, _ = fresh(x)
    assert "_inference_encoder" not in fresh.__dict__  # no copy, no Python bookkeeping for the compiler
    assert (got - expected).abs().max().item() < 1e-4
