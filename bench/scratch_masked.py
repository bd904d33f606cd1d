"""Issue 12, item 2 (docs/weights.md, "Session 9"): does restricting the image term to the head
lift a from-scratch network off the identity plateau?

``bench/scratch_regions.py`` showed that a from-scratch ``voxelmorph`` lowers MIND-SSD mostly
outside the head (matching background noise), not in the brain. This run trains it with the
image term averaged only over the fixed image's head: voxels within 2 of one whose intensity is
>= 0.05 (``mind_ssd_loss``'s ``mask``), at the image scales given (the images and the field
average-pooled as in ``multiscale_image_loss``); the label Dice (scales 1 2 4) and the smoothness
term are `mambamorph train`'s own. The ``train`` loop is used unchanged, with its image term
replaced for this process only. Validation (Dice, SDlogJ, the unmasked image term) every 10 steps.

    PYTHONPATH=src python bench/scratch_masked.py RUN --data /work/data/phantom-coarse \
        --image-scales 2 --steps 200
"""

from __future__ import annotations

import argparse


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", help="run folder (replaced)")
    ap.add_argument("--data", default="/work/data/phantom-coarse")
    ap.add_argument("--image-scales", type=int, nargs="+", default=[1])
    ap.add_argument("--smooth-weight", type=float, default=0.2)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()

    import torch.nn.functional as F

    import mambamorph.train as train_module
    from mambamorph import similarity as sim
    from mambamorph.config import DataConfig, TrainConfig
    from mambamorph.losses import _pyramid
    from mambamorph.nn.spatial import warp

    def head(fixed):
        return (F.max_pool3d((fixed >= 0.05).float(), 5, 1, 2) > 0).float()

    def masked_image_loss(name, moving, fixed, flow, scales=(1,)):
        total = 0.0
        for _, (m, f), u in _pyramid(flow, scales, moving, fixed):  # train's own pooling
            total = total + sim.mind_ssd_loss(sim.mind_ssc(warp(m, u)), sim.mind_ssc(f),
                                              mask=head(f))
        return total / len(scales)

    train_module.multiscale_image_loss = masked_image_loss
    cfg = TrainConfig(model="voxelmorph", data=DataConfig(root=a.data), lr=a.lr,
                      epochs=max(1, a.steps // 10), steps_per_epoch=10, loss="image+dice",
                      dice_scales=(1, 2, 4), image_scales=tuple(a.image_scales),
                      smooth_weight=a.smooth_weight, val_pairs=5, seed=0, device="cpu",
                      threads=a.threads)
    train_module.train(cfg, a.out, overwrite=True, progress=False)


if __name__ == "__main__":
    main()
