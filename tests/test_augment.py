import numpy as np
import pytest
import torch

from mambamorph.data.augment import random_crop, random_displacement, synthetic_pair
from mambamorph.data.datasets import SRRegDataset
from mambamorph.errors import InputError
from mambamorph.metrics import jacobian_determinant
from mambamorph.nn.spatial import warp


def test_random_displacement_is_smooth_invertible_and_bounded():
    g = torch.Generator().manual_seed(0)
    u = random_displacement((32, 48, 32), 3.0, g)
    assert u.shape == (1, 3, 32, 48, 32)
    assert 1.5 < u.abs().amax().item() < 6.0
    assert (jacobian_determinant(u) > 0).all()  # diffeomorphic: no folds
    u2 = random_displacement((32, 48, 32), 3.0, torch.Generator().manual_seed(0))
    assert torch.equal(u, u2)


def test_random_crop_takes_one_window_of_every_volume():
    vol = torch.arange(8 * 6 * 4, dtype=torch.float32).reshape(1, 8, 6, 4)
    batch = {"moving": vol, "fixed": vol + 1000, "moving_seg": vol.to(torch.uint8),
             "fixed_seg": vol.to(torch.uint8), "moving_id": "a", "fixed_id": "b"}
    out = random_crop(batch, (4, 4, 4), np.random.default_rng(5))
    start = [int(v) for v in np.random.default_rng(5).integers(0, [5, 3, 1])]
    window = vol[:, start[0]:start[0] + 4, start[1]:start[1] + 4, start[2]:start[2] + 4]
    assert torch.equal(out["moving"], window) and torch.equal(out["fixed"], window + 1000)
    assert torch.equal(out["fixed_seg"], window.to(torch.uint8))
    assert out["moving_id"] == "a" and out["fixed_id"] == "b"
    with pytest.raises(InputError, match="larger than the volumes"):
        random_crop(batch, (4, 8, 4), np.random.default_rng(0))


def test_synthetic_pair_target_is_the_applied_field(tiny_phantom):
    ds = SRRegDataset(tiny_phantom, split="train")
    b = synthetic_pair(ds, np.random.default_rng(1), 3.0, crop=(32, 32, 32))
    assert b["moving_id"] == b["fixed_id"]
    assert b["moving"].shape == (1, 32, 32, 32) and b["target_flow"].shape == (3, 32, 32, 32)
    # undoing: the original fixed-modality crop warped by the target gives the synthetic fixed
    rng = np.random.default_rng(1)
    sid = ds.subjects[int(rng.integers(len(ds.subjects)))]
    orig = random_crop(ds.pair(sid, sid), (32, 32, 32), rng)
    expect = warp(orig["fixed"][None], b["target_flow"][None])[0]
    assert torch.allclose(expect, b["fixed"], atol=1e-6)
    assert torch.equal(orig["moving"], b["moving"])


@pytest.mark.gpu
def test_synthetic_pair_on_cuda_matches_cpu(tiny_phantom):
    ds = SRRegDataset(tiny_phantom, split="train")
    cpu = synthetic_pair(ds, np.random.default_rng(3), 3.0, crop=(32, 32, 32))
    gpu = synthetic_pair(ds, np.random.default_rng(3), 3.0, crop=(32, 32, 32), device="cuda")
    assert gpu["fixed"].is_cuda and gpu["target_flow"].is_cuda
    assert torch.allclose(gpu["target_flow"].cpu(), cpu["target_flow"], atol=1e-4)
    assert torch.allclose(gpu["fixed"].cpu(), cpu["fixed"], atol=1e-3)
    # labels are warped by nearest neighbour: a rounding tie may flip a few voxels
    assert (gpu["fixed_seg"].cpu() != cpu["fixed_seg"]).float().mean() < 1e-3
