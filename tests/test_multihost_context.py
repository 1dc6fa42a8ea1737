"""Context across hosts: each host loads the rows its devices hold and keeps only its own tokens
(two processes splitting every sequence over `context` train as one device: test_multiprocess.py)."""

import collections

import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from qwen_jax.parallel.hosts import host_batch_layout
from qwen_jax.parallel.mesh import make_mesh
from qwen_jax.train.compile_check import tpu_topology

FakeDevice = collections.namedtuple("FakeDevice", "id process_index")


class HostsOf:
    """A sharding whose devices are spread over processes as `process_of` says (device id -> host)."""

    def __init__(self, sharding, process_of):
        self.sharding, self.process_of = sharding, process_of

    def devices_indices_map(self, shape):
        return {FakeDevice(device.id, self.process_of(device.id)): index
                for device, index in self.sharding.devices_indices_map(shape).items()}


@pytest.mark.parametrize("mesh_sizes, spec, expected", [
    # Rows over data across 2 hosts: two row shares, every token.
    ({"data": 2, "context": 4}, P("data", "context"), [(0, 2, (slice(0, 64),)), (1, 2, (slice(0, 64),))]),
    # Context across the hosts: both read all rows and keep half the tokens each.
    ({"context": 8}, P(None, "context"), [(0, 1, (slice(0, 32),)), (0, 1, (slice(32, 64),))]),
])
def test_each_host_loads_the_rows_and_tokens_its_devices_hold(mesh_sizes, spec, expected):
    sharding = HostsOf(NamedSharding(make_mesh(mesh_sizes), spec), lambda device: device // 4)
    layouts = [tuple(host_batch_layout(sharding, 8, 64, process_index=p)) for p in range(2)]
    assert layouts == expected


@pytest.mark.parametrize("mesh_sizes, spec, expected", [
    # Rows over fsdp, hosts interleaved (rows 0, 2, 4, 6 on host 0): each reads its own share.
    ({"fsdp": 8}, P("fsdp", None), [(0, 2, (slice(0, 64),)), (1, 2, (slice(0, 64),))]),
    # Context, hosts interleaved: each keeps every other token block, in order.
    ({"context": 8}, P(None, "context"), [(0, 1, tuple(slice(s, s + 8) for s in range(0, 64, 16))),
                                          (0, 1, tuple(slice(s, s + 8) for s in range(8, 64, 16)))]),
])
def test_hosts_interleaved_on_the_mesh_each_load_their_own_share(mesh_sizes, spec, expected):
    sharding = HostsOf(NamedSharding(make_mesh(mesh_sizes), spec), lambda device: device % 2)
    layouts = [tuple(host_batch_layout(sharding, 8, 64, process_index=p)) for p in range(2)]
    assert layouts == expected


def test_own_tokens_keeps_a_hosts_spans_in_order():
    layout = host_batch_layout(HostsOf(NamedSharding(make_mesh({"context": 8}), P(None, "context")),
                                       lambda device: device % 2), 8, 64, process_index=1)
    tokens = np.arange(2 * 64).reshape(2, 64)
    np.testing.assert_array_equal(layout.own_tokens(tokens, 1),
                                  np.concatenate([tokens[:, s:s + 8] for s in range(8, 64, 16)], axis=1))


def test_a_host_holding_a_ragged_set_of_pieces_is_refused():
    # data=2 x context=4; host 0 holds (rows 0-3, tokens 0-15) and (rows 4-7, tokens 16-31): not a product.
    process_of = {0: 0, 5: 0, 1: 1, 4: 1, 2: 2, 7: 2, 3: 3, 6: 3}.__getitem__
    sharding = HostsOf(NamedSharding(make_mesh({"data": 2, "context": 4}), P("data", "context")), process_of)
    with pytest.raises(ValueError, match="process 0's devices hold parts"):
        host_batch_layout(sharding, 8, 64, process_index=0)


def test_hosts_whose_rows_overlap_in_part_are_refused():
    # data=4 x context=2, each host two row blocks of one token half: hosts 0 and 1 share rows 2-3 only.
    process_of = {0: 0, 2: 0, 3: 1, 5: 1, 4: 2, 6: 2, 1: 3, 7: 3}.__getitem__
    sharding = HostsOf(NamedSharding(make_mesh({"data": 4, "context": 2}), P("data", "context")), process_of)
    with pytest.raises(ValueError, match=r"not equal shares that split the 8 rows"):
        host_batch_layout(sharding, 8, 64, process_index=0)


@pytest.mark.parametrize("mesh_sizes, spec, shape", [
    ({"fsdp": -1}, P("fsdp", None), (64, 4096)),  # 64 rows, one per chip
    ({"context": -1}, P(None, "context"), (1, 4096)),  # one row split over all 64 chips
])
def test_every_host_of_a_v5p_slice_gets_its_own_rows_and_tokens(mesh_sizes, spec, shape):
    # 64 chips on 16 hosts: the topology-aware mesh scatters each host's rows (or tokens) over the batch.
    sharding = NamedSharding(make_mesh(mesh_sizes, tpu_topology("v5p:4x4x4").devices), spec)
    layouts = [host_batch_layout(sharding, *shape, process_index=p) for p in range(16)]
    if shape[0] == 64:
        assert sorted(layout.row_block for layout in layouts) == list(range(16))
        assert all(layout.row_blocks == 16 and layout.tokens == (slice(0, 4096),) for layout in layouts)
    else:
        assert all(layout.row_blocks == 1 for layout in layouts)
        held = sorted(t for layout in layouts for span in layout.tokens for t in range(span.start, span.stop))
        assert held == list(range(4096))  # every token on exactly one host
