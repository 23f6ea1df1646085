"""The Ray path's decisions that need no cluster: what each worker reserves, whether it takes GPUs,
and a clear error where no cluster answers. The runs on a real local cluster are in
tests/test_distributed_run.py."""

from __future__ import annotations

import socket

import pytest

from aepo_core.errors import UserError
from aepo_core.pipeline.ray_cluster import connect, uses_gpus, worker_resources


def test_workers_share_the_cluster_cpus_or_run_threads():
    # on CPUs: the cluster's CPUs shared by default, run.threads shared when set
    assert worker_resources(2, 0, None, {"CPU": 2.0}, "trainer.nproc") == {"CPU": 1, "GPU": 0}
    assert worker_resources(2, 0, None, {"CPU": 16.0}, "trainer.nproc") == {"CPU": 8, "GPU": 0}
    assert worker_resources(3, 0, 8, {"CPU": 16.0}, "trainer.nproc") == {"CPU": 2, "GPU": 0}
    # on GPUs: one CPU each unless run.threads says more; vLLM's tensor-parallel engines take several GPUs
    assert worker_resources(4, 1, None, {"CPU": 64.0, "GPU": 8.0}, "trainer.nproc") == {"CPU": 1, "GPU": 1}
    assert worker_resources(4, 2, 16, {"CPU": 64.0, "GPU": 8.0}, "rollout.data_parallel") == {"CPU": 4, "GPU": 2}


@pytest.mark.parametrize(("n", "gpus", "cluster"), [(3, 0, {"CPU": 2.0}), (2, 1, {"CPU": 8.0, "GPU": 1.0}),
                                                    (2, 1, {"CPU": 8.0}), (3, 2, {"CPU": 8.0, "GPU": 4.0})])
def test_workers_the_cluster_cannot_hold_are_refused_at_once(n, gpus, cluster):
    with pytest.raises(UserError, match=rf"rollout.data_parallel={n}: {n} Ray workers of .* do not fit the cluster"):
        worker_resources(n, gpus, None, cluster, "rollout.data_parallel")


def test_gpus_are_decided_by_the_cluster_not_the_flow_machine():
    assert uses_gpus("auto", {"CPU": 8.0, "GPU": 2.0}) and not uses_gpus("auto", {"CPU": 8.0})
    assert uses_gpus("cuda", {"CPU": 8.0})  # asked for: then refused by worker_resources if there are none
    assert not uses_gpus("cpu", {"CPU": 8.0, "GPU": 2.0})


def test_an_address_where_no_cluster_answers_is_a_clear_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    with pytest.raises(UserError, match=rf"run.ray_address=127.0.0.1:{port}: no Ray cluster answers there"):
        connect(f"127.0.0.1:{port}")
