"""Pytest fixtures that start real Slurm clusters on this machine (cluster/localslurm.py).

Load from tests/conftest.py with ``from slurm_fixtures import *``.

- ``slurm_cluster`` (session): accounting (slurmdbd + private mariadb), 1 fake GPU.
- ``slurm_env`` (function): sets ``SLURM_CONF`` to ``slurm_cluster``'s for the test
  (in-process submitit and subprocesses both see it), restored afterwards.
- ``slurm_cluster_no_accounting`` (module): a second cluster, other ports, no slurmdbd,
  so ``sacct`` fails there; ``slurm_env_no_accounting`` (function) sets its SLURM_CONF.
- ``multinode_cluster`` (session): two nodes n1, n2 (2 CPUs each), accounting, the fake GPU on n2,
  partitions debug (default), short, gpu, low and high (localslurm's docstring); ``multinode_env``
  (function) sets its SLURM_CONF.

If a cluster cannot be started here (programs missing, not root, ...) the fixtures skip
the test with the reason, unless ``REQUIRE_SLURM=1`` is set: then they fail it.
"""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

__all__ = [
    "slurm_cluster",
    "slurm_env",
    "slurm_cluster_no_accounting",
    "slurm_env_no_accounting",
    "multinode_cluster",
    "multinode_env",
]

_LOCALSLURM_PATH = Path(__file__).resolve().parent.parent / "cluster" / "localslurm.py"


def _load_localslurm():
    mod = sys.modules.get("localslurm")
    if mod is not None:
        return mod
    spec = importlib.util.spec_from_file_location("localslurm", _LOCALSLURM_PATH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["localslurm"] = mod  # one instance, also for `import localslurm`
    spec.loader.exec_module(mod)
    return mod


localslurm = _load_localslurm()


def _require() -> bool:
    return os.environ.get("REQUIRE_SLURM", "") == "1"


def _unavailable(reason: str):
    reason = f"no local Slurm cluster: {reason}"
    if _require():
        pytest.fail(f"{reason} (REQUIRE_SLURM=1)", pytrace=False)
    pytest.skip(reason)


def skip_unless_slurm(accounting: bool = True) -> None:
    """Skip (or fail, with REQUIRE_SLURM=1) when a cluster cannot be started here."""
    problems = localslurm.missing_requirements(accounting)
    if problems:
        _unavailable("; ".join(problems))


def start_cluster(folder, **kwargs):
    """Start a cluster or skip/fail the requesting test (see REQUIRE_SLURM)."""
    skip_unless_slurm(kwargs.get("accounting", True))
    try:
        return localslurm.start(folder, **kwargs)
    except Exception as exc:  # SlurmStartError carries the daemons' log tails
        _unavailable(f"{type(exc).__name__}: {exc}")


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A running single-node cluster with accounting and one fake GPU (whole session)."""
    # 4 CPUs on a 2-core machine: the integration tests' small 1-CPU jobs run side by side.
    cluster = start_cluster(tmp_path_factory.mktemp("slurm"), accounting=True, gpus=1, cpus=4)
    yield cluster
    cluster.stop()


@pytest.fixture
def slurm_env(slurm_cluster, monkeypatch):
    """``slurm_cluster`` with ``SLURM_CONF`` exported for this test only."""
    return _export(slurm_cluster, monkeypatch)


@pytest.fixture(scope="module")
def slurm_cluster_no_accounting(tmp_path_factory):
    """A second running cluster (own ports and job ids), without slurmdbd (sacct fails) and without GPUs."""
    cluster = start_cluster(tmp_path_factory.mktemp("slurm_noacct"), accounting=False, gpus=0)
    yield cluster
    cluster.stop()


@pytest.fixture
def slurm_env_no_accounting(slurm_cluster_no_accounting, monkeypatch):
    """``slurm_cluster_no_accounting`` with its ``SLURM_CONF`` exported for this test."""
    return _export(slurm_cluster_no_accounting, monkeypatch)


@pytest.fixture(scope="session")
def multinode_cluster(tmp_path_factory):
    """A running two-node cluster, sharing this machine (4 CPUs offered: 2 a node)."""
    cluster = start_cluster(tmp_path_factory.mktemp("slurm_multinode"), accounting=True, gpus=1, cpus=4, nodes=2)
    yield cluster
    cluster.stop()


@pytest.fixture
def multinode_env(multinode_cluster, monkeypatch):
    """``multinode_cluster`` with its ``SLURM_CONF`` exported for this test only."""
    return _export(multinode_cluster, monkeypatch)


def _export(cluster, monkeypatch):
    for key, value in cluster.env.items():
        monkeypatch.setenv(key, value)
    return cluster
