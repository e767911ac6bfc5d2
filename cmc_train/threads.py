"""CPU threads for `cmc train` and `cmc evaluate` (`--threads`).

PyTorch starts one intra-op thread per core and its OpenMP workers spin while they wait.
When anything else needs a core (another run, a data job, the desktop) the spinning
threads and the other work take the core from each other. Measured on a 2-core Xeon shared
with other jobs (load average 2-4), tiny preset, 12 steps each, one run after the other:
2 threads (PyTorch's default there) 6.3 s/step (1.8-13.4 s), 1 thread 2.0 s/step
(1.1-3.4 s); a user's 2-core run reported 2.7-16.6 s (mean about 7 s) against 1.3 s. So by
default one core is left free: cores - 1 threads (at least 1), divided between the
processes of a `torchrun` run on this host. On an idle machine `--threads` with every core
can be faster.
"""

from __future__ import annotations

import os

from cmc_train.errors import ConfigError


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity, e.g. under taskset or a scheduler)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def default_threads() -> int:
    """All usable cores but one, shared by this host's training processes, at least 1."""
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, (usable_cores() - 1) // max(1, local_processes))


def set_threads(threads: int | None) -> int:
    """Set torch's intra-op threads (`None`: `default_threads()`); returns the number set."""
    import torch

    count = default_threads() if threads is None else threads
    if count < 1:
        raise ConfigError(f"--threads must be >= 1, got {count}")
    torch.set_num_threads(count)
    return count
