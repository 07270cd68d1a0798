"""Per-session runs: which sessions had one, so a missing run is explained instead of "generate first".

A session's last run lives in ``gr.State``. Gradio drops it in two ways the user does not see: the
state holder keeps only the most recent sessions (``state_session_capacity``) and evicts the
oldest, and a state value expires after its ``time_to_live``. Either way the next request finds
``None``, exactly as if nothing had been generated. :class:`RunLedger` remembers, per session id,
when a run was last stored (a few bytes each, bounded), so a handler can say what happened.
"""
from __future__ import annotations

import threading
import time
from collections import OrderedDict
from typing import Callable


class RunLedger:
    """When each session last stored a run; explains a run that has since disappeared.

    ``capacity`` gives the state holder's session capacity when asked (it is set at launch);
    ``ttl_s`` is the run state's time to live; ``remember`` bounds how many sessions are kept.
    ``clock`` is injectable for tests.
    """

    def __init__(self, capacity: Callable[[], int | None], ttl_s: float, remember: int = 20_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._capacity = capacity
        self.ttl_s = float(ttl_s)
        self.remember = int(remember)
        self._clock = clock
        self._stored: OrderedDict[str, float] = OrderedDict()
        self._lock = threading.Lock()

    def stored(self, session: str | None) -> None:
        """Note that ``session`` has just stored a run."""
        if not session:
            return
        with self._lock:
            self._stored[session] = self._clock()
            self._stored.move_to_end(session)
            while len(self._stored) > self.remember:
                self._stored.popitem(last=False)

    def missing(self, session: str | None) -> str | None:
        """Why ``session``'s run is gone (evicted or expired), or None if it never stored one."""
        if not session:
            return None
        with self._lock:
            when = self._stored.get(session)
        if when is None:
            return None
        age_min = (self._clock() - when) / 60
        if self._clock() - when >= self.ttl_s:
            return (f"your last run expired: runs are kept for {self.ttl_s / 60:.0f} minutes and yours was made "
                    f"{age_min:.0f} minutes ago. Generate it again (the same prompt and seed give the same image).")
        capacity = self._capacity()
        kept = f"the runs of its {capacity} most recent sessions" if capacity else "only its most recent sessions' runs"
        return (f"your last run was evicted: the app keeps {kept}, and newer sessions pushed yours out. "
                "Generate it again (the same prompt and seed give the same image).")
