"""2.5D context (samnnu.modeling.context, SAMUNetContextTrainer): the same neighbouring slices in training
and inference, the encoder's RGB channels, and a fold trained, validated and predicted end to end."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from acvl_utils.cropping_and_padding.bounding_boxes import crop_and_pad_nd

from conftest import train_validate_and_predict
from samnnu.modeling.common import IntensityToSAM
from samnnu.modeling.context import ContextDataset, ContextVolume, with_context


def test_with_context_stacks_neighbours_offset_major_and_repeats_the_ends():
    x = torch.arange(2 * 4 * 1 * 1, dtype=torch.float32).view(2, 4, 1, 1)  # channel c, slice z: 4c + z
    out = with_context(x, 1)
    assert out.shape == (6, 4, 1, 1)
    # block j holds slice z + j - 1 (clamped) of both channels
    assert out[:, :, 0, 0].tolist() == [[0, 0, 1, 2], [4, 4, 5, 6],
                                        [0, 1, 2, 3], [4, 5, 6, 7],
                                        [1, 2, 3, 3], [5, 6, 7, 7]]
    assert with_context(x, 0) is x


@pytest.mark.parametrize("bbox", [[[0, 1], [2, 7], [1, 6]], [[4, 5], [-3, 4], [5, 11]], [[2, 3], [0, 9], [0, 8]]])
def test_a_crop_of_the_context_volume_equals_the_crop_of_the_full_context(bbox):
    rng = np.random.default_rng(0)
    data = rng.normal(size=(2, 5, 9, 8)).astype(np.float32)
    full = with_context(torch.from_numpy(data), 1).numpy()
    # exactly as nnU-Net's 2D loader crops a case: one slice, in-plane box partly outside the image
    lazy = crop_and_pad_nd(ContextVolume(data, 1), bbox, 0)
    np.testing.assert_array_equal(lazy, crop_and_pad_nd(full, bbox, 0))
    assert ContextVolume(data, 1).shape == (6, 5, 9, 8)


class _Cases:
    identifiers = ["a"]

    def load_case(self, identifier):
        return np.ones((1, 3, 4, 4), np.float32), np.zeros((1, 3, 4, 4), np.int16), None, {"id": identifier}


def test_context_dataset_wraps_images_only_and_survives_pickling():
    ds = pickle.loads(pickle.dumps(ContextDataset(_Cases(), 1)))  # the loader's workers get a pickled copy
    assert ds.identifiers == ["a"]
    data, seg, _, props = ds.load_case("a")
    assert data.shape == (3, 3, 4, 4) and seg.shape == (1, 3, 4, 4) and props == {"id": "a"}


def test_rgb_groups_start_as_the_three_slices():
    mapping = IntensityToSAM(6, [(-1.0, 1.0)] * 6, rgb_groups=True)
    x = torch.linspace(-0.9, 0.9, 6).view(1, 6, 1, 1)
    out = mapping(x)[0, :, 0, 0]
    windowed = (x[0, :, 0, 0] + 1) / 2
    assert torch.allclose(out, windowed.view(3, 2).mean(1))  # RGB channel g = mean of group g
    with pytest.raises(ValueError, match="three groups"):
        IntensityToSAM(4, [(-1.0, 1.0)] * 4, rgb_groups=True)


def test_context_network_takes_three_slices_per_channel():
    from samnnu.modeling.samunet import SAMUNet

    net = SAMUNet(encoder="tiny", input_size=64, in_channels=1, num_classes=3, intensity_windows=[(-2.0, 2.0)],
                  context_slices=1)
    assert net.context_slices == 1
    assert net(torch.randn(2, 3, 40, 48)).shape == (2, 3, 40, 48)
    with pytest.raises(RuntimeError):
        net(torch.randn(2, 1, 40, 48))  # the neighbours are not optional


@pytest.mark.slow
def test_context_trainer_trains_validates_and_predicts(data_root, tmp_path):
    # the chain validates the fold: without the neighbours added there, the network would refuse its input
    train_validate_and_predict(tmp_path, "SAMUNetContextTrainer")
