"""What a Ray worker runs with: the executor's own `ray.init` path and the runtime_env every task
gets (a worker on another node does not inherit the driver's environment). Real local Ray."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import pytest

from charshift import executors

REPO = Path(__file__).resolve().parents[1]


def test_runtime_env_forwards_what_a_worker_needs_and_nothing_else():
    environ = {
        "HF_TOKEN": "hf_x",
        "HF_HOME": "/shared/hf",
        "CHARSHIFT_CACHE": "/shared/cache",
        "HF_HUB_OFFLINE": "",  # empty: not forwarded
        "AWS_SECRET_ACCESS_KEY": "never",  # not one of ours
    }
    assert executors.ray_runtime_env(environ) == {
        "env_vars": {
            "HF_TOKEN": "hf_x",
            "HF_HOME": "/shared/hf",
            "CHARSHIFT_CACHE": "/shared/cache",
            "VLLM_WORKER_MULTIPROC_METHOD": "spawn",
        }
    }


def worker_view() -> dict[str, Any]:
    """Run in a Ray worker: what it sees."""
    import charshift

    keys = ("HF_TOKEN", "CHARSHIFT_CACHE", "VLLM_WORKER_MULTIPROC_METHOD")
    return {"env": {k: os.environ.get(k) for k in keys}, "charshift": charshift.__file__}


def test_the_executors_own_ray_init_and_every_task_get_the_runtime_env(monkeypatch, tmp_path):
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        pytest.skip("Ray was started by another test in this process")
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # tests/ is not importable
    monkeypatch.delenv("VLLM_WORKER_MULTIPROC_METHOD", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("PYTHONPATH", str(REPO / "src"))
    monkeypatch.setenv("CHARSHIFT_CACHE", str(tmp_path / "cache"))
    assert executors._start_ray(ray, None)  # started here, so shut down here
    try:
        # Set after the local cluster started (so not inherited by its workers): it reaches the
        # task only through the task's runtime_env, as on a cluster's other nodes.
        monkeypatch.setenv("HF_TOKEN", "hf_dummy")
        [seen] = executors._wave(ray, worker_view, {"num_cpus": 1}, [()])
    finally:
        ray.shutdown()
    assert seen["env"] == {
        "HF_TOKEN": "hf_dummy",
        "CHARSHIFT_CACHE": str(tmp_path / "cache"),
        "VLLM_WORKER_MULTIPROC_METHOD": "spawn",
    }
    assert Path(seen["charshift"]).is_relative_to(REPO / "src")  # this tree, not another install
