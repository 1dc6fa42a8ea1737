"""Context across hosts: each host loads the rows its devices hold and keeps only its own tokens
(two processes splitting every sequence over `context` train as one device: test_multiprocess.py)."""

import collections

import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from qwen_jax.parallel.hosts import host_batch_layout
from qwen_jax.parallel.mesh import make_mesh

FakeDevice = collections.namedtuple("FakeDevice", "id process_index")


class HostsOf:
    """A sharding whose devices are spread over processes as `process_of` says (device id -> host)."""

    def __init__(self, sharding, process_of):
        self.sharding, self.process_of = sharding, process_of

    def devices_indices_map(self, shape):
        return {FakeDevice(device.id, self.process_of(device.id)): index
                for device, index in self.sharding.devices_indices_map(shape).items()}


@pytest.mark.parametrize("mesh_sizes, spec, expected", [
    # Rows over data across 2 hosts: two row blocks, every token.
    ({"data": 2, "context": 4}, P("data", "context"), [(0, 2, slice(0, 64)), (1, 2, slice(0, 64))]),
    # Context across the hosts: both read all rows and keep half the tokens each.
    ({"context": 8}, P(None, "context"), [(0, 1, slice(0, 32)), (0, 1, slice(32, 64))]),
])
def test_each_host_loads_the_rows_and_tokens_its_devices_hold(mesh_sizes, spec, expected):
    sharding = HostsOf(NamedSharding(make_mesh(mesh_sizes), spec), lambda device: device // 4)
    layouts = [tuple(host_batch_layout(sharding, 8, 64, process_index=p)) for p in range(2)]
    assert layouts == expected


def test_a_host_holding_scattered_pieces_is_refused():
    sharding = HostsOf(NamedSharding(make_mesh({"context": 8}), P(None, "context")),
                       lambda device: device % 2)  # every other token block on each host
    with pytest.raises(ValueError, match="process 0's devices hold parts"):
        host_batch_layout(sharding, 8, 64, process_index=0)
