"""A projection runner process for the kill tests in test_projections.py.

    python projections_kill.py BATCH_SIZE [DIE_AT]

Catches every projection up with the store the environment names (as `flowledger` reads
it), then exits. With DIE_AT, the process kills itself (SIGKILL) right after the run views
applied notification DIE_AT: in the middle of a batch, its transaction still open.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

from eventsourcing.persistence import Tracking

from flowledger.adapters.settings import build_app, load_settings
from flowledger.projections.runner import runner_for
from flowledger.projections.runs_projection import RunsProjection


def die_at(position: int) -> None:
    """Make the run views' projection SIGKILL this process once it applied `position`."""
    apply = RunsProjection.process_event

    def dying(self: RunsProjection, event: Any, tracking: Tracking) -> None:
        apply(self, event, tracking)
        if tracking.notification_id == position:
            os.kill(os.getpid(), signal.SIGKILL)

    RunsProjection.process_event = dying  # type: ignore[method-assign]


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        die_at(int(argv[1]))
    app = build_app(load_settings())
    try:
        runner_for(app, batch_size=int(argv[0])).catch_up()
    finally:
        app.close()


if __name__ == "__main__":
    main(sys.argv[1:])
