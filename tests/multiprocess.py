"""Launches a binary as several JAX processes on this machine, as a multi-host run would.

The processes find each other through the coordinator on 127.0.0.1 (the IPR_JAX_* variables of
`host_devices.initialize_distributed`) and exchange collectives with gloo; each has its own XLA
CPU devices.
"""

import os
import socket
import subprocess
import sys

from ipr_jax import host_devices


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def run_processes(module: str, args: list[str], num_processes: int = 2,
                  devices_per_process: int = 1, timeout: float = 900,
                  extra_env: dict[str, str] | None = None) -> list[str]:
  """Runs `python -m module *args --config.distributed=True` as `num_processes` processes.

  Returns:
    Each process's stdout + stderr.

  Raises:
    AssertionError: a process failed or timed out (with the tail of its output).
  """
  port = free_port()
  procs = []
  for process_id in range(num_processes):
    env = {**os.environ,
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices_per_process}",
           "JAX_PLATFORMS": "cpu",
           host_devices.COORDINATOR_ENV: f"127.0.0.1:{port}",
           host_devices.NUM_PROCESSES_ENV: str(num_processes),
           host_devices.PROCESS_ID_ENV: str(process_id), **(extra_env or {})}
    procs.append(subprocess.Popen(
        [sys.executable, "-m", module, *args, "--config.distributed=True"], env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
  outputs = []
  try:
    for proc in procs:
      out, _ = proc.communicate(timeout=timeout)
      outputs.append(out)
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
  for process_id, (proc, out) in enumerate(zip(procs, outputs)):
    assert proc.returncode == 0, f"process {process_id} exited {proc.returncode}:\n{out[-4000:]}"
  return outputs
