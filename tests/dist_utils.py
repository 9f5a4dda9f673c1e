"""Helpers for tests that run real multi-process (gloo) groups."""

import socket
import time

import pytest
import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_and_wait(fn, args, nprocs: int, timeout_s: float, what: str) -> None:
    """``mp.spawn(fn, args)``; fail the test (killing the children) if it does not finish in
    ``timeout_s``. A child's exception is re-raised with its traceback."""
    ctx = mp.spawn(fn, args=args, nprocs=nprocs, join=False)
    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
        if time.monotonic() >= deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            for p in ctx.processes:
                p.join(5)
            pytest.fail(f"{what} did not finish within {timeout_s:.0f} s (a collective is "
                        f"probably missing on one rank)")
