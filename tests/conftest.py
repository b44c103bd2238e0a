import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Two cores: keep torch from oversubscribing them when tests start subprocesses.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def repo_root() -> Path:
    return ROOT


# ---------------------------------------------------------------------------------------------- layers
# `make test-fast` runs the unit layer: no subprocesses, no real servers, no process groups
# (DIMAT_TEST_LAYER=unit, -m "not integration"). Files below are integration tests as a whole; a test
# elsewhere that starts a process or a server carries @pytest.mark.integration. In the unit layer the
# guards make a missing mark fail loudly instead of slowing the fast layer down.
INTEGRATION_FILES = {
    "test_grpc_faults.py", "test_grpc_federation.py", "test_grpc_transport.py", "test_hostile.py",
    "test_launch.py", "test_launch_scripts.py", "test_topologies_everywhere.py", "test_torchdist.py",
    "test_transport_contract.py", "test_protogen.py",
}
UNIT = os.environ.get("DIMAT_TEST_LAYER") == "unit"


# the few in-process tests of 5 s or more on 2 cores (big models aligned): in `make test`, not in test-fast
SLOW = {
    "test_align_equivariance.py::test_alignment_recovers_identity[resnet20-activation]",
    "test_align_equivariance.py::test_alignment_recovers_identity[vit-activation]",
    "test_align_equivariance.py::test_activation_matching_recovers_every_live_unit[resnet20]",
    "test_align_equivariance.py::test_alignment_recovers_identity[vgg16-activation]",
    "test_align_equivariance.py::test_alignment_recovers_identity[vgg16-weight]",
    "test_align_equivariance.py::test_alignment_recovers_identity[resnet20-weight]",
    "test_merge_real.py::test_alignment_keeps_accuracy_that_averaging_loses[vgg11]",
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.name in INTEGRATION_FILES:
            item.add_marker(pytest.mark.integration)
        if f"{item.path.name}::{item.name}" in SLOW:
            item.add_marker(pytest.mark.slow)


if UNIT:
    import subprocess

    import grpc
    import torch.distributed

    def _refuse(what):
        def refuse(*args, **kwargs):
            raise RuntimeError(f"the unit layer starts no {what}: mark this test @pytest.mark.integration")
        return refuse

    subprocess.Popen.__init__ = _refuse("subprocess")  # type: ignore[method-assign]
    grpc.server = _refuse("gRPC server")
    torch.distributed.init_process_group = _refuse("process group")
