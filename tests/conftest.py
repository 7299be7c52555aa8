import contextlib
import os
import tempfile

import pytest
import torch
from hypothesis import settings

# Property-based tests: the same examples on every run (CI must not turn red on a draw), no example database on
# disk. HYPOTHESIS_PROFILE=explore draws new, more examples when hunting for bugs locally.
settings.register_profile("ci", derandomize=True, database=None, deadline=None)
settings.register_profile("explore", max_examples=500, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# A shared model cache for the whole test session (zoo models are trained once, then reused).
os.environ.setdefault("TROJANGUARD_CACHE", os.path.join(tempfile.gettempdir(), "trojanguard-test-cache"))
os.environ.setdefault("TROJANGUARD_PROGRESS", "0")
# Without a GPU, Triton kernels are tested on CPU by the interpreter (set before triton is imported).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Under pytest-xdist (`make test`: one worker per core) the workers share the cores: each gets its share of torch
# threads (and so do the processes its tests start, through OMP_NUM_THREADS), so two workers on two cores do not run
# four threads that stall each other's synchronisation.
if os.environ.get("PYTEST_XDIST_WORKER"):
    _share = max(1, torch.get_num_threads() // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
    torch.set_num_threads(_share)
    os.environ["OMP_NUM_THREADS"] = str(_share)

# Session fixtures that train models: the test files using one form one unit of work under pytest-xdist, so each
# fixture is built on one worker only.
SESSION_MODEL_FIXTURES = {"ssl_zoo": "fixture:ssl_zoo", "badencoder_zoo": "fixture:ssl_zoo",  # one builds on the other
                          "clip_zoo": "fixture:clip_zoo"}


@pytest.hookimpl(optionalhook=True)  # without pytest-xdist (a bare `pytest`, the GPU machine) there is no such hook
def pytest_xdist_make_scheduler(config, log):
    """``make test``'s scheduling (``--dist loadfile``): a file's tests run on one worker (its module fixtures are
    built once), and so do all files that use a session fixture of :data:`SESSION_MODEL_FIXTURES` (one unit per
    fixture, found by name in the files' text)."""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    tests = config.rootpath / "tests"
    shared: dict[str, str] = {}
    for path in sorted(tests.rglob("test_*.py")):
        text = path.read_text(encoding="utf-8")
        unit = next((unit for name, unit in SESSION_MODEL_FIXTURES.items() if name in text), None)
        if unit:
            shared[path.relative_to(config.rootpath).as_posix()] = unit

    class FilesSharingFixtures(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return shared.get(path, path)

    return FilesSharingFixtures(config, log)


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` need CUDA: without a device they are skipped, and the reason is printed (-ra)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="gpu: needs a CUDA device; torch.cuda.is_available() is False on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@contextlib.contextmanager
def model_cache(folder):
    """Within the block: TROJANGUARD_CACHE is ``folder``; the session's setting is restored after it."""
    before = os.environ.get("TROJANGUARD_CACHE")
    os.environ["TROJANGUARD_CACHE"] = str(folder)
    try:
        yield
    finally:
        if before is None:
            del os.environ["TROJANGUARD_CACHE"]
        else:
            os.environ["TROJANGUARD_CACHE"] = before


@contextlib.contextmanager
def empty_cache_one_thread(folder):
    """Within the block: TROJANGUARD_CACHE is ``folder`` (a new, empty one) and torch runs one thread; both restored
    after it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with model_cache(folder):
            yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def ssl_zoo_cache(tmp_path_factory):
    """The model cache of ``ssl_zoo`` and ``badencoder_zoo`` (empty when the session starts): set only while they
    are built or read, so the other tests of their worker share the session's cache with the other workers."""
    return tmp_path_factory.mktemp("ssl-cache")


@pytest.fixture(scope="session")
def ssl_zoo(ssl_zoo_cache):
    """The SSL zoo's default poisoned encoder and its clean twin (``SSLZooConfig()``), trained once per test session
    from an empty cache (``ssl_zoo_cache``), on one torch thread: the numbers are then the benchmarks' (they run one
    thread), and a concurrent CPU job does not stall two threads' synchronisation (on two shared cores it made an
    epoch ~6× slower). The rest of the session stays on one thread, so the tests that measure these encoders
    measure them as the benchmarks do."""
    from trojanguard.zoo import SSLZooConfig, get_poisoned_encoder

    torch.set_num_threads(1)
    with model_cache(ssl_zoo_cache):
        config = SSLZooConfig()
        return get_poisoned_encoder(config, show_progress=False), get_poisoned_encoder(config.clean(),
                                                                                        show_progress=False)


@pytest.fixture(scope="session")
def badencoder_zoo(ssl_zoo, ssl_zoo_cache):
    """The SSL zoo's BadEncoder (``SSLZooConfig(attack="badencoder")``, 16 px): the clean encoder of ``ssl_zoo``
    (same cache, so it is not trained twice) fine-tuned by BadEncoder, on one torch thread."""
    from trojanguard.zoo import SSLZooConfig, get_poisoned_encoder

    with model_cache(ssl_zoo_cache):
        return get_poisoned_encoder(SSLZooConfig(attack="badencoder"), show_progress=False)


@pytest.fixture(scope="session")
def clip_zoo(tmp_path_factory):
    """The image–text zoo's BadNet and blended tiny CLIPs (16 px, 10 % poisoned pairs), trained once per session from
    an empty cache on one torch thread (~7 s each); the cache setting is restored as soon as they are built."""
    from trojanguard.zoo import CLIPZooConfig, get_poisoned_clip

    with empty_cache_one_thread(tmp_path_factory.mktemp("clip-cache")):  # restored before any test runs: the models are
        return {a: get_poisoned_clip(CLIPZooConfig(attack=a), show_progress=False) for a in ("badnets", "blended")}


@pytest.fixture
def one_thread():
    """The test runs on one torch thread (restored after): its numbers are then the benchmarks', which run one
    thread, whatever ran before it (float sums split over two threads round differently)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
