"""``dimat.launch`` with one injected crash, for the restart test (tests/test_launch.py).

``DIMAT_TEST_CRASH=RANK:ROUND``: on the first attempt only (``TORCHELASTIC_RESTART_COUNT == 0``),
that rank's process dies (``os._exit``) as it enters that round's exchange, as a killed or
crashed worker would; torchrun then restarts every worker and ``dimat.launch`` resumes.
"""
from __future__ import annotations

import os
import sys

import dimat.launch
from dimat.transport.torchdist import TorchDistTransport


def _arm() -> None:
    crash_rank, crash_round = (int(x) for x in os.environ["DIMAT_TEST_CRASH"].split(":"))
    if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0 or int(os.environ["RANK"]) != crash_rank:
        return
    real = TorchDistTransport.exchange

    def exchange(self, round_idx, *args, **kwargs):  # type: ignore[no-untyped-def]
        if round_idx == crash_round:
            print(f"rank {crash_rank}: crashing on purpose at round {crash_round}", file=sys.stderr, flush=True)
            os._exit(17)
        return real(self, round_idx, *args, **kwargs)

    TorchDistTransport.exchange = exchange  # type: ignore[method-assign]


if __name__ == "__main__":
    _arm()
    sys.exit(dimat.launch.main(sys.argv[1:]))
