"""One local Ray instance for the Ray tests of a session (2 CPUs, no dashboard), as DESIGN.md section 6 asks."""
from __future__ import annotations

import pytest

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install -e '.[ray]')")


@pytest.fixture(scope="session")
def ray_local():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
