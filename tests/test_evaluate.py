"""Evaluation: every method on the same pairs, metrics that match independent computations,
tables that parse, figures that read back, the warm-up pair left out of the timing."""

import csv
import json
import sys
import time

import numpy as np
import pytest
import torch
from matplotlib import image as mpimg

from mambamorph import evaluation as ev
from mambamorph.checkpoint import save_model
from mambamorph.labels import ROI_IDS, ROI_NAMES, to_roi_index
from mambamorph.errors import InputError, MambaMorphError
from mambamorph.metrics import dice_per_roi, hd95_per_roi
from mambamorph.models import build_model
from mambamorph.nn.spatial import warp

SHAPE = (32, 32, 32)
SPACING = (1.5, 1.5, 1.5)
# FreeSurfer id -> blob centre and radii (voxels); each subject shifts the centres a little
BLOBS = {2: ((16, 16, 16), (12, 12, 11)), 4: ((16, 18, 20), (4, 5, 3)),
         15: ((16, 12, 9), (2, 2, 2)), 17: ((10, 15, 14), (3, 3, 4)), 10: ((22, 16, 15), (3, 3, 3))}


def _subject(k: int):
    """MR-like and CT-like images and a FreeSurfer-id label map of subject ``k``."""
    rng = np.random.default_rng(k)
    g = np.stack(np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij")).astype(float)
    seg = np.zeros(SHAPE, np.int16)
    for rid, (c, r) in BLOBS.items():  # later blobs overwrite the white-matter "brain"
        c = np.asarray(c, float) + rng.integers(-2, 3, size=3)
        inside = (((g - c[:, None, None, None]) / np.asarray(r, float)[:, None, None, None]) ** 2
                  ).sum(0) <= 1
        seg[inside] = rid
    mr_lut = {0: 0.0, 2: 0.8, 4: 0.1, 15: 0.15, 17: 0.5, 10: 0.6}
    ct_lut = {0: 0.0, 2: 0.5, 4: 0.2, 15: 0.2, 17: 0.55, 10: 0.6}
    mr = np.vectorize(mr_lut.get)(seg) + 0.02 * rng.standard_normal(SHAPE)
    ct = np.vectorize(ct_lut.get)(seg) + 0.02 * rng.standard_normal(SHAPE)
    return mr.astype(np.float32), ct.astype(np.float32), seg


class TinyDataset:
    """The dataset protocol :func:`evaluate` uses (``pairs``, ``spacing``, modality names)."""

    spacing = SPACING
    moving, fixed = "mr", "ct"

    def __init__(self, n: int = 4):
        self.data = {f"sub{k}": _subject(k) for k in range(n)}
        self.subjects = sorted(self.data)
        self.reads = 0

    def pairs(self, pairs):
        for a, b in pairs:
            self.reads += 1
            mr, _, seg_a = self.data[a]
            _, ct, seg_b = self.data[b]
            yield {"moving": torch.from_numpy(mr)[None], "fixed": torch.from_numpy(ct)[None],
                   "moving_seg": torch.from_numpy(to_roi_index(seg_a))[None],
                   "fixed_seg": torch.from_numpy(to_roi_index(seg_b))[None],
                   "moving_id": a, "fixed_id": b}


PAIRS = [("sub0", "sub1"), ("sub2", "sub3"), ("sub3", "sub0")]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A VoxelMorph checkpoint whose flow head is scaled up, so it moves voxels."""
    torch.manual_seed(1)
    model = build_model("voxelmorph")
    with torch.no_grad():
        model.head.weight.normal_(0.0, 0.05)
    path = tmp_path_factory.mktemp("ckpt") / "runA" / "checkpoints" / "best"
    save_model(path, model, meta={"step": 7})
    return path.with_suffix(".safetensors")


@pytest.fixture(scope="module")
def result(tmp_path_factory, checkpoint):
    out = tmp_path_factory.mktemp("eval") / "out"
    ds = TinyDataset()
    res = ev.evaluate([ev.identity_method(), ev.checkpoint_method(checkpoint)], ds, PAIRS, out,
                      device="cpu", description="tiny synthetic set")
    assert ds.reads == len(PAIRS)  # the pairs are read once, whatever the number of methods
    return res, ds


def test_roi_index_to_ids():
    idx = np.arange(17, dtype=np.uint8)
    np.testing.assert_array_equal(ev.roi_index_to_ids(idx), (0, *ROI_IDS))
    seg = np.array([[0, 2, 4], [15, 28, 0]], np.int16)
    np.testing.assert_array_equal(ev.roi_index_to_ids(torch.from_numpy(to_roi_index(seg))), seg)
    with pytest.raises(InputError, match="0..16"):
        ev.roi_index_to_ids(np.array([17]))


def test_files_written_and_parse(result):
    res, _ = result
    out = res.out_dir
    for name in ("results.md", "results.csv", "results.json", "per_roi_dice.md",
                 "per_roi_dice.csv", "per_roi_dice.png", "fig2_pair1.png", "fig2_pair2.png"):
        assert (out / name).is_file(), name
    md = (out / "results.md").read_text()
    header = "| " + " | ".join(ev.TABLE_COLUMNS) + " |"
    assert header in md and "| Initial |" in md and "| VoxelMorph |" in md
    assert str(res) == res.table_markdown() and header in str(res)
    assert "tiny synthetic set" in md and "sub0 -> sub1" in md

    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * len(PAIRS)
    for col in ("method", "pair", "moving_id", "fixed_id", "dice", "hd95", "hd95_max",
                "folding_percent", "sdlogj", "compressed_percent", "seconds", "warmup",
                "peak_memory_gb", "params",
                "dice_lateral_ventricle", "hd95_ventral_DC"):
        assert col in rows[0]
    assert {r["method"] for r in rows} == {"Initial", "VoxelMorph"}

    # strict JSON: NaN would not parse with this hook
    doc = json.loads((out / "results.json").read_text(),
                     parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert [s["name"] for s in doc["summary"]] == ["Initial", "VoxelMorph"]
    assert len(doc["pairs"]) == 2 * len(PAIRS)
    assert [r["id"] for r in doc["rois"]] == list(ROI_IDS)
    for rec in doc["pairs"]:
        assert len(rec["dice_per_roi"]) == 16 and len(rec["hd95_max_per_roi"]) == 16
    assert doc["meta"]["pairs"] == [list(p) for p in PAIRS]
    assert doc["meta"]["spacing_mm"] == list(SPACING)

    with open(out / "per_roi_dice.csv", newline="") as f:
        roi_rows = list(csv.DictReader(f))
    assert [r["roi"] for r in roi_rows] == list(ROI_NAMES)
    assert set(roi_rows[0]) == {"roi_id", "roi", "Initial", "Initial std", "VoxelMorph",
                                "VoxelMorph std"}
    assert "| lateral ventricle | 4 |" in (out / "per_roi_dice.md").read_text()

    for png in ("per_roi_dice.png", "fig2_pair1.png"):
        arr = mpimg.imread(str(out / png))
        assert arr.ndim == 3 and min(arr.shape[:2]) > 200 and arr[..., :3].std() > 0.02


def test_identity_row_is_the_raw_pair(result):
    res, ds = result
    for rec in (r for r in res.records if r.method == "Initial"):
        _, _, seg_m = ds.data[rec.moving_id]
        _, _, seg_f = ds.data[rec.fixed_id]
        np.testing.assert_allclose(rec.dice, 100 * dice_per_roi(seg_m, seg_f), equal_nan=True)
        np.testing.assert_allclose(rec.hd95, hd95_per_roi(seg_m, seg_f, SPACING),
                                   equal_nan=True)
    s = res.summary("Initial")
    per_pair = [np.nanmean(r.dice) for r in res.records if r.method == "Initial"]
    assert s.dice_mean == pytest.approx(np.mean(per_pair))
    assert s.dice_std == pytest.approx(np.std(per_pair))
    assert s.seconds_mean is None and s.peak_memory_bytes is None and s.params is None
    assert s.folding_mean is None and s.sdlogj_mean is None and s.compressed_mean is None
    row = next(line for line in str(res).splitlines() if line.startswith("| Initial |"))
    assert row.count("| - ") == 6  # folding, SDlogJ, J < 0.2, time, memory, params


def test_checkpoint_row_matches_an_independent_computation(result, checkpoint):
    res, ds = result
    from mambamorph.checkpoint import load_model

    model, _ = load_model(checkpoint)
    recs = [r for r in res.records if r.method == "VoxelMorph"]
    assert len(recs) == len(PAIRS)
    moved_any = False
    for rec in recs:
        mr, _, seg_m = ds.data[rec.moving_id]
        _, ct, seg_f = ds.data[rec.fixed_id]
        with torch.no_grad():
            flow = model(torch.from_numpy(mr)[None, None], torch.from_numpy(ct)[None, None]).flow
        warped = warp(torch.from_numpy(seg_m.astype(np.int64))[None, None], flow,
                      mode="nearest")[0, 0].numpy()
        moved_any |= bool((warped != seg_m).any())
        np.testing.assert_allclose(rec.dice, 100 * dice_per_roi(warped, seg_f), equal_nan=True)
        assert rec.folding is not None and 0 <= rec.folding <= 100
        assert rec.sdlogj is not None and rec.sdlogj > 0
        assert rec.compressed is not None and 0 <= rec.compressed <= 100
        assert rec.seconds > 0
    assert moved_any  # the test model really deforms, so the rows differ from the identity
    s = res.summary("VoxelMorph")
    assert s.params == sum(p.numel() for p in model.parameters())
    assert s.memory_kind == "CPU RSS" and s.n_timed == len(PAIRS) - 1
    # memory: one registration of the first (largest) pair, in a fresh process
    assert [r.peak_memory_bytes is not None for r in recs] == [True, False, False]
    assert s.peak_memory_bytes == recs[0].peak_memory_bytes > 0
    assert "runA/checkpoints/best" in s.source and "step 7" in s.source


def _sleepy_method(name: str, first: float, later: float) -> ev.Method:
    """A method whose first call is slow (a warm-up) and later calls fast."""

    def make_runner(device):
        calls = []

        def run(moving, fixed, spacing):
            time.sleep(first if not calls else later)
            calls.append(1)
            return torch.zeros((1, 3, *fixed.shape[2:]), device=fixed.device)

        return run

    return ev.Method(name=name, kind="learned", make_runner=make_runner, params=3)


def test_time_leaves_out_the_first_pair(tmp_path):
    res = ev.evaluate([_sleepy_method("Sleepy", 0.5, 0.02)], TinyDataset(), PAIRS,
                      tmp_path / "o", n_figures=0)
    recs = res.records
    assert [r.warmup for r in recs] == [True, False, False]
    assert recs[0].seconds >= 0.5
    s = res.summary("Sleepy")
    assert s.n_timed == 2
    assert s.seconds_mean == pytest.approx(np.mean([recs[1].seconds, recs[2].seconds]))
    assert s.seconds_mean < 0.3
    # a zero field: the same scores as the identity, no folds
    assert s.folding_mean == 0 and s.sdlogj_mean == pytest.approx(0)
    assert not list((tmp_path / "o").glob("fig2_*.png"))


def _ramp_method(c: float) -> ev.Method:
    """A field with an analytic Jacobian: u_0(x) = c x_0^2 / 2, so J = 1 + c x_0 (central
    differences are exact for a quadratic; one-sided on the border)."""

    def make_runner(device):
        def run(moving, fixed, spacing):
            x0 = torch.arange(fixed.shape[2], dtype=torch.float32).view(-1, 1, 1)
            flow = torch.zeros((1, 3, *fixed.shape[2:]))
            flow[0, 0] = (c * x0 ** 2 / 2).expand(*fixed.shape[2:])
            return flow

        return run

    return ev.Method(name="Ramp", kind="classical", make_runner=make_runner)


def test_compressed_column_on_an_analytic_field(tmp_path):
    """J = 1 - 0.047 x_0: J < 0.2 for x_0 >= 18, J <= 0 for x_0 >= 22 (and on the far border);
    the new column counts the fixed image's labelled voxels only, folding counts all voxels."""
    ds = TinyDataset()
    res = ev.evaluate([ev.identity_method(), _ramp_method(-0.047)], ds, PAIRS, tmp_path / "o",
                      n_figures=0)
    for rec in (r for r in res.records if r.method == "Ramp"):
        brain = ds.data[rec.fixed_id][2] > 0
        assert not brain[0].any() and not brain[-1].any()  # no border voxel: J is exact there
        x0 = np.arange(SHAPE[0]).reshape(-1, 1, 1) * np.ones(SHAPE)
        expected = 100 * np.mean(x0[brain] >= 18)
        assert 0 < expected < 100
        assert rec.compressed == pytest.approx(expected)
        assert rec.folding == pytest.approx(100 * 10 / SHAPE[0])  # x_0 = 22..31
    s = res.summary("Ramp")
    values = [r.compressed for r in res.records if r.method == "Ramp"]
    assert s.compressed_mean == pytest.approx(np.mean(values))
    assert s.compressed_std == pytest.approx(np.std(values))
    row = next(line for line in str(res).splitlines() if line.startswith("| Ramp |"))
    col = ev.TABLE_COLUMNS.index("J < 0.2 (%)")
    assert row.split("|")[col + 1].strip() == f"{s.compressed_mean:.3f} ± {s.compressed_std:.3f}"
    with open(tmp_path / "o" / "results.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["method"] == "Ramp"]
    assert [float(r["compressed_percent"]) for r in rows] == pytest.approx(values, abs=1e-5)
    doc = json.loads((tmp_path / "o" / "results.json").read_text())
    assert [p["compressed_percent"] for p in doc["pairs"] if p["method"] == "Ramp"] == \
        pytest.approx(values)
    assert doc["meta"]["compressed_threshold"] == 0.2
    assert "labelled voxels" in (tmp_path / "o" / "results.md").read_text()


def test_out_dir_protection(tmp_path, checkpoint):
    out = tmp_path / "o"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="not empty"):
        ev.evaluate([ev.identity_method()], TinyDataset(), PAIRS, out)
    (out / "fig2_pair9.png").write_bytes(b"stale")
    ev.evaluate([ev.identity_method()], TinyDataset(), PAIRS, out, overwrite=True, n_figures=1)
    assert (out / "notes.txt").read_text() == "mine"  # only earlier results are replaced
    assert not (out / "fig2_pair9.png").exists() and (out / "fig2_pair1.png").exists()


def test_bad_arguments(tmp_path, checkpoint):
    with pytest.raises(InputError, match="at least 2 test pairs"):
        ev.evaluate([ev.identity_method()], TinyDataset(), PAIRS[:1], tmp_path / "a")
    with pytest.raises(InputError, match="nothing to evaluate"):
        ev.evaluate([], TinyDataset(), PAIRS, tmp_path / "b")
    with pytest.raises(InputError, match="not found"):
        ev.method_from_spec(str(tmp_path / "missing.safetensors"))
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="CUDA"):
            ev.evaluate([ev.identity_method()], TinyDataset(), PAIRS, tmp_path / "c",
                        device="cuda")
        assert not (tmp_path / "c").exists()  # failed before creating anything
    assert ev.method_from_spec("Initial").kind == "identity"
    assert ev.method_from_spec(str(checkpoint)).name == "VoxelMorph"


def test_equal_names_are_told_apart(tmp_path, checkpoint):
    a = ev.checkpoint_method(checkpoint)
    b = ev.checkpoint_method(checkpoint)
    c = _sleepy_method("X", 0, 0)
    d = _sleepy_method("X", 0, 0)
    res = ev.evaluate([a, b, c, d], TinyDataset(), PAIRS[:2], tmp_path / "o", n_figures=0)
    names = [s.name for s in res.summaries]
    assert len(set(names)) == 4
    assert names[0] == "VoxelMorph (runA/best)" and names[2] == "X"


def test_ants_missing_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "ants", None)  # import ants -> ImportError
    with pytest.raises(MambaMorphError, match=r'pip install "mambamorph\[ants\]"'):
        ev.ants_syn_method()
    with pytest.raises(MambaMorphError, match="antspyx"):
        ev.method_from_spec("ants-syn")


def test_ants_field_reproduces_ants_resampling():
    """The converted field (voxels, our axis order) warps like ANTs itself, at any spacing."""
    ants = pytest.importorskip("ants")
    from mambamorph.evaluation.peers import _ants_register

    g = np.stack(np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij")).astype(float)

    def blob(c, r):
        c, r = np.asarray(c, float), np.asarray(r, float)
        return np.exp(-(((g - c[:, None, None, None]) / r[:, None, None, None]) ** 2).sum(0))

    fixed = blob((16, 16, 16), (7, 5, 6)).astype(np.float32)
    moving = blob((18, 14, 17), (6, 6, 5)).astype(np.float32)
    for spacing in ((1.0, 1.0, 1.0), (1.0, 1.5, 2.0)):
        flow, ants_warped = _ants_register(ants, moving, fixed, spacing, (20, 10, 5),
                                              "mattes", 32, 0)
        assert flow.shape == (3, *SHAPE)
        ours = warp(torch.from_numpy(moving)[None, None], torch.from_numpy(flow)[None])[0, 0]
        np.testing.assert_allclose(ours.numpy(), ants_warped, atol=1e-4)
        assert np.abs(ours.numpy() - fixed).mean() < 0.5 * np.abs(moving - fixed).mean()


def test_run_evaluation_on_an_srreg_folder(tmp_path, checkpoint):
    """The CLI's entry point end to end: SR-Reg layout on disk -> tables and figures."""
    nib = pytest.importorskip("nibabel")
    root = tmp_path / "data"
    (root / "vol").mkdir(parents=True)
    (root / "seg").mkdir()
    affine = np.diag([*SPACING, 1.0])
    for k in range(6):
        mr, ct, seg = _subject(k)
        nib.save(nib.Nifti1Image(mr, affine), root / "vol" / f"s{k:02d}_mr.nii.gz")
        nib.save(nib.Nifti1Image(ct, affine), root / "vol" / f"s{k:02d}_ct.nii.gz")
        nib.save(nib.Nifti1Image(seg.astype(np.uint8), affine), root / "seg" / f"s{k:02d}.nii.gz")
    seen = []
    res = ev.run_evaluation(checkpoints=[checkpoint], data_root=str(root), n_pairs=20, seed=0,
                            out_dir=tmp_path / "eval", device="cpu",
                            progress=lambda done, total, name: seen.append((done, total)))
    test_ids = json.loads((root / "split.json").read_text())["test"]
    assert len(test_ids) == 2  # 6 subjects: 2 test subjects give 2 ordered pairs (not 20)
    assert sorted(res.meta["pairs"]) == sorted([[a, b] for a in test_ids for b in test_ids
                                                if a != b])
    assert [s.name for s in res.summaries] == ["Initial", "VoxelMorph"]
    assert seen[-1] == (4, 4)
    assert res.meta["spacing_mm"] == list(SPACING) and res.meta["grid"] == list(SHAPE)
    for rec in (r for r in res.records if r.method == "Initial"):
        seg_m = nib.load(root / "seg" / f"{rec.moving_id}.nii.gz").get_fdata().astype(int)
        seg_f = nib.load(root / "seg" / f"{rec.fixed_id}.nii.gz").get_fdata().astype(int)
        np.testing.assert_allclose(rec.dice, 100 * dice_per_roi(seg_m, seg_f), equal_nan=True)
    md = (tmp_path / "eval" / "results.md").read_text()
    assert "MR -> CT" in md and str(root) in md
    with pytest.raises(InputError, match="not empty"):
        ev.run_evaluation(checkpoints=[checkpoint], data_root=str(root), n_pairs=2,
                          out_dir=tmp_path / "eval", progress=False)
    with pytest.raises(InputError, match="at least 2"):
        ev.run_evaluation(data_root=str(root), n_pairs=1, out_dir=tmp_path / "e2")
