"""Launches a binary as several JAX processes on this machine, as a multi-host run would.

The processes find each other through the coordinator on 127.0.0.1 (the IPR_JAX_* variables of
`host_devices.initialize_distributed`) and exchange collectives with gloo; each has its own XLA
CPU devices. Their output goes to files, so that a test can act while they run (send a signal)
without a full pipe blocking them.
"""

import os
import socket
import subprocess
import sys
import tempfile
import time

from ipr_jax.runtime import host_devices


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def start_processes(
    module: str,
    args: list[str],
    num_processes: int = 2,
    devices_per_process: int = 1,
    extra_env: dict[str, str] | None = None,
    process_args: dict[int, list[str]] | None = None,
) -> list[subprocess.Popen]:
  """Starts `python -m module *args --config.distributed=True` as `num_processes` processes,
  process p with `process_args[p]` appended (a host given other flags); `wait_processes`
  collects them."""
  port = free_port()
  procs = []
  for process_id in range(num_processes):
    env = {
        **os.environ,
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices_per_process}",
        "JAX_PLATFORMS": "cpu",
        host_devices.COORDINATOR_ENV: f"127.0.0.1:{port}",
        host_devices.NUM_PROCESSES_ENV: str(num_processes),
        host_devices.PROCESS_ID_ENV: str(process_id),
        **(extra_env or {}),
    }
    output = tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            module,
            *args,
            *(process_args or {}).get(process_id, []),
            "--config.distributed=True",
        ],
        env=env,
        stdout=output,
        stderr=subprocess.STDOUT,
        text=True,
    )
    proc.output_file = output
    procs.append(proc)
  return procs


def wait_processes(procs: list[subprocess.Popen], timeout: float) -> list[tuple[int, str]]:
  """Each process's (exit status, stdout + stderr), all within `timeout` seconds in all.

  Raises:
    AssertionError: a process still ran at the deadline (all are killed; their output so far).
  """
  deadline = time.time() + timeout
  timed_out = False
  try:
    for proc in procs:
      try:
        proc.wait(timeout=max(deadline - time.time(), 0.1))
      except subprocess.TimeoutExpired:
        timed_out = True
        break
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
  outputs = []
  for proc in procs:
    proc.output_file.seek(0)
    outputs.append(proc.output_file.read())
    proc.output_file.close()
  if timed_out:
    tails = "\n".join(f"--- process {i}:\n{out[-3000:]}" for i, out in enumerate(outputs))
    raise AssertionError(f"the processes did not end within {timeout:.0f}s:\n{tails}")
  return [(proc.returncode, out) for proc, out in zip(procs, outputs)]


def run_processes(
    module: str,
    args: list[str],
    num_processes: int = 2,
    devices_per_process: int = 1,
    timeout: float = 900,
    extra_env: dict[str, str] | None = None,
) -> list[str]:
  """Runs `python -m module *args --config.distributed=True` as `num_processes` processes.

  Returns:
    Each process's stdout + stderr.

  Raises:
    AssertionError: a process failed or timed out (with the tail of its output).
  """
  procs = start_processes(module, args, num_processes, devices_per_process, extra_env)
  results = wait_processes(procs, timeout)
  for process_id, (returncode, out) in enumerate(results):
    assert returncode == 0, f"process {process_id} exited {returncode}:\n{out[-4000:]}"
  return [out for _, out in results]
