"""`python -m tests.cluster.node CONFIG`: a real `edison serve` node for the cluster tests,
with the pipeline run instrumented across processes (what tests/integration's StepGate does
within one process):

- every run writes ``$EDISON_TEST_RUNS/<node>.<pid>.<n>.start`` when it starts and
  ``....done`` when it completes (so a test counts completions over every node, dead ones
  included);
- while the file ``$EDISON_TEST_HOLD`` exists a run waits at the end of its first step
  (a cancel still stops it there), so a test has a job in flight without a long run.

Everything else is `edison serve` unchanged: the cli, the app, the gate, real pipelines.
"""

from __future__ import annotations

import itertools
import os
import sys
import time
from pathlib import Path
from typing import Any

from services.generation.pipelines import PipelineHost

_count = itertools.count(1)


def _instrument() -> None:
    runs = Path(os.environ["EDISON_TEST_RUNS"])
    hold = Path(os.environ["EDISON_TEST_HOLD"])
    node = os.environ["EDISON_TEST_NODE"]
    original = PipelineHost.run

    def run(self: Any, params: Any, *, on_step=None, should_cancel=None, **kw: Any):  # noqa: ANN001, ANN202
        stem = f"{node}.{os.getpid()}.{next(_count)}"
        (runs / f"{stem}.start").write_text(params.prompt)

        def step(done: int, total: int) -> None:
            if on_step is not None:
                on_step(done, total)
            if done == 1:
                while hold.exists() and not (should_cancel is not None and should_cancel()):
                    time.sleep(0.02)

        result = original(self, params, on_step=step, should_cancel=should_cancel, **kw)
        (runs / f"{stem}.done").write_text(params.prompt)
        return result

    PipelineHost.run = run  # type: ignore[method-assign]


if __name__ == "__main__":
    _instrument()
    from app.cli import main

    sys.exit(main(["serve", "--config", sys.argv[1]]))
