import pytest

from sapo_bench.world import WorldConfig, write_world


@pytest.fixture(scope="session")
def micro_world(tmp_path_factory):
    """The default micro world (seed 0, scale 1), written once per test session (about a second)."""
    out = tmp_path_factory.mktemp("world")
    write_world(out, WorldConfig(seed=0))
    return out
