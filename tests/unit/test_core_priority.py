"""shift_priority, run in a child process as the kernel really answers it: raising a priority
without the right to is refused and changes nothing; lowering one moves every thread, those
already running included."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice values in /proc")

CHILD = textwrap.dedent("""
    import json, os, resource, threading
    from tokenrelay_engines.core.priority import shift_priority  # imported while files are readable

    if os.getuid() == 0:
        os.setuid(65534)  # drop CAP_SYS_NICE: root may always raise a priority
    resource.setrlimit(resource.RLIMIT_NICE, (0, 0))  # and no soft allowance to raise one either

    def nices():
        out = []
        for tid in os.listdir("/proc/self/task"):
            out.append(os.getpriority(os.PRIO_PROCESS, int(tid)))
        return sorted(out)

    stop = threading.Event()
    worker = threading.Thread(target=stop.wait)  # a thread started before the shift
    worker.start()
    before = nices()
    raised = shift_priority(-5)
    after_raise = nices()
    lowered = shift_priority(3)
    after_lower = nices()
    stop.set()
    worker.join()
    print(json.dumps(dict(before=before, raised=raised, after_raise=after_raise, lowered=lowered,
                          after_lower=after_lower)))
""")


def test_raising_is_refused_without_the_right_and_lowering_moves_every_thread():
    done = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert len(out["before"]) == 2 and len(set(out["before"])) == 1
    assert out["raised"] is False and out["after_raise"] == out["before"]
    assert out["lowered"] is True
    assert out["after_lower"] == [min(19, n + 3) for n in out["before"]]
