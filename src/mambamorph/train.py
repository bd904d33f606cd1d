"""Training loop (SPEC.md section 4), read top to bottom.

``train(cfg, run_dir)`` trains ``cfg.model`` on inter-subject pairs (moving modality of subject
i -> fixed modality of subject j != i) with the loss ``cfg.loss`` names
(:func:`mambamorph.losses.parse_loss`)

    loss = image_weight * image_term(warp(m, phi), f)                  (``image``/``mind``/...)
         + dice_weight * soft_dice(onehot(s_f), warp(onehot(s_m), phi))  (``dice``)
         + smooth_weight * grad_l2(velocity or displacement)

An image term alone needs no label maps (unsupervised); validation still scores Dice where
the validation subjects have labels, and always the field's plausibility (SDlogJ, % of
voxels with J < 0.2).

and writes a run folder::

    run_dir/config.yaml            the resolved settings
    run_dir/log.csv                step, epoch, loss terms, lr, seconds (and validation rows)
    run_dir/tb/                    TensorBoard events
    run_dir/checkpoints/best.*     best validation score (see :func:`selection_score`)
    run_dir/checkpoints/last.*     latest weights (safetensors + json)
    run_dir/checkpoints/last_state.json + last_state-<step>.safetensors
                                   what a resume needs: weights, optimizer, RNG states, counters

Every write is atomic or fails with a :class:`~mambamorph.errors.WriteError` naming the file
(full disk, vanished folder), leaving the last complete state in place. ``resume=True``
continues from the last saved state exactly (same pairs, same losses as an uninterrupted run
on the same device and CPU threads), also after a kill at any moment; Ctrl-C and the time
budget save that state first (SIGTERM too).

Under ``torchrun`` (see :mod:`mambamorph.distributed`) every process trains on its own pairs
of each step and DDP averages the gradients; rank 0 alone logs, validates and writes the run
folder, which holds the plain model's weights as in a one-process run.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import re
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from mambamorph import checkpoint as ckpt
from mambamorph import distributed, labels
from mambamorph.config import TrainConfig, dump_yaml
from mambamorph.data.augment import random_crop, synthetic_pair
from mambamorph.data.datasets import open_dataset, test_pairs
from mambamorph.errors import InputError, WriteError
from mambamorph.io import atomic_write_text, prepare_output_dir
from mambamorph.losses import LossSpec, grad_l2, image_term, multiscale_image_loss, \
    multiscale_label_dice_loss, parse_loss
from mambamorph.metrics import compressed_percent, dice_per_roi, sdlogj
from mambamorph.models import build_model
from mambamorph.nn.spatial import warp

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What a run did. ``best_score`` is the :func:`selection_score` of the ``best``
    checkpoint (validation Dice x100 where labels exist; ``-inf`` when no checkpoint passed
    the plausibility gate, so none was kept); ``last_val_dice`` the last validation Dice."""

    run_dir: Path
    steps: int
    epochs_done: float
    best_score: float
    last_val_dice: float
    seconds: float
    stopped_early: bool


# --------------------------------------------------------------------------------- run folder
# the files a run writes (paths relative to the run folder), and the temporary files of
# atomic writes that a killed run may leave behind
_RUN_FILES = re.compile(r"config\.yaml|log\.csv|tb/events\.out\.tfevents\.[^/]+"
                        r"|checkpoints/(best|last)\.(json|safetensors)"
                        r"|checkpoints/last_state(-\d+)?\.(json|safetensors)"
                        r"|(checkpoints/)?\.[^/]+\.tmp")


def _run_files(run_dir: Path) -> Callable[[Path], bool]:
    return lambda path: bool(_RUN_FILES.fullmatch(path.relative_to(run_dir).as_posix()))


def _check_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> None:
    """Fail early (before any data is read) if the run folder cannot be used as asked."""
    if resume:
        if not (run_dir / "checkpoints" / "last_state.json").exists():
            raise InputError(f"{run_dir}: nothing to resume (no checkpoints/last_state.json)")
    else:  # refuses a non-empty folder unless overwrite; deletes nothing yet
        prepare_output_dir(run_dir, overwrite=overwrite, what="run folder", create=False)


def _prepare_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> None:
    """Called once data and model load: delete what an earlier run wrote there (``overwrite``)
    or, on resume, the temporary files of writes a kill interrupted."""
    owned = _run_files(run_dir)
    if resume:
        for f in run_dir.rglob(".*.tmp"):
            if owned(f):
                f.unlink(missing_ok=True)
    else:
        prepare_output_dir(run_dir, overwrite=overwrite, owned=owned, what="run folder")


class RunLog:
    """The run's ``log.csv`` (a row per logged step and per validation) and TensorBoard events.

    Rows are appended and closed one at a time, so a killed run loses nothing it logged; a
    resumed run first drops the rows logged after the state it resumes from. Every write
    failure (full disk, vanished folder) raises :class:`WriteError` naming the file; when an
    error is already on its way out, closing does not mask it.
    """

    COLUMNS = ("step", "epoch", "loss", "dice_loss", "image_loss", "smooth_loss", "val_dice",
               "val_sdlogj", "val_compressed", "val_image", "lr", "seconds")

    def __init__(self, run_dir: Path, resume_step: int | None = None) -> None:
        self.csv_path = run_dir / "log.csv"
        self.tb_dir = run_dir / "tb"
        if resume_step is not None and self.csv_path.exists():
            self._truncate(resume_step)
        if not self.csv_path.exists():
            self._append(self.COLUMNS)
        self.tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is a dependency; tolerate its absence all the same
            return
        self.tb = self._tb_call(SummaryWriter, str(self.tb_dir), purge_step=resume_step)

    def _truncate(self, step: int) -> None:
        with open(self.csv_path, newline="") as f:
            lines = f.readlines()
        keep = lines[:1] + [ln for ln in lines[1:] if ln.endswith("\n")
                            and ln.split(",", 1)[0].isdigit() and int(ln.split(",", 1)[0]) <= step]
        atomic_write_text(self.csv_path, "".join(keep), overwrite=True)

    def _append(self, row) -> None:
        text = io.StringIO(newline="")
        csv.writer(text).writerow(row)
        try:
            with open(self.csv_path, "a", newline="") as f:
                f.write(text.getvalue())
        except OSError as e:
            raise WriteError(f"{self.csv_path}: cannot write: {e.strerror or e}") from e

    def _tb_call(self, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except OSError as e:
            raise WriteError(f"{self.tb_dir}: cannot write TensorBoard events: "
                             f"{e.strerror or e}") from e

    def train_row(self, step: int, epoch: float, loss: float, terms: dict, lr: float,
                  seconds: float) -> None:
        """``terms``: the loss terms of :func:`pair_loss` (``dice``, ``image``, ``smooth``;
        a term the loss does not use is blank)."""
        def cell(name, fmt):
            return format(terms[name], fmt) if name in terms else ""
        self._append([step, f"{epoch:.3f}", f"{loss:.5f}", cell("dice", ".5f"),
                      cell("image", ".5f"), cell("smooth", ".6f"), "", "", "", "", lr,
                      f"{seconds:.1f}"])
        if self.tb:
            self._tb_call(self.tb.add_scalar, "train/loss", loss, step)
            for name, value in terms.items():
                self._tb_call(self.tb.add_scalar, f"train/{name}_loss", value, step)

    def val_row(self, step: int, epoch: float, val: dict, lr: float, seconds: float) -> None:
        """``val``: :func:`validate`'s scores."""
        self._append([step, f"{epoch:.3f}", "", "", "", "", f"{val['dice']:.4f}",
                      f"{val['sdlogj']:.4f}", f"{val['compressed']:.4f}", f"{val['image']:.5f}",
                      lr, f"{seconds:.1f}"])
        if self.tb:
            for name, value in val.items():
                self._tb_call(self.tb.add_scalar, f"val/{name}", value, step)

    def __enter__(self) -> "RunLog":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.tb:
            try:
                self._tb_call(self.tb.close)
            except WriteError:
                if exc_type is None:
                    raise
                log.warning("%s: TensorBoard events not closed cleanly", self.tb_dir)


# ------------------------------------------------------------------------- pairs, loss, Dice
def training_pair(dataset, rng: np.random.Generator, cfg: TrainConfig,
                  device: torch.device) -> dict:
    """The next training pair: a synthetic known-field pair with probability ``cfg.synthetic``,
    otherwise a random inter-subject pair, cropped to ``cfg.crop`` when set (see
    :mod:`mambamorph.data.augment`). Draws from ``rng`` only."""
    if cfg.synthetic and rng.random() < cfg.synthetic:
        return synthetic_pair(dataset, rng, cfg.synthetic_voxels, cfg.crop, device=device)
    batch = dataset.random_pair(rng)
    return random_crop(batch, cfg.crop, rng) if cfg.crop else batch


def pair_loss(model, batch: dict, cfg: TrainConfig, spec: LossSpec, device: torch.device,
              amp: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Forward one pair and return ``(loss, terms)``, ``terms`` holding the unweighted
    ``dice``, ``image`` and ``smooth`` terms that ``spec`` uses (scalars).

    ``batch`` holds ``moving``/``fixed`` ``(1, D0, D1, D2)`` float images in [0, 1] and, for
    the Dice term, ``moving_seg``/``fixed_seg`` ``(1, D0, D1, D2)`` compact ROI indices
    (0..16); a synthetic pair also holds ``target_flow`` ``(3, D0, D1, D2)`` (voxels), which
    adds ``flow_weight * mean squared error`` of the predicted displacement to the loss.
    """
    mov = batch["moving"].unsqueeze(0).to(device)
    fix = batch["fixed"].unsqueeze(0).to(device)
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp):
        out = model(mov, fix)
    flow = out.flow.float()
    terms = {}
    loss = flow.new_zeros(())
    if spec.dice:
        seg_m = labels.one_hot(batch["moving_seg"].unsqueeze(0).to(device))
        seg_f = labels.one_hot(batch["fixed_seg"].unsqueeze(0).to(device))
        terms["dice"] = multiscale_label_dice_loss(seg_m, seg_f, flow, cfg.dice_scales)
        loss = loss + cfg.dice_weight * terms["dice"]
    if spec.image:
        terms["image"] = multiscale_image_loss(spec.image, mov, fix, flow, cfg.image_scales)
        loss = loss + cfg.image_weight * terms["image"]
    terms["smooth"] = grad_l2(out.smooth_target.float())
    loss = loss + cfg.smooth_weight * terms["smooth"]
    if "target_flow" in batch:
        target = batch["target_flow"].unsqueeze(0).to(device)
        loss = loss + cfg.flow_weight * ((flow - target) ** 2).sum(1).mean()
    return loss, terms


def batch_step(net, batches: list[dict], cfg: TrainConfig, spec: LossSpec,
               device: torch.device, amp: bool, dist: distributed.Session
               ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Forward and backward each pair of ``batches`` (see :func:`pair_loss`) through
    ``net``, accumulating the gradient of the mean of their losses (one pair's graph at a time);
    in a distributed run the gradients are averaged over the processes during the last
    ``backward``. Returns the mean ``(loss, terms)`` of the pairs, detached when there are
    several (a single pair's are :func:`pair_loss`'s own)."""
    n = len(batches)
    loss_sum, term_sums = None, {}
    for i, batch in enumerate(batches):
        with dist.no_sync(net, sync=i == n - 1):
            loss, terms = pair_loss(net, batch, cfg, spec, device, amp)
            (loss if n == 1 else loss / n).backward()
        if n == 1:
            return loss, terms
        loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()
        for k, v in terms.items():
            term_sums[k] = v.detach() if k not in term_sums else term_sums[k] + v.detach()
    return loss_sum / n, {k: v / n for k, v in term_sums.items()}


@torch.no_grad()
def validate(model, dataset, pairs, device: torch.device, image: str | None = "mind") -> dict:
    """Score the model on fixed validation ``pairs``; returns a dict of means over the pairs:

    - ``dice``: 16-ROI Dice (x100) with nearest-neighbour label warping; NaN without labels;
    - ``sdlogj``: SDlogJ of the displacement (2-voxel border crop, as Learn2Reg);
    - ``compressed``: % of the fixed brain's labelled voxels (of every voxel, without labels)
      whose Jacobian determinant is below 0.2 (folds included);
    - ``image``: the image term ``image`` (NaN when None) of the warped moving image.
    """
    was_training = model.training
    model.eval()
    rows = []
    for batch in dataset.pairs(pairs):
        mov = batch["moving"].unsqueeze(0).to(device)
        fix = batch["fixed"].unsqueeze(0).to(device)
        flow = model(mov, fix).flow.float()
        row = {"dice": float("nan"), "image": float("nan"),
               "sdlogj": float(sdlogj(flow[0].cpu().numpy(), crop=2))}
        if "moving_seg" in batch:
            seg = batch["moving_seg"].unsqueeze(0).to(device).float()
            warped = warp(seg, flow, mode="nearest")
            row["dice"] = 100.0 * float(np.nanmean(dice_per_roi(
                warped, batch["fixed_seg"], roi_ids=tuple(range(1, labels.NUM_ROIS + 1)))))
            brain = batch["fixed_seg"][0].numpy() > 0
        else:
            brain = np.ones(flow.shape[2:], dtype=bool)
        row["compressed"] = float(compressed_percent(flow[0].cpu().numpy(), brain))
        if image:
            row["image"] = float(image_term(image, warp(mov, flow), fix))
        rows.append(row)
    model.train(was_training)
    keys = ("dice", "sdlogj", "compressed", "image")
    if not rows:
        return {k: float("nan") for k in keys}
    return {k: float(np.mean([r[k] for r in rows])) for k in keys}


def selection_score(val: dict, max_compressed: float, max_sdlogj: float | None = None) -> float:
    """The score that picks ``best``: validation Dice where labels exist, otherwise minus the
    image term; ``-inf`` when more than ``max_compressed`` % of the brain is compressed below
    J = 0.2, because a field that flattens anatomy can win Dice (it shrinks structures onto
    their labels) and must not be chosen for it, and, with ``max_sdlogj``, when the validation
    SDlogJ exceeds it (an irregular field; the shipped weights' bound is 0.2)."""
    if not val["compressed"] <= max_compressed:
        return -math.inf
    if max_sdlogj is not None and not val["sdlogj"] <= max_sdlogj:
        return -math.inf
    score = val["dice"] if math.isfinite(val["dice"]) else -val["image"]
    return score if math.isfinite(score) else -math.inf


# ------------------------------------------------------------------------------ checkpoints
def rng_state(np_rng: np.random.Generator, device: torch.device) -> dict:
    """The random streams training draws from: numpy (pairs, crops, fields), torch CPU and,
    on CUDA, the training GPU's generator."""
    state = {"numpy_rng": np_rng.bit_generator.state, "torch_rng": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda_rng"] = torch.cuda.get_rng_state(device)
    return state


def save_checkpoint(cdir: Path, model, optimizer, rng: dict, step: int, best: float,
                    last_val: float, meta: dict, device: torch.device,
                    processes: int = 1) -> None:
    """Write the resume state (one commit, see :func:`mambamorph.checkpoint.save_train_state`),
    then the ``last`` weights. ``rng`` is :func:`rng_state` as it stands after ``step`` steps;
    ``processes`` the number of training processes (``WORLD_SIZE``)."""
    ckpt.save_train_state(cdir / "last_state", model, optimizer, {
        "step": step, "best_val_dice": best, "last_val_dice": last_val,
        "device": str(device), "threads": torch.get_num_threads(), "processes": processes,
        **rng})
    ckpt.save_model(cdir / "last", model, meta={"step": step, "val_dice": last_val, **meta})


def load_checkpoint(cdir: Path, model, optimizer, np_rng: np.random.Generator,
                    device: torch.device, processes: int = 1) -> tuple[int, float, float]:
    """Restore the state :func:`save_checkpoint` wrote; return ``(step, best, last_val)``.

    Warns when the device, the CPU thread count or the number of processes differ from the
    saved run's: the run then continues correctly, but no longer bitwise equal to an
    uninterrupted one (another number of processes also draws other pairs from the stream).
    """
    state = ckpt.load_train_state(cdir / "last_state", model, optimizer)
    changed = [f"{what} {state[key]} -> {now}" for what, key, now in
               (("device", "device", str(device)), ("CPU threads", "threads",
                                                    torch.get_num_threads()),
                ("processes", "processes", processes))
               if state.get(key) is not None and state[key] != now]
    if changed:
        log.warning("resuming with %s: training continues, but its losses will not be bitwise "
                    "equal to an uninterrupted run's", ", ".join(changed))
    np_rng.bit_generator.state = state["numpy_rng"]
    torch.set_rng_state(state["torch_rng"])
    if device.type == "cuda" and "cuda_rng" in state:
        torch.cuda.set_rng_state(state["cuda_rng"], device)
    return int(state["step"]), float(state["best_val_dice"]), float(state["last_val_dice"])


# ------------------------------------------------------------------------------------ train
def train(cfg: TrainConfig, run_dir: str | Path, resume: bool = False, overwrite: bool = False,
          progress: bool = True, on_epoch: Callable[[dict], None] | None = None) -> TrainResult:
    """Train ``cfg.model`` as configured; see the module docstring for what is written.

    Args:
        cfg: resolved settings (``load_train_config``).
        run_dir: run folder; must be new or empty unless ``resume``/``overwrite``.
        resume: continue from ``run_dir/checkpoints/last_state``; ``cfg`` is then read from the
            run folder's ``config.yaml`` by the caller (values here must match it).
        overwrite: delete what an earlier run wrote in ``run_dir`` first (other files are kept).
        progress: show a tqdm bar (loss, last validation Dice).
        on_epoch: callback receiving a dict of epoch statistics (for tests / CLI); called on
            rank 0 only in a distributed run.
    Returns:
        :class:`TrainResult` (the same on every process of a distributed run).
    Raises:
        InputError: bad run folder, data or settings.
        WriteError: an output could not be written (the last saved state stays resumable).
        KeyboardInterrupt: Ctrl-C or SIGTERM, after saving the resume state
            (:class:`mambamorph.distributed.Stop` on every process of a distributed run).
    """
    with distributed.session(cfg.device) as dist:
        return _train(dist, cfg, Path(run_dir), resume, overwrite, progress, on_epoch)


def _train(dist: distributed.Session, cfg: TrainConfig, run_dir: Path, resume: bool,
           overwrite: bool, progress: bool, on_epoch: Callable[[dict], None] | None
           ) -> TrainResult:
    """:func:`train` as one process of ``dist`` (every process runs this; rank 0 alone
    touches the run folder, see :mod:`mambamorph.distributed`)."""
    device = dist.device
    dist.on_main(_check_run_dir, run_dir, resume, overwrite)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    amp = bool(cfg.amp) and device.type == "cuda"
    torch.manual_seed(cfg.seed)
    np_rng = np.random.default_rng(cfg.seed)

    spec = parse_loss(cfg.loss, cfg.data.moving, cfg.data.fixed)
    train_ds = open_dataset(cfg.data, "train", cfg.seed)
    val_ds = open_dataset(cfg.data, "val", cfg.seed)
    if spec.dice and not train_ds.has_labels:
        raise InputError(f"{cfg.data.manifest}: no 'seg' column, so no label maps for the "
                         f"Dice term of loss {cfg.loss!r}; train with an image term alone "
                         "(e.g. loss 'image')")
    n_val = len(val_ds.subjects)
    n_pairs = min(cfg.val_pairs, n_val * (n_val - 1))
    if n_pairs < cfg.val_pairs:
        log.warning("%d validation pairs requested; %d validation subjects give %d",
                    cfg.val_pairs, n_val, n_pairs)
    val_pairs = test_pairs(val_ds.subjects, n_pairs, cfg.seed) if n_pairs > 0 else []
    steps_per_epoch = cfg.steps_per_epoch or len(train_ds.subjects)
    total_steps = cfg.epochs * steps_per_epoch

    if cfg.init:
        model, info = ckpt.load_model(cfg.init, device, **cfg.model_args)
        if info["model"] != cfg.model:
            raise InputError(f"{cfg.init}: checkpoint holds model {info['model']!r}, "
                             f"but the run trains {cfg.model!r}")
    else:
        model = build_model(cfg.model, **cfg.model_args).to(device)
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    # only now, with data and model known to be usable, touch the run folder
    dist.barrier()  # (every process has read what it needs from it, e.g. an --init checkpoint)
    dist.on_main(_prepare_run_dir, run_dir, resume, overwrite)
    cdir = run_dir / "checkpoints"
    # what `register` needs to rebuild the model space: the data's voxel spacing and grid
    first = train_ds.load(train_ds.subjects[0], cfg.data.moving)
    meta = {"spacing": [float(s) for s in train_ds.spacing],
            "grid": [int(d) for d in first.shape[-3:]],
            "moving": cfg.data.moving, "fixed": cfg.data.fixed}

    step, best, last_val = 0, -math.inf, float("nan")
    if resume:  # every process loads the same state
        step, best, last_val = load_checkpoint(cdir, model, optimizer, np_rng, device,
                                               dist.world_size)
    else:
        dist.on_main(atomic_write_text, run_dir / "config.yaml", dump_yaml(cfg), overwrite=True)
    rng = rng_state(np_rng, device)  # always the RNG as it stands after `step` steps
    net = dist.wrap(model)  # what trains; `model` (the same weights) is validated and saved

    def end_epoch() -> tuple[float, float]:
        """Rank 0, at the end of an epoch: validate, keep the best weights, save the resume
        state; returns ``(best, last_val)``."""
        nonlocal best, last_val
        epoch = step / steps_per_epoch
        if val_pairs:
            val = validate(model, val_ds, val_pairs, device, spec.image)
            last_val = val["dice"]
            runlog.val_row(step, epoch, val, cfg.lr, time.time() - t0)
            score = selection_score(val, cfg.max_compressed, cfg.max_sdlogj)
            if score > best:
                best = score
                ckpt.save_model(cdir / "best", model, meta={
                    "step": step, "val_dice": val["dice"], "val_sdlogj": val["sdlogj"],
                    "val_compressed": val["compressed"], **meta})
            log.info("epoch %.2f step %d val Dice %.2f SDlogJ %.3f J<0.2 %.2f %% "
                     "(best score %.2f)", epoch, step, val["dice"], val["sdlogj"],
                     val["compressed"], best)
        save_checkpoint(cdir, model, optimizer, rng, step, best, last_val, meta, device,
                        dist.world_size)
        if on_epoch:
            on_epoch({"step": step, "epoch": epoch, "val_dice": last_val, "best": best})
        return best, last_val

    t0 = time.time()
    deadline = t0 + 60 * cfg.max_minutes if cfg.max_minutes else None
    # fine-tuning scores the starting weights first, so `best` is never worse than them
    end_of_epoch = bool(cfg.init and not resume and val_pairs)
    stopped_early = updating = False
    # (the signal handlers go last, after the run log is closed)
    with dist.stop_signals(), \
            (RunLog(run_dir, resume_step=step if resume else None) if dist.is_main
             else nullcontext()) as runlog, \
            tqdm(total=total_steps, initial=step, desc=f"train {cfg.model}", unit="step",
                 dynamic_ncols=True, disable=not progress or not dist.is_main) as bar:
        try:
            while True:
                if end_of_epoch:  # validate, keep the best weights, save the resume state
                    best, last_val = dist.on_main(end_epoch)
                if step >= total_steps or stopped_early:
                    break

                optimizer.zero_grad(set_to_none=True)
                batches = dist.local_pairs(lambda: training_pair(train_ds, np_rng, cfg, device),
                                           cfg.batch_size)
                loss, terms = batch_step(net, batches, cfg, spec, device, amp, dist)
                updating = True  # weights, step and rng change together
                optimizer.step()
                step, rng = step + 1, rng_state(np_rng, device)
                updating = False
                # the mean over the processes; every process stops after the same step
                loss, terms, stop, late = dist.reduce_step(
                    loss, terms, dist.stop_requested, bool(deadline and time.time() > deadline))
                if not math.isfinite(loss):
                    raise RuntimeError(f"training diverged at step {step} (loss {loss}); "
                                       "lower the learning rate")
                if step % cfg.log_every == 0 or step == total_steps:
                    dist.on_main(lambda: runlog.train_row(step, step / steps_per_epoch, loss,
                                                          terms, cfg.lr, time.time() - t0))
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", val=f"{last_val:.1f}")
                if stop:
                    log.warning("stopping after step %d: a process of the run received SIGINT "
                                "or SIGTERM", step)
                    raise distributed.Stop
                if late and step < total_steps:
                    stopped_early = True
                    log.info("time budget of %.1f min reached at step %d", cfg.max_minutes, step)
                end_of_epoch = step % steps_per_epoch == 0 or stopped_early
        except KeyboardInterrupt as e:
            if updating:  # the weights may be half-updated: keep the last saved state
                log.warning("interrupted while updating the weights; the state saved last "
                            "is kept")
            elif isinstance(e, distributed.Stop):  # every process is here, after one step
                dist.on_main(save_checkpoint, cdir, model, optimizer, rng, step, best, last_val,
                             meta, device, dist.world_size)
            elif dist.is_main:
                save_checkpoint(cdir, model, optimizer, rng, step, best, last_val, meta, device,
                                dist.world_size)
            raise
    if val_pairs and best == -math.inf:
        log.warning("no checkpoint passed the plausibility gate (validation fields compress "
                    "more than %g %% of the brain below J = 0.2): no best checkpoint was kept; "
                    "checkpoints/last holds the final weights", cfg.max_compressed)
    return TrainResult(run_dir, step, step / steps_per_epoch, best, last_val,
                       time.time() - t0, stopped_early)
