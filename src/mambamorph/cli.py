"""``mambamorph`` command line: a thin front that parses, calls the library and prints.

This is the only module that turns errors into exit codes: user mistakes
(:class:`mambamorph.errors.MambaMorphError`) print one line on stderr and exit 2; Ctrl-C exits
130 after the library saved what it had.

Under ``torchrun`` (``WORLD_SIZE`` > 1) every process runs this; only rank 0 prints results and
warnings. Another rank prints its own errors with its rank ("rank 1: ...") and nothing for an
error it merely received from rank 0 (:class:`~mambamorph.errors.PeerError`) or for Ctrl-C.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from mambamorph import __version__
from mambamorph.errors import InputError, MambaMorphError, OutputExistsError, PeerError


def _grid(text: str) -> list[int]:
    try:
        dims = [int(t) for t in text.lower().replace("x", ",").split(",") if t]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a grid like 96x112x96, got {text!r}") from None
    if len(dims) != 3 or any(d <= 0 or d % 16 for d in dims):
        raise argparse.ArgumentTypeError(f"grid {text!r}: need 3 positive dims divisible by 16")
    return dims


_ALIGN_DEFAULT = "affine"  # register's pre-alignment (docs/results.md: chosen on validation pairs)


def _ints(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace("x", ",").split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers like 30,30, got {text!r}") from None


def _io_default(name: str):
    from mambamorph.optimize.instance import IOConfig

    return getattr(IOConfig(), name)


def _rank() -> int:
    """This process's rank under torchrun (0 in a plain run; a malformed value counts as 0
    here and is reported by :func:`mambamorph.distributed.launch_from_env`)."""
    try:
        return int(os.environ.get("RANK", "0")) if int(os.environ.get("WORLD_SIZE", "1")) > 1 \
            else 0
    except ValueError:
        return 0


def _model_arg(text: str) -> tuple[str, object]:
    import yaml
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    k, v = text.split("=", 1)
    return k.strip(), yaml.safe_load(v)


# ------------------------------------------------------------------------------------ commands
def cmd_data_phantom(a) -> int:
    from mambamorph.data.phantom import build_phantom

    bar = None
    if not a.quiet:
        from tqdm import tqdm
        bar = tqdm(total=a.subjects, desc="phantom subjects", unit="subj")

    def progress(i, n):
        if bar is not None:
            bar.n = i
            bar.refresh()

    rep = build_phantom(a.out, n_subjects=a.subjects, preset=a.preset, grid=a.grid,
                        seed=a.seed, overwrite=a.overwrite, progress=progress)
    if bar is not None:
        bar.close()
    print(f"phantom dataset written to {a.out}")
    print(rep.summary() if hasattr(rep, "summary") else rep)
    return 0


def cmd_train(a) -> int:
    from mambamorph.config import load_train_config
    from mambamorph.train import train

    run_dir = Path(a.out)
    cfg_path = a.config
    if a.resume:
        cfg_path = run_dir / "config.yaml"
        if not cfg_path.exists():
            raise InputError(f"{run_dir}: nothing to resume (no config.yaml)")
    overrides = {
        "recipe": a.recipe, "model": a.model, "lr": a.lr, "epochs": a.epochs, "steps_per_epoch": a.steps,
        "batch_size": a.batch_size,
        "loss": a.loss, "image_weight": a.image_weight, "image_scales": a.image_scales, "max_compressed": a.max_compressed,
        "max_sdlogj": a.max_sdlogj,
        "dice_weight": a.dice_weight, "dice_scales": a.dice_scales,
        "smooth_weight": a.smooth_weight, "seed": a.seed,
        "device": a.device, "init": a.init, "max_minutes": a.minutes, "threads": a.threads,
        "val_pairs": a.val_pairs, "synthetic": a.synthetic, "crop": a.crop,
        "synthetic_voxels": a.synthetic_voxels, "flow_weight": a.flow_weight,
        "data.root": a.data, "data.manifest": a.manifest, "data.moving": a.moving,
        "data.fixed": a.fixed, "data.grid": a.grid,
    }
    if a.no_amp:
        overrides["amp"] = False
    if a.model_arg:
        overrides["model_args"] = dict(a.model_arg)
    if a.resume:  # the run folder's settings win; flags may only extend the budget
        overrides = {k: v for k, v in overrides.items() if k in ("epochs", "max_minutes", "device",
                                                                 "threads")}
    cfg = load_train_config(cfg_path, overrides)
    res = train(cfg, run_dir, resume=a.resume, overwrite=a.overwrite, progress=not a.quiet)
    if _rank():
        return 0
    print(f"trained {cfg.model}: {res.steps} steps ({res.epochs_done:.2f} epochs) in "
          f"{res.seconds / 60:.1f} min; best validation score {res.best_score:.2f}"
          f"{' (stopped by the time budget)' if res.stopped_early else ''}")
    print(f"checkpoints: {run_dir / 'checkpoints'}")
    return 0


def cmd_evaluate(a) -> int:
    from mambamorph.evaluation import run_evaluation

    summary = run_evaluation(checkpoints=a.checkpoints, data_root=a.data, manifest=a.manifest,
                             moving=a.moving, fixed=a.fixed, grid=a.grid, n_pairs=a.pairs,
                             seed=a.seed, out_dir=a.out, device=a.device,
                             identity=not a.no_identity, ants=a.ants, overwrite=a.overwrite,
                             progress=not a.quiet, io=a.io, specs=a.methods or (),
                             precision=a.precision)
    print(summary)
    return 0


def register_options(a) -> dict:
    """``register_files`` keywords (``model``, ``affine``, ``io``, ``io_config``, ``precision``) for parsed
    ``register`` arguments; the one mapping from flags to settings (also used by
    ``bench/register_pairs.py``).

    Raises:
        InputError: contradicting flags, or an iteration count per level that does not match.
    """
    from dataclasses import replace

    from mambamorph.optimize.instance import IOConfig
    from mambamorph.register import DEFAULT_MODEL

    if a.no_model and a.model:
        raise InputError("--model and --no-model contradict each other")
    if a.no_model and a.no_io:
        raise InputError("--no-model with --no-io leaves only the affine stage; drop one of them")
    cfg = IOConfig()
    if a.io_iterations is not None:
        if len(a.io_iterations) != len(cfg.levels):
            raise InputError(f"--io-iterations: give {len(cfg.levels)} counts (one per level, "
                             f"coarse to fine), got {len(a.io_iterations)}")
        cfg = replace(cfg, iterations=tuple(a.io_iterations))
    if a.io_weight is not None:
        cfg = replace(cfg, lam=a.io_weight)
    return {"model": None if a.no_model else (a.model or DEFAULT_MODEL),
            "affine": "none" if a.no_affine else (a.align or _ALIGN_DEFAULT),
            "io": not a.no_io, "io_config": cfg, "precision": a.precision}


def cmd_register(a) -> int:
    if a.pairs is not None:
        if a.moving is not None or a.fixed is not None:
            raise InputError("--pairs takes the pairs from its CSV: give either MOVING FIXED or "
                             "--pairs CSV, not both")
        if a.moving_seg is not None:
            raise InputError("--moving-seg is for one pair; with --pairs give the label maps in "
                             "a moving_seg column of the CSV")
        return _register_pairs(a)
    if a.moving is None or a.fixed is None:
        raise InputError("give MOVING and FIXED (or --pairs CSV for many pairs)")
    from mambamorph.register import register_files

    res = register_files(a.moving, a.fixed, out=a.out, moving_seg=a.moving_seg,
                         device=a.device, overwrite=a.overwrite, **register_options(a))
    print(res)
    return 0


def _register_pairs(a) -> int:
    """``register --pairs``: every pair with one network load; exit 1 when a pair failed."""
    from tqdm import tqdm

    from mambamorph.register import Registrar
    from mambamorph.register_batch import read_pairs, register_pairs

    def report(row) -> None:
        if row.status == "failed":
            hint = (" (--overwrite replaces it)" if isinstance(row.exception, OutputExistsError)
                    else "")
            tqdm.write(f"mambamorph register: pair {row.id} failed: {row.error}{hint}",
                       file=sys.stderr)

    pairs = read_pairs(a.pairs)  # a bad CSV stops before the network is loaded
    registrar = Registrar(device=a.device, **register_options(a))
    res = register_pairs(pairs, a.out, registrar, overwrite=a.overwrite,
                         progress=not a.quiet, on_pair=report)
    print(res)
    return 1 if res.failed else 0


def cmd_bench(a) -> int:
    from mambamorph.benchmarks import run_bench

    run_bench(quick=a.quick, models=a.models, sizes=a.sizes, device=a.device, out=a.out)
    return 0


def cmd_demo(a) -> int:
    from mambamorph.demo import run_demo

    run_demo(out=a.out, minutes=a.minutes, quick=a.quick, overwrite=a.overwrite,
             progress=not a.quiet, threads=a.threads, from_scratch=a.from_scratch)
    return 0


# ------------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mambamorph", description=(
        "Deformable registration of brain volumes across modalities (MambaMorph)."))
    p.add_argument("--version", action="version", version=f"mambamorph {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = p.add_subparsers(dest="command", required=True)

    def quiet(sp):
        sp.add_argument("--quiet", action="store_true", help="no progress bars")

    def precision_flag(sp):
        sp.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                        help="the network's inference precision: auto (default: bfloat16 on a "
                        "CPU that computes it natively, AVX512-BF16/AMX, else float32), fp32, "
                        "bf16 (docs/results.md measures speed and Dice of each)")

    d = sub.add_parser("data", help="build or inspect datasets")
    dsub = d.add_subparsers(dest="data_command", required=True)
    ph = dsub.add_parser("phantom", help="build the embedded MR/CT/T2 brain phantom (no download)")
    ph.add_argument("--out", required=True, help="output folder (SR-Reg layout)")
    ph.add_argument("--preset", choices=["cpu", "full"], default="cpu",
                    help="cpu: 2 mm, 96x112x96 (default); full: 1 mm, 176x208x192")
    ph.add_argument("--grid", type=_grid, default=None, help="custom array grid, e.g. 64x64x64")
    ph.add_argument("--subjects", "-n", type=int, default=60, help="number of subjects (60)")
    ph.add_argument("--seed", type=int, default=0)
    ph.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    quiet(ph)
    ph.set_defaults(func=cmd_data_phantom)

    t = sub.add_parser("train", help="train a registration model")
    t.add_argument("--config", help="YAML settings (see configs/); flags override it")
    t.add_argument("--data", help="dataset folder in SR-Reg layout (SR-Reg or a phantom)")
    t.add_argument("--manifest", help="CSV manifest (subject, modality columns, seg)")
    t.add_argument("--recipe", choices=["default", "paper"],
                   help="starting settings: default (image similarity + label Dice, see "
                   "docs/weights.md) or paper (label Dice + 0.2 x smoothness, Adam 1e-4, 100 "
                   "epochs); --config and flags override them")
    t.add_argument("--model", help="model name (mambamorph, voxelmorph, transmorph, ...)")
    t.add_argument("--model-arg", type=_model_arg, action="append",
                   help="model option KEY=VALUE, e.g. residual=true (repeatable)")
    t.add_argument("--moving", help="moving modality (default mr)")
    t.add_argument("--fixed", help="fixed modality (default ct)")
    t.add_argument("--grid", type=_grid, help="crop/pad volumes to this grid")
    t.add_argument("--lr", type=float)
    t.add_argument("--epochs", type=int)
    t.add_argument("--steps", type=int,
                   help="steps (optimizer updates) per epoch (default: training subjects)")
    t.add_argument("--batch-size", type=int,
                   help="pairs per step and per process (default 1); the loss is their mean. "
                   "Under torchrun with N processes a step sees N x this many pairs")
    t.add_argument("--loss", help="data terms joined by '+': image (MIND-SSD across modalities, "
                   "LNCC within one), mind, lncc, mi, dice (label Dice); e.g. image+dice, or "
                   "image alone for data without label maps")
    t.add_argument("--image-weight", type=float, help="weight of the image term")
    t.add_argument("--image-scales", type=int, nargs="+",
                   help="image pyramid of the image term (default 1: full resolution)")
    t.add_argument("--dice-weight", type=float, help="weight of the label Dice term")
    t.add_argument("--smooth-weight", type=float)
    t.add_argument("--dice-scales", type=int, nargs="+",
                   help="label pyramid of the Dice term (default 1 = the paper's loss)")
    t.add_argument("--synthetic", type=float,
                   help="fraction of steps on intra-subject pairs with a known random field")
    t.add_argument("--synthetic-voxels", type=float, help="largest synthetic displacement")
    t.add_argument("--flow-weight", type=float, help="weight of the known-field error")
    t.add_argument("--crop", type=_grid, help="train on random crops of this size, e.g. 64x64x64")
    t.add_argument("--val-pairs", type=int)
    t.add_argument("--max-compressed", type=float,
                   help="never keep as best a checkpoint whose validation fields compress more "
                   "than this %% of the brain below J = 0.2 (100 = no gate)")
    t.add_argument("--max-sdlogj", type=float,
                   help="never keep as best a checkpoint whose validation SDlogJ exceeds this "
                   "(default: no such gate)")
    t.add_argument("--seed", type=int)
    t.add_argument("--device", help="auto, cpu, cuda, cuda:1")
    t.add_argument("--threads", type=int, help="CPU threads for torch")
    t.add_argument("--no-amp", action="store_true", help="disable mixed precision on GPU")
    t.add_argument("--init", help="checkpoint to start from (fine-tuning)")
    t.add_argument("--minutes", type=float, help="wall-clock budget; saves and stops when spent")
    t.add_argument("--out", required=True, help="run folder")
    t.add_argument("--resume", action="store_true", help="continue the run in --out")
    t.add_argument("--overwrite", action="store_true", help="replace an existing run folder")
    quiet(t)
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("evaluate", help="score checkpoints and other methods on fixed test pairs",
                       description="Score registration methods on the same fixed test pairs: "
                       "Dice, HD95, folding (%% of voxels with J <= 0), SDlogJ, %% of the fixed "
                       "brain's labelled voxels with J < 0.2, time, memory, parameters.")
    e.add_argument("checkpoints", nargs="*",
                   help="checkpoint files (.safetensors or .json), one row each; PATH+io: that "
                   "checkpoint refined by instance optimisation instead")
    e.add_argument("--data", help="dataset folder in SR-Reg layout")
    e.add_argument("--manifest", help="CSV manifest")
    e.add_argument("--moving", default="mr", help="moving modality (default mr)")
    e.add_argument("--fixed", default="ct", help="fixed modality (default ct)")
    e.add_argument("--grid", type=_grid, help="crop/pad volumes to this grid, e.g. 96x112x96")
    e.add_argument("--pairs", type=int, default=20, help="number of fixed test pairs (20)")
    e.add_argument("--seed", type=int, default=0,
                   help="seed of the test-pair draw and of ANTs SyN (0)")
    e.add_argument("--device", default="auto",
                   help="auto (CUDA when available), cpu, cuda, cuda:1; the peers always run "
                   "on the CPU")
    e.add_argument("--no-identity", action="store_true", help="leave out the 'Initial' row")
    e.add_argument("--io", action="store_true",
                   help="after each checkpoint, add a row of its prediction refined by instance "
                   "optimisation (MIND-SSD, default settings), e.g. 'MambaMorph + IO'")
    e.add_argument("--methods", nargs="+", metavar="METHOD",
                   help="further rows: io (instance optimisation from the identity, "
                   "training-free), convexadam (ConvexAdam's package defaults; pip install "
                   "convexadam), greedy (NMI, 100x50x20; pip install picsl-greedy), ants-syn "
                   "(SyNOnly, Mattes MI, 40x20x10; pip install \"mambamorph[ants]\"), a "
                   "checkpoint path, or PATH+io")
    e.add_argument("--ants", action="store_true",
                   help="add ANTs SyN (same as --methods ants-syn; needs mambamorph[ants])")
    precision_flag(e)
    e.add_argument("--out", required=True, help="folder for tables and figures")
    e.add_argument("--overwrite", action="store_true",
                   help="replace an earlier evaluation's files in --out")
    quiet(e)
    e.set_defaults(func=cmd_evaluate)

    r = sub.add_parser(
        "register", help="register a MOVING NIfTI volume onto a FIXED one",
        description="Register MOVING onto FIXED (NIfTI, any orientation, spacing and shape): "
                    "rigid + affine pre-alignment in world space, the network's prediction, "
                    "then instance optimisation of the field on MIND-SSD. Outputs (on the fixed "
                    "grid): warped.nii.gz, warped_seg.nii.gz (with --moving-seg), "
                    "displacement_itk.nii.gz (the whole transform as an ITK/ANTs displacement "
                    "field), affine_itk.tfm (the affine stage), jacobian.nii.gz, qc.png, "
                    "register.json. With --pairs CSV instead of MOVING FIXED: many pairs, one "
                    "folder each (OUT/ID/) and OUT/summary.csv.")
    r.add_argument("moving", nargs="?", help="moving image (.nii or .nii.gz); not with --pairs")
    r.add_argument("fixed", nargs="?", help="fixed image; every output is on its grid")
    r.add_argument("--pairs", metavar="CSV", default=None,
                   help="many pairs instead of MOVING FIXED: a CSV with columns moving, fixed "
                        "(optional moving_seg, id; paths relative to the CSV's folder or "
                        "absolute); the network is loaded once, each pair goes to OUT/ID/, "
                        "OUT/summary.csv lists every pair; a rerun skips finished pairs; exit "
                        "code 1 when a pair failed")
    r.add_argument("--model", default=None,
                   help="trained checkpoint (.safetensors/.json from `mambamorph train`); "
                        "default: the mambamorph weights shipped in the package (phantom, "
                        "MR -> CT, 2 mm)")
    r.add_argument("--no-model", action="store_true",
                   help="training-free: no network, instance optimisation from the identity")
    r.add_argument("--no-io", action="store_true",
                   help="no instance optimisation: the network's field alone (fastest)")
    r.add_argument("--align", choices=["affine", "rigid", "none"], default=None,
                   help="pre-alignment in world space: rigid then affine, rigid only, or none "
                        f"(default {_ALIGN_DEFAULT})")
    r.add_argument("--no-affine", action="store_true", help="same as --align none")
    r.add_argument("--io-iterations", type=_ints, default=None, metavar="N[,N...]",
                   help="instance optimisation: Adam iterations per level, coarse to fine "
                        f"(default {','.join(map(str, _io_default('iterations')))})")
    r.add_argument("--io-weight", type=float, default=None, metavar="LAMBDA",
                   help="instance optimisation: weight of the diffusion regulariser (default "
                        f"{_io_default('lam')}; larger = smoother field)")
    precision_flag(r)
    r.add_argument("--moving-seg", help="label map of the moving image, warped with nearest")
    r.add_argument("--out", required=True, help="output folder (created if missing)")
    r.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or auto")
    r.add_argument("--overwrite", action="store_true",
                   help="replace outputs of an earlier run in --out (with --pairs: recompute "
                        "finished pairs too)")
    quiet(r)
    r.set_defaults(func=cmd_register)

    b = sub.add_parser("bench", help="time and memory of every model and of the scan paths")
    b.add_argument("--quick", action="store_true", help="small sizes only")
    b.add_argument("--models", nargs="*", help="model names (default: all)")
    b.add_argument("--sizes", nargs="*", choices=["cpu", "full"], help="grids to time")
    b.add_argument("--device", default="auto")
    b.add_argument("--out", help="also write the table (Markdown) here")
    b.set_defaults(func=cmd_bench)

    m = sub.add_parser("demo", help="phantom -> train -> evaluate, end to end, on this machine")
    m.add_argument("--out", default="mambamorph-demo", help="run folder (default ./mambamorph-demo)")
    m.add_argument("--minutes", type=float, default=None,
                   help="training budget per model in minutes (default from the demo recipe)")
    m.add_argument("--quick", action="store_true", help="tiny, minutes-long version (for CI)")
    m.add_argument("--threads", type=int, default=None)
    m.add_argument("--from-scratch", action="store_true",
                   help="ignore the phantom weights shipped in the package")
    m.add_argument("--overwrite", action="store_true")
    quiet(m)
    m.set_defaults(func=cmd_demo)
    return p


def run() -> int:
    """The ``mambamorph`` command (console script and ``python -m mambamorph``): the C
    allocator set up for large tensors where the machine has the memory
    (:func:`mambamorph.runtime.should_keep_freed_memory`), then :func:`main`."""
    from mambamorph.runtime import keep_freed_memory, should_keep_freed_memory

    if should_keep_freed_memory():
        keep_freed_memory()
    code = main()
    if _ran.get("command") == "register":
        _exit_now(code)
    return code


#: the command :func:`main` ran last (read by :func:`run`)
_ran: dict[str, str] = {}


def _exit_now(code: int) -> None:
    """End the process at once after a finished ``register``: its outputs are written and
    closed (atomic renames) and its worker threads joined, and the interpreter's own teardown
    (freeing torch's and numba's state) took 0.6-0.7 s of a 6-7 s command here (2 cores,
    2026-11-30); logging and the standard streams are flushed first."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    rank = _rank()
    level = logging.INFO if args.verbose else logging.WARNING
    logging.basicConfig(level=logging.ERROR if rank else level,
                        format="%(levelname)s %(name)s: %(message)s")
    where = f"rank {rank}: " if rank else ""
    _ran["command"] = args.command
    try:
        return args.func(args)
    except PeerError as e:  # rank 0 reports it
        if not rank:
            print(f"mambamorph {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OutputExistsError as e:
        print(f"mambamorph {args.command}: error: {where}{e} (--overwrite replaces it)",
              file=sys.stderr)
        return 2
    except MambaMorphError as e:
        print(f"mambamorph {args.command}: error: {where}{e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if not rank:
            saved = ("summary.csv lists every finished pair; the same command resumes"
                     if getattr(args, "pairs", None) and args.command == "register" else
                     "training saved its last checkpoint")
            print(f"mambamorph {args.command}: interrupted ({saved})", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(run())
