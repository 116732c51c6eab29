"""CPU priority of the engine core over its front ends (nice values, Linux and other POSIX).

The engine core is the server's bottleneck: while it waits for a CPU, every request waits. When
front ends are busy (a flood of cheap RPCs, many streams) and share the cores with it, the
kernel's fair scheduler would give each busy process an equal share. With a priority gap of N
nice levels the core wins those contests (about 1.25x the weight per level) and a loaded front
end coalesces more tokens into each message instead.

Who moves: the core raises itself by N at start-up, before it starts any thread, when that is
permitted (CAP_SYS_NICE, or RLIMIT_NICE high enough); otherwise each front end lowers itself
by N once the core says it could not (`Hello.priority_raised`). Within a container both come
to the same thing: nice values weigh processes against others in the same cgroup.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


def shift_priority(delta: int) -> bool:
    """Add `delta` to the nice value of every thread of this process (threads started later
    inherit it from the thread that starts them). False when the system does not permit it."""
    if delta == 0:
        return True
    try:
        tids: list[int] | None = [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        tids = None
    try:
        if tids is None:  # not Linux: nice is per process
            os.nice(delta)
        else:
            for tid in tids:
                os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + delta)
    except OSError as exc:
        log.debug("could not change the nice value by %d: %s", delta, exc)
        return False
    return True
