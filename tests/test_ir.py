"""The bundle's IR: the typed manifest reads what it writes, refuses what is malformed naming the field,
and one interpreter runs the actions."""
from __future__ import annotations

import json
import os

import pytest
import torch

import edgepart
from edgepart import models as zoo
from edgepart.errors import BundleError
from edgepart.ir import output as output_tree
from edgepart.ir.manifest import SCHEMA_VERSION, EmitOutput, Manifest, Recv, Run, Send, TakeInput
from tests.conftest import assert_close


@pytest.fixture(scope="module")
def bundle():
    model, (x,) = zoo.get("tinynet")
    return edgepart.compile(model, (x,), edgepart.Cluster.homogeneous(3), strategy="even"), model, x


def test_manifest_round_trips_through_json(bundle):
    b, _, _ = bundle
    m = b.manifest
    again = Manifest.from_json(m.to_json())
    assert again == m
    assert again.schema_version == SCHEMA_VERSION
    acts = [a for spec in m.devices.values() for a in spec.actions]
    assert {type(a) for a in acts} == {TakeInput, Recv, Run, Send, EmitOutput}
    # every transfer is one send on its source and one recv on its destination
    for t in m.transfers:
        assert Send(t.tensor, t.a, t.b, t.dst) in m.devices[t.src].actions
        assert Recv(t.tensor, t.a, t.b, t.src) in m.devices[t.dst].actions


def test_schema_1_bundle_is_refused_naming_both_versions(bundle, tmp_path):
    b, _, _ = bundle
    out = b.save(tmp_path / "b")
    d = json.loads((out / "manifest.json").read_text())
    d["schema_version"] = 1
    (out / "manifest.json").write_text(json.dumps(d))
    with pytest.raises(BundleError, match=rf"schema version 1, this edgepart reads schema version {SCHEMA_VERSION}"):
        edgepart.load_bundle(out)


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.pop("tensors"), r"missing 'tensors'"),
    (lambda d: d["devices"]["d1"]["actions"].append({"op": "jump"}), r"devices\['d1'\]\.actions\[\d+\]\.op: unknown action 'jump'"),
    (lambda d: d["devices"]["d1"]["actions"][0].update(rows=[5, 2]), r"devices\['d1'\]\.actions\[0\]\.rows: must be \[a, b\]"),
    (lambda d: d["devices"]["d1"].update(program="../../etc/passwd"), r"devices\['d1'\]\.program: '\.\./\.\./etc/passwd' is not among"),
    (lambda d: d["devices"]["d1"]["files"].append("/etc/passwd"), r"names file '/etc/passwd' outside the bundle"),
    (lambda d: d["inputs"][0].update(dtype="complex128"), r"inputs\[0\]\.dtype: dtype 'complex128' is not one of"),
    (lambda d: d["transfers"][0].update(nbytes="many"), r"transfers\[0\]\.nbytes: must be an integer"),
    (lambda d: d.update(output={"tensor": 3}), r"output\.tensor: must be a tensor name"),
    (lambda d: d.update(source_device="ghost"), r"source_device: 'ghost' is not one of the devices"),
])
def test_malformed_manifest_is_refused_naming_the_field(bundle, edit, message):
    d = bundle[0].manifest.to_dict()
    edit(d)
    with pytest.raises(BundleError, match=message):
        Manifest.from_dict(json.loads(json.dumps(d)))


def test_deeply_nested_manifest_is_a_bundle_error_not_a_crash():
    deep = "[" * 100_000 + "]" * 100_000
    with pytest.raises(BundleError, match="nested too deeply|not valid JSON"):
        Manifest.from_json('{"schema_version": 2, "output": ' + deep + "}")


def test_a_symlinked_device_file_is_refused(bundle, tmp_path):
    b, _, _ = bundle
    out = b.save(tmp_path / "b")
    prog = out / "devices" / "d1.py"
    real = tmp_path / "elsewhere.py"
    real.write_bytes(prog.read_bytes())
    prog.unlink()
    os.symlink(real, prog)
    with pytest.raises(BundleError, match=r"d1\.py: is a symbolic link"):
        edgepart.load_bundle(out)


def test_recompiling_into_a_directory_with_more_devices_removes_their_files(tmp_path):
    model, (x,) = zoo.get("tinynet")
    edgepart.compile(model, (x,), edgepart.Cluster.homogeneous(3), strategy="even").save(tmp_path / "b")
    edgepart.compile(model, (x,), edgepart.Cluster.homogeneous(2), strategy="even").save(tmp_path / "b")
    assert sorted(p.name for p in (tmp_path / "b" / "devices").iterdir()) == [
        "d0.py", "d0.safetensors", "d1.py", "d1.safetensors"]
    assert_close(edgepart.load_bundle(tmp_path / "b").run_local(x), model(x))


def test_output_tree_walk_leaves_and_flatten_agree():
    spec = {"tuple": [{"tensor": "a"}, {"dict": {"k": {"tensor": "b"}, "c": {"const": 3}}},
                      {"list": [{"tensor": "c"}]}]}
    output_tree.validate(spec)
    assert output_tree.leaves(spec) == ["a", "b", "c"]
    value = output_tree.walk(spec, lambda name: torch.full((1,), ord(name)))
    assert value[1]["c"] == 3 and isinstance(value, tuple) and isinstance(value[2], list)
    assert [int(v) for v in output_tree.flatten(value, spec)] == [ord("a"), ord("b"), ord("c")]


def test_reference_executor_detects_a_deadlock(bundle):
    b, _, x = bundle
    m = b.manifest
    # drop every send of device d0: whoever waits for its pieces can never proceed
    d0 = m.devices["d0"]
    broken_devices = dict(m.devices)
    broken_devices["d0"] = type(d0)(d0.program, d0.weights, d0.files,
                                    tuple(a for a in d0.actions if not isinstance(a, Send)), d0.rows, d0.constants)
    broken = type(b)(type(m)(**{**m.__dict__, "devices": broken_devices}), b.sources, b.weights)
    with pytest.raises(BundleError, match="deadlock"):
        broken.run_local(x)
