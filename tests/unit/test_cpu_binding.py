"""On a CPU with few cores, vLLM's single worker is bound to all of them; otherwise vLLM binds."""

from __future__ import annotations

import os

import pytest

from server.cli import cpu_binding


@pytest.fixture
def cores(monkeypatch):
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    monkeypatch.delenv("VLLM_CPU_NUM_OF_RESERVED_CPU", raising=False)
    return lambda ids: monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(ids))


def test_a_small_machine_gives_its_worker_every_core(cores):
    cores({2, 3})
    assert cpu_binding(["--model", "m"]) == {"VLLM_CPU_OMP_THREADS_BIND": "2,3", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}


@pytest.mark.parametrize("argv", [["--tensor-parallel-size", "2"], ["-tp", "2"], ["--data-parallel-size", "2"], ["-pp", "2"]])
def test_parallel_runs_keep_vllms_binding(cores, argv):
    cores({0, 1})
    assert cpu_binding(["--model", "m", *argv]) == {}


def test_larger_machines_and_explicit_bindings_keep_vllms_choice(cores, monkeypatch):
    cores(range(8))
    assert cpu_binding([]) == {}
    cores({0, 1})
    monkeypatch.setenv("VLLM_CPU_NUM_OF_RESERVED_CPU", "1")
    assert cpu_binding([]) == {}
