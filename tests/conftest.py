import pytest
import torch


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="run tests marked slow")


def pytest_collection_modifyitems(config, items):
    skip_slow = pytest.mark.skip(reason="slow: pass --runslow to run")
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "slow" in item.keywords and not config.getoption("--runslow"):
            item.add_marker(skip_slow)
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_phantom(tmp_path_factory):
    """A 8-subject phantom at 32x48x32, 5 mm (split 4/2/2), built once per test session."""
    from mambamorph.data.phantom import build_phantom

    root = tmp_path_factory.mktemp("phantom") / "ph"
    build_phantom(root, n_subjects=8, preset=None, grid=(32, 48, 32), spacing=5.0, seed=0,
                  n_val=2, n_test=2)
    return root


@pytest.fixture(scope="session")
def tiny_pair(tiny_phantom):
    """The first MR -> CT test pair of ``tiny_phantom`` (32x48x32 at 5 mm): ``moving``/``fixed``
    ``(1, 1, D0, D1, D2)`` float32 images, ``moving_seg``/``fixed_seg`` ``(D0, D1, D2)`` compact
    ROI indices (numpy), ``spacing`` in mm."""
    from mambamorph.config import DataConfig
    from mambamorph.data.datasets import open_dataset, test_pairs

    ds = open_dataset(DataConfig(root=str(tiny_phantom)), "test", 0)
    item = next(iter(ds.pairs(test_pairs(ds.subjects, 1, 0))))
    return {"moving": item["moving"][None].float(), "fixed": item["fixed"][None].float(),
            "moving_seg": item["moving_seg"][0].numpy(), "fixed_seg": item["fixed_seg"][0].numpy(),
            "spacing": tuple(float(s) for s in ds.spacing)}


@pytest.fixture
def one_thread():
    """Torch on one thread for the test (instance optimisation's many small ops run far slower
    on two threads of a busy 2-core machine), restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def last_logged_step(run) -> int:
    """The last step logged in ``run/log.csv`` (0 when there is none yet); for the tests that
    kill or stop a training run part-way (resume, distributed)."""
    try:
        lines = (run / "log.csv").read_text().splitlines()[1:]
    except OSError:
        return 0
    return max([int(r.split(",")[0]) for r in lines if r.split(",")[0].isdigit()], default=0)
