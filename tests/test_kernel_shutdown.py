"""A kernel that ran stage 01's processes shuts down at once under the pipeline's patient manager."""

import asyncio
import time
from pathlib import Path

import pytest

from furlib import pipeline

psutil = pytest.importorskip("psutil")  # ipykernel's own dependency: how it finds a kernel's children
ROOT = Path(__file__).resolve().parent.parent
CODE = "import operator\nfrom furlib.data import shares\nresults = shares.run_processes(operator.add, 2, progress=False)"


async def _run_then_shut_down() -> tuple[list, float, list]:
    """(the kernel's processes after the cell, seconds its shutdown took, those still alive after)."""
    km = pipeline.patient_kernel_manager()()
    await km.start_kernel(cwd=str(ROOT))
    kernel = psutil.Process(km.provisioner.pid)
    kc = km.client()
    kc.start_channels()
    try:
        await kc.wait_for_ready(timeout=60)
        reply = await kc.execute_interactive(CODE, timeout=60)
        assert reply["content"]["status"] == "ok", reply["content"]
        children = kernel.children(recursive=True)
        start = time.monotonic()
        await km.shutdown_kernel()
        took = time.monotonic() - start
    finally:
        kc.stop_channels()
        if await km.is_alive():
            await km.shutdown_kernel(now=True)
    survivors = [p for p in children if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    for process in survivors:  # an orphan the assertion below reports must not outlive the test
        process.kill()
    return children, took, survivors


def test_a_kernel_that_ran_the_processes_shuts_down_at_once():
    """The pool's resource tracker (multiprocessing's, which ignores SIGTERM) outlived the pool: at
    shutdown ipykernel sent it SIGTERMs for 14 s, then SIGKILLs for 14 s more at its unreaped
    zombie, while the patient manager waited (29 s for every 01 run)."""
    children, took, survivors = asyncio.run(_run_then_shut_down())
    assert not survivors, f"left running after the kernel: {survivors}"
    assert not children, f"still running after run_processes returned: {children}"
    assert took < 5, f"the kernel took {took:.1f} s to shut down"
