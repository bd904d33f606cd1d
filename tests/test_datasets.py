"""Splits, test pairs, the SR-Reg-layout and manifest datasets, and the pair iterator."""

import json

import nibabel as nib
import numpy as np
import pytest
import torch

from mambamorph.data import datasets as ds
from mambamorph.labels import ROI_IDS
from mambamorph.errors import InputError

IDS = [f"sub{k:03d}" for k in range(180)]


# ---------------------------------------------------------------------------------- splits
def test_make_split_sizes_disjoint_and_sorted():
    split = ds.make_split(IDS, *ds.default_split_sizes(len(IDS)), seed=0)
    assert (len(split["train"]), len(split["val"]), len(split["test"])) == (150, 10, 20)
    assert split["seed"] == 0
    parts = [set(split[k]) for k in ds.SPLITS]
    assert set.union(*parts) == set(IDS) and sum(map(len, parts)) == len(IDS)
    assert all(split[k] == sorted(split[k]) for k in ds.SPLITS)


def test_make_split_deterministic_and_order_free():
    a = ds.make_split(IDS, 10, 20, seed=3)
    b = ds.make_split(list(reversed(IDS)), 10, 20, seed=3)
    assert a == b
    assert ds.make_split(IDS, 10, 20, seed=4)["test"] != a["test"]
    # the documented rule, recomputed independently
    order = np.argsort(np.random.default_rng(3).random(len(IDS)), kind="stable")
    assert a["val"] == sorted(sorted(IDS)[k] for k in order[:10])


@pytest.mark.parametrize("n_val,n_test", [(-1, 2), (100, 80), (179, 1)])
def test_make_split_bad_sizes(n_val, n_test):
    with pytest.raises(InputError, match="cannot split"):
        ds.make_split(IDS, n_val, n_test, 0)


def test_make_split_duplicates():
    with pytest.raises(InputError, match="duplicate"):
        ds.make_split(["a", "b", "a", "c"], 1, 1, 0)


def test_default_split_sizes():
    assert ds.default_split_sizes(180) == (10, 20)
    assert ds.default_split_sizes(6) == (2, 2)
    assert ds.default_split_sizes(360) == (20, 40)
    with pytest.raises(InputError, match="too few"):
        ds.default_split_sizes(5)


def test_write_read_split_roundtrip(tmp_path):
    split = ds.make_split(IDS[:20], 2, 3, 1)
    p = tmp_path / "split.json"
    ds.write_split(p, split)
    assert ds.read_split(p) == split
    ds.write_split(p, split)  # same content: no-op
    other = ds.make_split(IDS[:20], 2, 3, 2)
    with pytest.raises(InputError, match="different split"):
        ds.write_split(p, other)
    assert ds.read_split(p) == split
    ds.write_split(p, other, overwrite=True)
    assert ds.read_split(p) == other
    assert sorted(f.name for f in tmp_path.iterdir()) == ["split.json"]  # no temp files left


@pytest.mark.parametrize("content,match", [
    ("{not json", "not a readable JSON"),
    ("[1, 2]", "JSON object"),
    ('{"train": ["a"], "val": ["b"]}', "'test' must be a list"),
    ('{"train": ["a"], "val": [1], "test": []}', "'val' must be a list"),
    ('{"train": ["a", "b"], "val": ["b"], "test": []}', "both 'train' and 'val'"),
    ('{"seed": "x", "train": ["a"], "val": [], "test": []}', "'seed' must be an integer"),
])
def test_read_split_malformed(tmp_path, content, match):
    p = tmp_path / "s.json"
    p.write_text(content)
    with pytest.raises(InputError, match=match) as e:
        ds.read_split(p)
    assert str(p) in str(e.value)


def test_read_split_missing(tmp_path):
    with pytest.raises(InputError, match="not found"):
        ds.read_split(tmp_path / "nope.json")


def test_test_pairs():
    ids = IDS[:20]
    pairs = ds.test_pairs(ids, 30, seed=0)
    assert len(pairs) == 30 == len(set(pairs))
    assert all(m != f and m in ids and f in ids for m, f in pairs)
    assert pairs == ds.test_pairs(ids, 30, seed=0)
    assert pairs != ds.test_pairs(ids, 30, seed=1)
    assert ds.test_pairs(ids, 10, seed=0) == pairs[:10]
    # beyond the unordered pairs: every ordered pair exactly once
    allp = ds.test_pairs(ids[:4], 12, seed=0)
    assert sorted(allp) == sorted((a, b) for a in ids[:4] for b in ids[:4] if a != b)
    with pytest.raises(InputError, match="at most 12"):
        ds.test_pairs(ids[:4], 13, 0)
    with pytest.raises(InputError, match="at least 2"):
        ds.test_pairs(ids[:1], 1, 0)


# ---------------------------------------------------------------------------- tiny datasets
N_SUB, SHAPE = 6, (16, 16, 16)
# stored in LPS with 1.5 mm voxels, to exercise the reorientation
AFFINE = np.diag([-1.5, -1.5, 1.5, 1.0])


def _subject_arrays(k: int):
    rng = np.random.default_rng(k)
    lab = np.zeros(SHAPE, np.int16)
    lab[3:8, 3:13, 3:13] = 2
    lab[8:13, 3:13, 3:13] = 41  # right cerebral white matter: merged to 2
    lab[6:10, 6:10, 6 + k % 3:10] = 17
    img = (lab > 0) * 100.0 + rng.normal(0, 5, SHAPE) + 20.0 * k
    return img.astype(np.float32), lab


def _save(path, arr, affine=AFFINE):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(arr, affine), str(path))


def _make_srreg(root, n=N_SUB, mods=("mr", "ct")):
    for k in range(n):
        img, lab = _subject_arrays(k)
        for j, m in enumerate(mods):
            _save(root / "vol" / f"s{k}_{m}.nii.gz", img * (1 + j) + 5 * j)
        _save(root / "seg" / f"s{k}.nii.gz", lab)
    return root


def _make_manifest(root, n=N_SUB, split_col=False):
    rows = ["subject,t1,t2,seg" + (",split" if split_col else "")]
    for k in range(n):
        img, lab = _subject_arrays(k)
        _save(root / "img" / f"s{k}_t1.nii.gz", img)
        _save(root / "img" / f"s{k}_t2.nii.gz", -img)
        _save(root / "lab" / f"s{k}.nii.gz", lab)
        sp = "," + ("train", "train", "val", "val", "test", "test")[k] if split_col else ""
        rows.append(f"s{k},img/s{k}_t1.nii.gz,{root / 'img' / f's{k}_t2.nii.gz'},"
                    f"lab/s{k}.nii.gz{sp}")
    csv_path = root / "manifest.csv"
    csv_path.write_text("\n".join(rows) + "\n")
    return csv_path


def test_srreg_creates_split_and_loads(tmp_path):
    root = _make_srreg(tmp_path / "d")
    d = ds.SRRegDataset(root, split="train", seed=0)
    split = ds.read_split(root / "split.json")
    assert split == ds.make_split([f"s{k}" for k in range(N_SUB)], 2, 2, 0)
    assert d.subjects == split["train"] and len(d) == 2
    assert ds.SRRegDataset(root, split="test", seed=5).subjects == split["test"]  # file kept
    sid = d.subjects[0]
    x = d.load(sid, "mr")
    assert x.shape == (1, *SHAPE) and x.dtype == torch.float32
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    assert d.load(sid, "mr") is x  # cached
    assert d.spacing == (1.5, 1.5, 1.5)
    seg = d.load_seg(sid)
    assert seg.dtype == torch.uint8 and seg.shape == (1, *SHAPE)
    k = int(sid[1:])
    _, lab = _subject_arrays(k)
    canon = np.flip(lab, (0, 1))  # LPS -> RAS flips axes 0 and 1
    expect = np.zeros(SHAPE, np.uint8)
    expect[np.isin(canon, (2, 41))] = ROI_IDS.index(2) + 1
    expect[canon == 17] = ROI_IDS.index(17) + 1
    np.testing.assert_array_equal(seg[0].numpy(), expect)
    # the image is reoriented the same way as the labels
    img, _ = _subject_arrays(k)
    ref = np.flip(img, (0, 1))
    np.testing.assert_allclose(x[0].numpy(), (ref - ref.min()) / (ref.max() - ref.min()),
                               atol=1e-6)


def test_srreg_grid_windows_and_no_cache(tmp_path):
    root = _make_srreg(tmp_path / "d")
    d = ds.SRRegDataset(root, split="val", grid=(12, 16, 20), cache=False,
                        windows={"ct": (40, 80)})
    sid = d.subjects[0]
    x = d.load(sid, "mr")
    assert x.shape == (1, 12, 16, 20)
    assert d.load(sid, "mr") is not x
    assert d.load_seg(sid).shape == (1, 12, 16, 20)
    full = ds.SRRegDataset(root, split="val").load(sid, "mr")
    np.testing.assert_array_equal(x[0, :, :, 2:18].numpy(), full[0, 2:14].numpy())
    assert float(x[0, :, :, :2].abs().max()) == 0.0
    # CT windowed in HU before min-max: values above level + width/2 saturate at 1
    ct = d.load(sid, "ct")
    raw = ds.SRRegDataset(root, split="val", windows={}).load(sid, "ct")
    assert float(ct.max()) == 1.0 and float((ct == 1).float().mean()) > float(
        (raw == 1).float().mean())


def test_srreg_pairs_and_pair_dataset(tmp_path):
    root = _make_srreg(tmp_path / "d", n=8)
    d = ds.SRRegDataset(root, split="train")
    assert len(d.subjects) == 4
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(30):
        p = d.random_pair(rng)
        assert p["moving_id"] != p["fixed_id"]
        assert {"moving", "fixed", "moving_seg", "fixed_seg"} <= set(p)
        assert p["moving"].shape == p["fixed_seg"].shape == (1, *SHAPE)
        seen.add((p["moving_id"], p["fixed_id"]))
    assert len(seen) > 6  # draws vary
    def draw(seed):
        rng = np.random.default_rng(seed)
        return [d.random_pair_ids(rng) for _ in range(50)]

    first = draw(7)
    assert first == draw(7) and first != draw(8)
    assert {m for m, _ in first} == {f for _, f in first} == set(d.subjects)
    fixed_pairs = ds.test_pairs(d.subjects, 3, 0)
    out = list(d.pairs(fixed_pairs))
    assert [(o["moving_id"], o["fixed_id"]) for o in out] == fixed_pairs
    torch.testing.assert_close(out[0]["moving"], d.load(fixed_pairs[0][0], "mr"))
    torch.testing.assert_close(out[0]["fixed"], d.load(fixed_pairs[0][1], "ct"))

    pd = ds.PairDataset(d, length=6, seed=3)
    seq = [(p["moving_id"], p["fixed_id"]) for p in pd]
    assert len(seq) == 6 == len(pd)
    assert seq == [(p["moving_id"], p["fixed_id"]) for p in ds.PairDataset(d, 6, seed=3)]
    rng = np.random.default_rng([3, 0])
    assert seq == [d.random_pair_ids(rng) for _ in range(6)]
    pd.set_epoch(1)
    assert [(p["moving_id"], p["fixed_id"]) for p in pd] != seq
    pd.set_epoch(0)
    loader = torch.utils.data.DataLoader(pd, batch_size=None, num_workers=2)
    assert [(p["moving_id"], p["fixed_id"]) for p in loader] == seq


def test_srreg_errors(tmp_path):
    with pytest.raises(InputError, match="folder not found"):
        ds.SRRegDataset(tmp_path / "missing")
    root = _make_srreg(tmp_path / "d")
    with pytest.raises(InputError, match="unknown split"):
        ds.SRRegDataset(root, split="training")
    # a subject without a label map, when the split is created
    bare = _make_srreg(tmp_path / "e")
    (bare / "seg" / "s3.nii.gz").unlink()
    with pytest.raises(InputError, match=r"s3\.nii\.gz: file not found"):
        ds.SRRegDataset(bare)
    # a missing modality file of a subject in the split
    split = ds.read_split(ds.SRRegDataset(root).root / "split.json")
    victim = split["test"][0]
    (root / "vol" / f"{victim}_ct.nii.gz").unlink()
    with pytest.raises(InputError, match=f"{victim}_ct.nii.gz: file not found"):
        ds.SRRegDataset(root, split="test")
    with pytest.raises(InputError, match="t2.nii.gz: file not found"):
        ds.SRRegDataset(root, split="train", moving="t2")
    with pytest.raises(InputError, match="split file not found"):
        ds.SRRegDataset(root, split_file=tmp_path / "none.json")
    with pytest.raises(InputError, match="grid"):
        ds.SRRegDataset(root, grid=(16, 16))


def test_srreg_spacing_and_shape_mismatch(tmp_path):
    root = _make_srreg(tmp_path / "d")
    d = ds.SRRegDataset(root, split="train")
    a, b = d.subjects
    img, _ = _subject_arrays(0)
    _save(root / "vol" / f"{b}_ct.nii.gz", img, np.diag([-1.0, -1.5, 1.5, 1.0]))
    d.load(a, "ct")
    with pytest.raises(InputError, match="spacing"):
        d.load(b, "ct")
    _save(root / "vol" / f"{a}_t2.nii.gz", img[:, :, :12])
    with pytest.raises(InputError, match="same subject"):
        d.load(a, "t2")


def test_manifest_dataset(tmp_path):
    csv_path = _make_manifest(tmp_path)
    d = ds.ManifestDataset(csv_path, split="train", moving="t1", fixed="t2", grid=(16, 16, 16))
    assert (tmp_path / "manifest_split.json").is_file()
    assert d.subjects == ds.read_split(tmp_path / "manifest_split.json")["train"]
    p = d.random_pair(np.random.default_rng(0))
    assert p["moving"].shape == (1, 16, 16, 16) and p["moving_seg"].dtype == torch.uint8
    # t2 = -t1, so after min-max the two are mirror images in intensity
    sid = d.subjects[0]
    torch.testing.assert_close(d.load(sid, "t2"), 1 - d.load(sid, "t1"))
    assert d.spacing == (1.5, 1.5, 1.5)


def test_manifest_split_column_and_errors(tmp_path):
    csv_path = _make_manifest(tmp_path, split_col=True)
    d = ds.ManifestDataset(csv_path, split="val", moving="t1", fixed="t2")
    assert d.subjects == ["s2", "s3"]
    assert not (tmp_path / "manifest_split.json").exists()
    with pytest.raises(InputError, match="no column 'ct'"):
        ds.ManifestDataset(csv_path, moving="t1", fixed="ct")
    with pytest.raises(InputError, match="manifest not found"):
        ds.ManifestDataset(tmp_path / "x.csv")
    (tmp_path / "lab" / "s4.nii.gz").unlink()
    with pytest.raises(InputError, match=r"s4\.nii\.gz: file not found"):
        ds.ManifestDataset(csv_path, split="test", moving="t1", fixed="t2")
    bad = tmp_path / "bad.csv"
    bad.write_text("subject,t1,t2,seg\na,x.nii.gz,y.nii.gz,z.nii.gz\na,x.nii.gz,y.nii.gz,z\n")
    with pytest.raises(InputError, match="listed twice"):
        ds.ManifestDataset(bad, moving="t1", fixed="t2")
    split = tmp_path / "s.json"
    split.write_text(json.dumps({"seed": 0, "train": ["s0", "zz"], "val": [], "test": []}))
    with pytest.raises(InputError, match="not in the manifest"):
        ds.ManifestDataset(csv_path, split_file=split, moving="t1", fixed="t2")
