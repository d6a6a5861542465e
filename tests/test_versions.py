"""Model versions (#16): tiny version sets (digits at 16×16, a few training steps) of the three small
architectures; every version compiles under every strategy and equals its own output; pruned versions
are plain modules rebuilt from spec + safetensors; int8 runs in-process only; the manifest names the
version; a LocalCluster of a pruned version predicts what the module predicts; the training record."""
from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch

import edgepart
from edgepart import datasets, models
from edgepart.cli import main as cli_main
from edgepart.compiler.planning import baselines  # noqa: F401 — registers the baseline strategies
from edgepart.compiler.planning.registry import STRATEGIES
from edgepart.errors import EdgepartError, UnsupportedOpError
from edgepart.models.compact import ARCHS
from edgepart.runtime.client import Session
from edgepart.versions import TrainConfig, VersionSet, build_version_set, train_model
from edgepart.versions.store import WEIGHTS
from edgepart.versions.training import predict, train
from tests.conftest import assert_close

SCALES = (1.0, 0.75, 0.5, 0.25)
PRUNED = ["scale-1.00", "scale-0.75", "scale-0.50", "scale-0.25"]
TINY = TrainConfig(epochs=1, batch_size=32)


@pytest.fixture(scope="module")
def digits():
    d = datasets.load("digits", 16)
    return dataclasses.replace(d, train=datasets.Split(d.train.x[:96], d.train.y[:96]))


@pytest.fixture(scope="module")
def sets(digits, tmp_path_factory):
    root = tmp_path_factory.mktemp("versions")
    built = {a: build_version_set(a, root / a, SCALES, data=digits, config=TINY, finetune=TINY, repeats=0,
                                  log=lambda m: None) for a in ARCHS}
    return {a: VersionSet.load(root / a) for a in built}


def test_set_on_disk_has_every_version_with_its_facts(sets):
    for arch, vs in sets.items():
        assert vs.names == PRUNED + ["int8"]
        recs = [vs.records[n] for n in PRUNED]
        assert [r.scale for r in recs] == list(SCALES)
        for a, b in zip(recs, recs[1:]):                       # thinner at every step
            assert b.macs < a.macs and b.params < a.params and b.bytes < a.bytes
        for r in vs.records.values():
            assert 0.0 <= r.accuracy <= 1.0 and len(r.weights_sha256) == 64
            assert (vs.dir / r.name / WEIGHTS).is_file() and vs.spec(r.name)["arch"] == arch
        assert all(r.predicted_ms > 0 for r in recs)          # from profiles/host.json
        q = vs.records["int8"]
        assert q.quantized and not q.partitionable and q.bytes < recs[0].bytes / 3
        assert q.predicted_ms is None and "in-process" in q.note


def test_pruned_versions_are_plain_modules_with_the_recorded_accuracy(sets, digits):
    for arch, vs in sets.items():
        for name in PRUNED:
            model, x = vs.model(name)
            assert type(model) is ARCHS[arch] and x.shape == (1, 3, 16, 16)
            acc = float((predict(model, digits.test.x) == digits.test.y).float().mean())
            assert acc == pytest.approx(vs.records[name].accuracy, abs=1e-6)
        widths = [vs.spec(n) for n in PRUNED]
        assert widths[0] != widths[-1]


@pytest.mark.parametrize("strategy", sorted({*STRATEGIES, "ofpm"}))
@pytest.mark.parametrize("arch", list(ARCHS))
def test_every_version_compiles_under_every_strategy_and_is_exact(sets, arch, strategy):
    vs = sets[arch]
    cluster = edgepart.Cluster.heterogeneous([1.0, 0.5, 0.8])
    for name in PRUNED:
        model, x = vs.model(name)
        with torch.no_grad():
            ref = model(x)
        bundle = vs.compile(name, cluster, strategy)
        assert_close(bundle.run_local(x), ref)
        assert bundle.manifest.version["name"] == name


def test_manifest_records_the_version_and_survives_save(sets, tmp_path):
    vs = sets["vgg_small"]
    rec = vs.records["scale-0.50"]
    out = vs.compile("scale-0.50", edgepart.Cluster.homogeneous(2), "even").save(tmp_path / "b")
    version = edgepart.load_bundle(out).manifest.version
    assert version == {"set": "vgg_small", "name": "scale-0.50", "scale": 0.5, "quantized": False,
                       "accuracy": rec.accuracy, "weights_sha256": rec.weights_sha256}
    assert json.loads((out / "manifest.json").read_text())["version"]["scale"] == 0.5
    model, x = vs.model("scale-0.50")
    assert edgepart.compile(model, (x,), edgepart.Cluster.homogeneous(2)).manifest.version is None


def test_int8_runs_in_process_only(sets, digits):
    vs = sets["resnet_small"]
    q, x = vs.model("int8")
    assert q(x).shape == (1, 10)
    acc = float((predict(q, digits.test.x) == digits.test.y).float().mean())
    assert acc == pytest.approx(vs.records["int8"].accuracy, abs=1e-6)       # the int8 weights round-trip
    with pytest.raises(EdgepartError, match="in-process"):
        vs.compile("int8", edgepart.Cluster.homogeneous(2))
    with pytest.raises(UnsupportedOpError):
        edgepart.compile(q, (x,), edgepart.Cluster.homogeneous(2), strategy="single")


def test_local_cluster_of_a_pruned_version_predicts_like_the_module(sets, digits, tmp_path):
    vs = sets["mobilenet_v2_small"]
    model, _ = vs.model("scale-0.50")
    out = vs.compile("scale-0.50", edgepart.Cluster.homogeneous(2), "even").save(tmp_path / "b")
    images = digits.test.x[:8]
    with edgepart.LocalCluster(out) as c:
        got = torch.stack([c.infer(images[i:i + 1]).argmax(1)[0] for i in range(len(images))])
    assert torch.equal(got, predict(model, images))


def test_tampered_weights_are_refused(sets, tmp_path):
    d = tmp_path / "vs"
    shutil.copytree(sets["vgg_small"].dir, d)
    w = d / "scale-0.25" / WEIGHTS
    data = bytearray(w.read_bytes())
    data[-1] ^= 1
    w.write_bytes(bytes(data))
    with pytest.raises(EdgepartError, match="sha256"):
        VersionSet.load(d).model("scale-0.25")
    with pytest.raises(EdgepartError, match="no version"):
        VersionSet.load(d).model("scale-0.10")


def test_train_writes_weights_spec_and_metadata_record(tmp_path):
    rec = train_model("vgg_small", tmp_path / "t", "digits", 16, TrainConfig(epochs=1, seed=3), log=lambda m: None)
    meta = json.loads((tmp_path / "t" / "meta.json").read_text())
    assert meta == rec
    assert meta["dataset"] == "digits" and meta["split_seed"] == 0 and meta["train"]["seed"] == 3
    assert meta["train"]["epochs"] == 1 and 0 <= meta["test_accuracy"] <= 1 and meta["split_sizes"]["test"] > 300
    assert json.loads((tmp_path / "t" / "arch.json").read_text())["arch"] == "vgg_small"


def test_cli_versions_show_and_unknown_model(sets, capsys, tmp_path):
    assert cli_main(["versions", "show", str(sets["vgg_small"].dir)]) == 0
    out = capsys.readouterr().out
    assert "scale-0.25" in out and "int8" in out
    assert cli_main(["versions", "vgg16", "--out", str(tmp_path / "x")]) == 2
    assert "trainable models" in capsys.readouterr().err


def test_a_second_deploy_links_files_the_worker_already_holds(sets, digits, tmp_path):
    """Workers keep received weights by sha256: deploying another bundle whose weights have the same content
    (here the same version under another plan of the same split) does not send them again."""
    vs = sets["vgg_small"]
    model, _ = vs.model("scale-0.50")
    cluster = edgepart.Cluster.homogeneous(2)
    first = vs.compile("scale-0.50", cluster, "even").save(tmp_path / "a")
    second = vs.compile("scale-0.50", cluster, "proportional").save(tmp_path / "b")
    assert (first / "manifest.json").read_bytes() != (second / "manifest.json").read_bytes()
    images = digits.test.x[:4]
    with edgepart.LocalCluster(first) as c:
        c.infer(images[:1])
        with Session(second, c.endpoints, c.key) as s:
            got = torch.stack([s.infer(images[i:i + 1]).argmax(1)[0] for i in range(len(images))])
        for dev in c.devices:
            held = {p.stat().st_ino for p in (c.tmp / "work" / dev / "blobs").iterdir()}
            bundles = list((c.tmp / "work" / dev / "bundles").iterdir())
            assert len(bundles) == 2
            for b in bundles:                        # both bundles' weights are links to the held copies
                files = list((b / "devices").glob("*.safetensors"))
                assert files and all(p.stat().st_ino in held for p in files)
    assert torch.equal(got, predict(model, images))


def test_training_is_deterministic_in_the_seed(digits):
    def trained(seed):
        return train(models.build("resnet_small"), digits.train, TrainConfig(epochs=1, seed=seed)).state_dict()
    a, b, c = trained(0), trained(0), trained(1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
