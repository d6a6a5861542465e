"""Socket runtime end to end: real worker processes on loopback, outputs equal run_local and model(x)."""
from __future__ import annotations

import copy
import threading
import time

import numpy as np
import pytest
import torch

import edgepart
from edgepart import models as zoo
from edgepart.runtime.client import Session
from tests.conftest import assert_close

pytestmark = pytest.mark.timeout(120)

SIZE = {"alexnet": 64, "unet": 32, "yolov2_tiny": 32}
NDEV = {name: 2 + i % 3 for i, name in enumerate(zoo.names())}          # 2, 3 and 4 workers in rotation


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    model, (x,) = zoo.get("tinynet")
    d = tmp_path_factory.mktemp("tiny")
    edgepart.compile(model, (x,), edgepart.Cluster.homogeneous(4), strategy="even").save(d)
    return model.eval(), x, d


@pytest.fixture(scope="module")
def cluster(tiny):
    with edgepart.LocalCluster(tiny[2]) as c:
        yield c


def test_tinynet_over_sockets_equals_run_local_and_model(cluster, tiny):
    model, x, d = tiny
    y = cluster.infer(x)
    with torch.no_grad():
        assert_close(y, model(x))
    assert torch.equal(y, edgepart.load_bundle(d).run_local(x))
    assert set(cluster.pids) == {"d0", "d1", "d2", "d3"} and len(set(cluster.pids.values())) == 4


def test_wrong_input_shape_is_a_value_error_naming_the_shape(cluster):
    with pytest.raises(ValueError, match=r"\(1, 3, 32, 32\)"):
        cluster.infer(torch.zeros(1, 3, 16, 16))


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in ("vgg16", "resnet50", "alexnet") else n
                                  for n in zoo.names()])
def test_zoo_over_sockets(name, cluster, tmp_path):
    """Every zoo model on 2-4 workers (the cluster's worker processes, redeployed with each bundle)."""
    model, (x,) = zoo.get(name, input_size=SIZE.get(name, 32))
    n = NDEV[name]
    bundle = edgepart.compile(model, (x,), edgepart.Cluster.homogeneous(n), strategy="even")
    bundle.save(tmp_path / "b")
    endpoints = {f"d{i}": cluster.endpoints[f"d{i}"] for i in range(n)}
    with Session(tmp_path / "b", endpoints, cluster.key) as s:
        y = s.infer(x)
        with torch.no_grad():
            ref = model(x)
        assert_close(y, ref)
        assert_close(y, bundle.run_local(x), rel=1e-6)
        x2 = torch.randn_like(x)
        ys = s.infer_many([x2, x])
        assert_close(ys[1], ref)


def test_500_pipelined_requests_from_4_concurrent_clients(cluster, tiny):
    model, x, d = tiny
    cluster.session.close()
    cluster.session = cluster.connect()      # redeploy tinynet (the zoo test may have replaced it)
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(1, 3, 32, 32, generator=gen) for _ in range(500)]
    with torch.no_grad():
        refs = [model(v) for v in xs]
    sessions = [cluster.session] + [cluster.connect() for _ in range(3)]
    results: dict[int, torch.Tensor] = {}
    errors = []

    def client(k):
        try:
            idx = list(range(k, 500, 4))
            ys = sessions[k].infer_many([xs[i] for i in idx], window=16)
            for i, y in zip(idx, ys):
                results[i] = y
        except Exception as e:  # noqa: BLE001
            errors.append(e)
    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    dt = time.perf_counter() - t0
    for s in sessions[1:]:
        s.close()
    assert not errors, errors
    assert len(results) == 500
    for i in range(500):                 # each response matches its own input: none lost, none swapped
        assert_close(results[i], refs[i])
    assert dt < 45, f"500 requests took {dt:.1f} s"
    st = cluster.stats()
    assert all(v.get("requests", 0) >= 500 for v in st.values()), st
    # per-stage compute counters add up to the device's compute time
    for dev, v in st.items():
        per_stage = sum(n for k, n in v.items() if k.startswith("stage_us:"))
        assert abs(per_stage - v["compute_us"]) <= 1, (dev, v)


def test_cli_deploy_and_run(cluster, tiny, tmp_path):
    from edgepart.runtime import client, deploy_client
    model, x, d = tiny
    ep = tmp_path / "endpoints.yaml"
    ep.write_text("".join(f"{k}: '{v}'\n" for k, v in cluster.endpoints.items()))
    kf = tmp_path / "key"
    kf.write_text(cluster.key.hex())
    assert deploy_client.main([str(d), "--endpoints", str(ep), "--key-file", str(kf)]) == 0
    np.save(tmp_path / "x.npy", x.numpy())
    assert client.run_main([str(d), "--endpoints", str(ep), "--key-file", str(kf), "--input",
                            str(tmp_path / "x.npy"), "--output", str(tmp_path / "y.npy"), "--no-deploy"]) == 0
    y = torch.from_numpy(np.load(tmp_path / "y.npy"))
    with torch.no_grad():
        assert_close(y, model(x))


def test_tampered_bundle_file_is_refused_by_the_worker(cluster, tiny, tmp_path):
    model, x, d = tiny
    bad = tmp_path / "bad"      # a bundle the workers do not hold yet (other weights), then one file altered
    # (other weights: a worker copies a file it holds in another bundle with the manifest's sha256
    # instead of asking for it — runtime.deploy.Deployer._reuse — so a file of the same plan would not be sent)
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.01)
    edgepart.compile(other, (x,), edgepart.Cluster.homogeneous(4, bandwidth_mbps=55.0), strategy="even").save(bad)
    w = bad / "devices" / "d1.safetensors"
    data = bytearray(w.read_bytes())
    data[-1] ^= 0xFF
    w.write_bytes(data)
    with pytest.raises(edgepart.BundleError, match="d1.safetensors"):
        Session(bad, cluster.endpoints, cluster.key)
    assert all(p is None for p in [cluster.procs[k].poll() for k in cluster.procs])


@pytest.mark.slow
def test_local_cluster_leaves_no_processes(tiny):
    import os
    model, x, d = tiny
    with edgepart.LocalCluster(d) as c:
        pids = list(c.pids.values())
        c.infer(x)
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


@pytest.mark.slow
def test_workers_reuse_activation_memory_instead_of_page_faulting_it_in(tmp_path):
    """Workers keep freed tensor memory (worker.keep_freed_memory): without it each request of this
    model page-faulted its 1-2 MiB activations in again, ~1300 faults per request and device. Checked
    on d1: the source d0, which also gathers the output, keeps growing its heap for about a hundred
    requests before it settles (fragmentation; no Python object is kept alive)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.Conv2d(16, 16, 3, padding=1), torch.nn.ReLU()).eval()
    x = torch.randn(1, 3, 192, 192)
    edgepart.compile(model, (x,), edgepart.Cluster.homogeneous(2), strategy="even").save(tmp_path / "b")
    with edgepart.LocalCluster(tmp_path / "b") as c:
        for _ in range(5):
            c.infer(x)
        before = c.stats()
        for _ in range(10):
            y = c.infer(x)
        after = c.stats()
    with torch.no_grad():
        assert_close(y, model(x))
    faults = sum(v - before["d1"].get(k, 0) for k, v in after["d1"].items() if k.startswith("stage_faults:"))
    assert faults / 10 < 100, f"d1: {faults / 10:.0f} page faults per request"


def test_worker_removes_its_own_temp_workdir_on_stop_but_keeps_a_given_one(tiny, tmp_path):
    from edgepart.runtime.worker import serve
    model, x, d = tiny
    key = b"k" * 32
    workers = {"d0": serve("127.0.0.1:0", key), "d1": serve("127.0.0.1:0", key, workdir=tmp_path / "d1"),
               "d2": serve("127.0.0.1:0", key), "d3": serve("127.0.0.1:0", key, workdir=tmp_path / "d3")}
    try:
        with Session(d, {n: w.address for n, w in workers.items()}, key) as s:
            assert_close(s.infer(x), edgepart.load_bundle(d).run_local(x), rel=1e-6)
        assert any((workers["d0"].workdir / "bundles").iterdir())      # the deployed files live there
    finally:
        for w in workers.values():
            w.stop()
    assert not workers["d0"].workdir.exists() and not workers["d2"].workdir.exists()
    assert any((tmp_path / "d1" / "bundles").iterdir()) and any((tmp_path / "d3" / "bundles").iterdir())
