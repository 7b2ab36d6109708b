import os

import pytest
import torch

os.environ.setdefault("RAY_DEDUP_LOGS", "0")  # as the jobs run (distmeta/cluster.py), before any test imports Ray

from distmeta.data import make_synthetic_corpus


def pytest_addoption(parser):
    parser.addoption("--device", default="cpu",
                     help="where the device tests compute (cpu, cuda, cuda:1); they compare it with the CPU")


@pytest.fixture(scope="session")
def device(request):
    """The device the `--device` tests run the library's compute on, beside a CPU reference. TF32 is off
    there: on CUDA, cuDNN's convolutions (WavLM's feature encoder and positional convolution) use it by
    default, ~1e-3 off float32, which would hide any real difference behind the tolerance."""
    chosen = torch.device(request.config.getoption("--device"))
    if chosen.type == "cuda":
        if not torch.cuda.is_available():
            raise pytest.UsageError("--device cuda: torch sees no CUDA device here")
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    return chosen


@pytest.fixture(scope="session")
def assert_near():
    """assert_near(ours, reference, rel=1e-4, what=""): a tensor, or a dict or list of them (a state, a set of
    gradients), equal to `rel` of the largest magnitude in the whole reference, wherever each was computed: how
    a device's result is held to the CPU's. One scale for the whole set, not one per tensor: some entries are
    rounding noise around an exact 0 (attention's key biases: softmax ignores what they add to every score,
    so their gradient is 0 but for rounding), and AdamW turns that noise into full-size steps in directions
    the model's output does not depend on. The first H200 run compared each tensor with its own largest
    entry and failed there alone: 1.4e-11 against 6.3e-12 (a key bias's meta-gradient), 4.0e-6 against
    2.1e-7 (the same bias after 2 epochs of AdamW), 8.3e-5 against 2.7e-3 (the Q-Former's in_proj_bias)."""
    def leaves(value, what):
        if isinstance(value, dict):
            return [leaf for key in sorted(value, key=str) for leaf in leaves(value[key], f"{what}{key}")]
        if isinstance(value, (list, tuple)):
            return [leaf for i, item in enumerate(value) for leaf in leaves(item, f"{what}[{i}]")]
        return [(what, torch.as_tensor(value).detach().cpu().double())]

    def check(ours, reference, rel=1e-4, what=""):
        ours, reference = leaves(ours, what), leaves(reference, what)
        assert [name for name, _ in ours] == [name for name, _ in reference], f"{what}: other entries"
        scale = max(float(b.abs().max()) for _, b in reference if b.numel())
        for (name, a), (_, b) in zip(ours, reference):
            assert a.shape == b.shape, f"{name}: shape {tuple(a.shape)} != {tuple(b.shape)}"
            gap = float((a - b).abs().max()) if b.numel() else 0.0
            assert gap <= rel * scale, f"{name}: max difference {gap:.3g}, {gap / scale:.2g} of the reference's largest magnitude {scale:.3g}"
    return check


@pytest.fixture(scope="module")
def ray_local():
    """The tests' local Ray (2 CPUs, no dashboard): one for the session, started by the first module that asks
    and shut down when the session ends. The job tests start their own, as a user's job does, and shut it
    down; the next module that asks starts this one again. A test that starts actors stops them (in a
    `finally`), so they hold no CPU the next test's Ray Train run waits for."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    return ray


@pytest.fixture(scope="session", autouse=True)
def _ray_down_at_the_end():
    import sys

    yield
    if "ray" in sys.modules:
        sys.modules["ray"].shutdown()


@pytest.fixture(scope="session", autouse=True)
def tiny_upstreams():
    """The random tiny upstreams the tests construct (seeds 0 and 1), built into the cache as a job builds its
    upstream before constructing a model: constructing an `Upstream` only loads."""
    from distmeta.models import UpstreamConfig
    from distmeta.training.tiny_wavlm import ready

    for seed in (0, 1):
        ready(UpstreamConfig(name="tiny", seed=seed))


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory):
    """A 300-utterance synthetic corpus, generated once per test session."""
    return make_synthetic_corpus(tmp_path_factory.mktemp("synthetic"), seed=3, n_utterances=300, progress=False)


@pytest.fixture(scope="session", autouse=True)
def distmeta_home(tmp_path_factory):
    """Tests keep their MLflow store out of the user's ~/.local/share/distmeta."""
    import os

    home = tmp_path_factory.mktemp("distmeta_home")
    previous = os.environ.get("DISTMETA_HOME")
    os.environ["DISTMETA_HOME"] = str(home)
    yield home
    if previous is None:
        os.environ.pop("DISTMETA_HOME", None)
    else:
        os.environ["DISTMETA_HOME"] = previous


@pytest.fixture(scope="module")
def meta_setting(small_corpus):
    """(MetaConfig, a tiny SER meta-model from scratch, its pooled bank, the training tasks, the validation task) of
    the small corpus's first unseen split: what the meta-learner's and one split's tests train."""
    from distmeta.data import rotation
    from distmeta.listener.metatrain import build_meta_model, make_bank
    from distmeta.meta.learner import MetaConfig
    from distmeta.models import UpstreamConfig

    split = rotation(small_corpus, "unseen")[0]
    config = MetaConfig(ini=False, outer_steps=4, shots=8, val_every=2, val_seeds=1, val_queries=8, test_steps=3,
                        inner_steps=2, inner_lr=0.05, outer_lr=1e-2, val_steps=3)
    model = build_meta_model(UpstreamConfig(), None, config)
    tasks, val_task = split.train_tasks(small_corpus), split.val_task(small_corpus)
    pool = sorted({u for t in tasks for u in t.utterances} | set(val_task.utterances))
    return config, model, make_bank(model, small_corpus, pool, config, None), tasks, val_task
