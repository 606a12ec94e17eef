"""Work beside the dispatch loop (manifests, retention, webhooks): each on a thread of its own, in rounds, so a
slow LLM, store or receiver never holds up dispatch, and a failed round (the database away) is only logged."""

from __future__ import annotations

import logging
import threading

log = logging.getLogger("jobcell.background")


class Periodic:
    name = "background"

    def __init__(self, every_s: float) -> None:
        self.every_s = every_s
        self.stopping = threading.Event()

    def start(self) -> threading.Thread:
        t = threading.Thread(target=self.run, name=f"jobcell-{self.name}", daemon=True)
        t.start()
        return t

    def stop(self) -> None:
        self.stopping.set()

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                more = self.round()
            except Exception as e:  # the database or a service is away: the next round tries again
                log.warning("%s round failed (%s: %s); retrying in %.0f s", self.name, type(e).__name__, e,
                            self.every_s)
                more = False
            if not more:
                self.stopping.wait(self.every_s)

    def round(self) -> bool:
        """One round of work; True if there may be more at once."""
        raise NotImplementedError
