"""Running on several hosts: joining the cluster.

Every process runs the same program (multi-controller JAX). Call
`initialize()` first, before anything touches a device; then build the mesh
with `parallel.mesh.mesh_from_spec` (it spans every process's devices), load
the model with `load_pretrained(..., mesh=mesh)` (each process reads the same
checkpoint and keeps only its shards) and put each batch on the mesh with
`parallel.mesh.place_batch` (every process passes the same batch and keeps
its own rows) or `parallel.mesh.place_rows` (each process computes only its
own rows, as training from data.PackedSequences does).
"""

from __future__ import annotations

import os
import socket
import time

import jax

ENV_COORDINATOR = "STARCODER_JAX_COORDINATOR"  # host:port of process 0
ENV_NUM_PROCESSES = "STARCODER_JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "STARCODER_JAX_PROCESS_ID"
ENV_TIMEOUT = "STARCODER_JAX_INIT_TIMEOUT"  # seconds
DEFAULT_TIMEOUT_S = 300


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, local_device_ids=None,
               timeout_s: int | None = None) -> None:
    """Joins this process to the cluster (`jax.distributed.initialize`).

    With no arguments and none of the STARCODER_JAX_* variables set, JAX
    detects the cluster itself (Cloud TPU, SLURM, Open MPI, Kubernetes).
    Otherwise give all three of coordinator ("host:port" of process 0),
    num_processes and process_id, as arguments or as the environment
    variables STARCODER_JAX_COORDINATOR, _NUM_PROCESSES and _PROCESS_ID.

    timeout_s (or STARCODER_JAX_INIT_TIMEOUT; default 300) bounds the wait
    for the coordinator and the other processes. A process other than 0
    first waits for the coordinator's port to accept connections and raises
    TimeoutError if it never does; past that point JAX's own timeout ends
    the process (it aborts with DEADLINE_EXCEEDED) instead of hanging.
    """
    coordinator = coordinator or os.environ.get(ENV_COORDINATOR) or None
    num_processes = _int_or_env(num_processes, ENV_NUM_PROCESSES, "num_processes")
    process_id = _int_or_env(process_id, ENV_PROCESS_ID, "process_id")
    timeout_s = _int_or_env(timeout_s, ENV_TIMEOUT, "timeout_s") or DEFAULT_TIMEOUT_S
    if timeout_s < 1:
        raise ValueError(f"timeout_s must be >= 1 second, got {timeout_s}")
    given = {"coordinator": coordinator, "num_processes": num_processes, "process_id": process_id}
    if all(v is None for v in given.values()):
        jax.distributed.initialize(local_device_ids=local_device_ids,
                                   initialization_timeout=timeout_s)
        return
    missing = [k for k, v in given.items() if v is None]
    if missing:
        raise ValueError(
            f"initialize needs coordinator, num_processes and process_id together (or none of "
            f"them, to auto-detect the cluster); missing: {', '.join(missing)} (arguments or "
            f"{ENV_COORDINATOR} / {ENV_NUM_PROCESSES} / {ENV_PROCESS_ID})")
    host, port = _host_port(coordinator)
    if num_processes < 1:
        raise ValueError(f"num_processes must be >= 1, got {num_processes}")
    if not 0 <= process_id < num_processes:
        raise ValueError(f"process_id must be in [0, {num_processes}), got {process_id}")
    if process_id != 0:
        wait_for_coordinator(host, port, timeout_s)
    jax.distributed.initialize(coordinator, num_processes, process_id,
                               local_device_ids=local_device_ids,
                               initialization_timeout=timeout_s)


def _int_or_env(value, env: str, name: str) -> int | None:
    if value is not None:
        return int(value)
    raw = os.environ.get(env)
    if raw is None or raw == "":
        return None
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{env} (for {name}) must be an integer, got {raw!r}") from None


def _host_port(coordinator: str) -> tuple[str, int]:
    host, sep, port = coordinator.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"coordinator must be 'host:port', got {coordinator!r}")
    return host.strip("[]"), int(port)


def wait_for_coordinator(host: str, port: int, timeout_s: float) -> None:
    """Polls until host:port accepts a TCP connection; TimeoutError after timeout_s.

    The coordinator may start after its workers, so refusals are retried.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, port), timeout=min(5.0, timeout_s)):
                return
        except OSError as err:
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"no coordinator accepted connections at {host}:{port} within {timeout_s} s "
                    f"(last error: {err}); is process 0 running, and is the address right?"
                ) from None
            time.sleep(0.25)
