"""Loading a model file never runs code, and never crashes, hangs or allocates on a bad file.

Crafted files (a model spec naming ``os:system``, a shell command as ``num_classes``, modules that
exist but are not models, compression and nesting bombs, stride-0 tensors, YAML python tags,
ONNX external data) are refused before anything runs: each test checks that the marker file the
command would create does not exist. The mutation tests (hypothesis) flip bytes, truncate at
every section and replace header fields (checksum rewritten) of real files: every result either
loads to the identical model or raises a LowbitError.
"""
import json
import resource
import zipfile
import zlib

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

import lowbit
from lowbit.checkpoint import load_quantized, save_quantized
from lowbit.cli import main
from lowbit.deploy.onnx_export import read_onnx
from lowbit.deploy.packed import export_packed, load_packed
from lowbit.errors import ConfigError, ExportError, LowbitError, ModelError
from lowbit.models import build_model, resolve_model
from lowbit.recipes import read_recipe
from tests import file_mutations as fm

FUZZ = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])


def cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def one_line_error(code, err):
    return code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err


@pytest.fixture(scope="module")
def files(tmp_path_factory, digits_fp):
    d, fp = digits_fp
    return fm.make_files(tmp_path_factory.mktemp("files"), d, fp)


def loader(kind, example):
    return fm.loader(kind, example)


def write_crafted(kind, files, tmp_path, **fields):
    """The file of ``kind`` with header ``fields`` replaced, checksum and all consistent."""
    paths, _, _ = files
    target = tmp_path / f"crafted-{kind}{paths[kind].suffix}"
    if kind.startswith("packed"):
        raw = paths[kind].read_bytes()
        header, _, _ = fm.packed_parts(raw)
        target.write_bytes(fm.packed_with(raw, {**header, **fields}))
    else:
        payload = torch.load(paths[kind], weights_only=True)
        torch.save({**payload, **fields}, target)
    return target


# -- crafted files -----------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["packed", "packed_kmeans", "quantized", "trained"])
@pytest.mark.parametrize("classes", [3, "MARKER"])
def test_a_file_naming_os_system_runs_nothing(kind, classes, files, tmp_path, capsys):
    marker = tmp_path / "pwned"
    num_classes = f"touch {marker}" if classes == "MARKER" else classes
    path = write_crafted(kind, files, tmp_path, model="os:system", num_classes=num_classes)
    _, x, _ = files
    with pytest.raises(LowbitError) as error:
        loader(kind, x[:8])(path)
    assert not marker.exists()
    if classes != "MARKER":
        assert "asks to import and run model code 'os:system'" in str(error.value)
        assert "trust_model_code=True" in str(error.value)
    code, _, err = cli(capsys, "eval", "--checkpoint", path, "--data", "digits", "--limit", 10)
    assert one_line_error(code, err) and not marker.exists(), err
    out = tmp_path / "out.lowbit"
    code, _, err = cli(capsys, "export", "--checkpoint", path, "--out", out,
                       "--input-shape", "1,8,8")
    if kind.startswith("packed"):  # export reads torch checkpoints only: refused for that
        assert code == 2
    else:
        assert one_line_error(code, err), err
    assert not marker.exists() and not out.exists()


def test_a_module_that_exists_but_is_not_a_model(files, tmp_path):
    target = tmp_path / "written.txt"
    path = write_crafted("quantized", files, tmp_path, model="lowbit.io:write_text",
                         num_classes=None)
    with pytest.raises(ModelError, match="asks to import"):
        load_quantized(path)
    with pytest.raises(ModelError, match="lowbit.io:write_text"):  # trusted: it runs, and fails
        load_quantized(path, trust_model_code=True)
    assert not target.exists()


@pytest.mark.parametrize("value", ["10", 10.0, True, 0, -1, 10 ** 9, [10], None])
def test_num_classes_is_an_int_in_a_sane_range(value, files, tmp_path):
    path = write_crafted("quantized", files, tmp_path, num_classes=value)
    if value is None:  # the default: the model's own class count
        load_quantized(path)
        return
    with pytest.raises(LowbitError, match="num_classes"):
        load_quantized(path)


def test_trusting_your_own_model_code(tmp_path, user_model, calib, capsys):
    q = lowbit.quantize(user_model, lowbit.PTQConfig(w_bits=4, a_bits=8), calib)
    spec = "tests.user_models:UserNet"
    path = save_quantized(tmp_path / "q.pt", q, spec)
    with pytest.raises(ModelError, match=f"pass --model {spec}"):
        load_quantized(path)
    with pytest.raises(ModelError, match="asks to import"):
        load_quantized(path, trust_model_code="tests.user_models:Block")
    for trust in (True, spec):
        back, _ = load_quantized(path, trust_model_code=trust)
        assert torch.equal(back(calib[0]), q(calib[0]))
    out = tmp_path / "q.lowbit"
    code, _, err = cli(capsys, "export", "--checkpoint", path, "--out", out)
    assert one_line_error(code, err) and "--model tests.user_models:UserNet" in err
    code, _, err = cli(capsys, "export", "--checkpoint", path, "--out", out, "--model", spec)
    assert code == 0, err
    back, _ = load_packed(out, trust_model_code=spec)
    assert torch.equal(back(calib[0]), q(calib[0]))


def test_torchvision_builders_resolve_by_name_and_size_is_bounded(torchvision_models):
    info = resolve_model("torchvision.models:resnet18", trust_model_code=False)
    assert isinstance(info.factory(num_classes=7), torch.nn.Module)
    assert resolve_model("torchvision.models.detection:fasterrcnn_resnet50_fpn", False)
    assert resolve_model("torchvision:resnet18", trust_model_code=False)  # the short form
    for spec in ("torchvision.models:get_model", "torchvision.models:list_models",
                 "torchvision.io:read_file", "torchvision:get_model"):
        with pytest.raises(ModelError, match="asks to import"):
            resolve_model(spec, trust_model_code=False)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(ModelError, match="more than a 10000-byte file can hold"):
        build_model("torchvision.models:vit_h_14", num_classes=10, trust_model_code=False,
                    file_bytes=10_000)  # 632M parameters: refused from the meta device
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200 * 1024


def test_a_builder_that_cannot_run_on_meta_is_sized_by_extrapolation(torchvision_models):
    """RegNet reads tensor values while it builds: its size comes from real builds at one and
    two classes, and equals the real model's; too large a class count is still refused."""
    spec = "torchvision.models:regnet_x_400mf"
    real = sum(t.numel() for t in build_model(spec, num_classes=10).state_dict().values())
    model = build_model(spec, num_classes=10, trust_model_code=False, file_bytes=4 * real)
    assert sum(t.numel() for t in model.state_dict().values()) == real
    with pytest.raises(ModelError, match="more than a"):
        build_model(spec, num_classes=10 ** 7, trust_model_code=False, file_bytes=4 * real)


def test_a_torchvision_model_file_loads_by_name_without_trust(torchvision_models, tmp_path):
    """MobileNetV3 (depthwise, squeeze-excite, hardswish) quantized, saved in both formats and
    loaded with no trust: its builder resolves by name and the outputs are bit-identical."""
    spec = "torchvision.models:mobilenet_v3_small"
    torch.manual_seed(0)
    q = lowbit.quantize(build_model(spec).eval(), lowbit.PTQConfig(w_bits=8, a_bits=8, calib=4),
                        [torch.randn(4, 3, 96, 96)])
    x = torch.randn(2, 3, 96, 96)
    for path, load in ((save_quantized(tmp_path / "m.pt", q, spec), load_quantized),
                       (export_packed(q, tmp_path / "m.lowbit", spec), load_packed)):
        back, header = load(path)
        assert header["model"] == spec and torch.equal(back(x), q(x))


def test_packed_header_bombs_are_refused(files, tmp_path):
    paths, _, _ = files
    raw = paths["packed"].read_bytes()
    header, _, _ = fm.packed_parts(raw)
    cases = {
        "inflates beyond": fm.packed_with(raw, packed_header=zlib.compress(b" " * (65 << 20))),
        "not valid JSON": fm.packed_with(raw, packed_header=zlib.compress(
            b"[" * 200_000 + b"]" * 200_000)),
        "more than the file holds": fm.packed_with(raw, {**header, "index": [
            ["x", "float32", 0, [2 ** 31 - 1, 2 ** 31 - 1]], *header["index"]]}),
        "does not cover": fm.packed_with(raw, {**header, "index": header["index"][:-1]}),
    }
    for message, data in cases.items():
        path = tmp_path / "bomb.lowbit"
        path.write_bytes(data)
        with pytest.raises(LowbitError, match=message):
            load_packed(path)


def test_torch_archive_bombs_and_views_are_refused(files, tmp_path):
    paths, _, _ = files
    deflated = tmp_path / "deflated.pt"
    with zipfile.ZipFile(paths["quantized"]) as src, \
            zipfile.ZipFile(deflated, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info.filename))
    with pytest.raises(LowbitError, match="compressed entries"):
        load_quantized(deflated)
    payload = torch.load(paths["quantized"], weights_only=True)
    state = dict(payload["state_dict"])
    state["0.weight_quantizer.quantizer.scale"] = torch.ones(1).expand(10 ** 8)
    view = tmp_path / "view.pt"
    torch.save({**payload, "state_dict": state}, view)
    with pytest.raises(LowbitError, match="backed by only 4 bytes"):
        load_quantized(view)
    state = dict(payload["state_dict"])
    key = next(k for k in state if k.endswith("input_quantizer.scale"))
    bias = next(k for k in state if k.endswith("bias"))
    nan_bias = tmp_path / "nan_bias.pt"
    torch.save({**payload, "state_dict": {**state, bias: state[bias] * float("nan")}}, nan_bias)
    with pytest.raises(LowbitError, match=f"{bias} holds NaN or Inf"):
        load_quantized(nan_bias)
    for value, message in ((float("nan"), "holds NaN or Inf"), (0.0, "finite positive scales")):
        bad = tmp_path / "bad.pt"
        torch.save({**payload, "state_dict": {**state, key: torch.full_like(state[key], value)}},
                   bad)
        with pytest.raises(LowbitError, match=message):
            load_quantized(bad)


def test_found_by_the_campaign(files, tmp_path):
    """Two files the mutation campaign once loaded wrongly: an input shape that does not fit
    the model (the rebuild's trace raised ValueError), and a state tensor of the right shape in
    another dtype (PyTorch cast it: a different model)."""
    paths, _, _ = files
    header = fm.header_of("packed_kmeans", paths["packed_kmeans"])
    path = tmp_path / "shape.lowbit"
    path.write_bytes(fm.with_header("packed_kmeans", paths["packed_kmeans"], fm.replaced(
        header, ("trained", "input_shape"), [8, 8])))
    with pytest.raises(LowbitError, match="does not fit the model"):
        load_packed(path)
    payload = torch.load(paths["quantized"], weights_only=True)
    key = next(k for k in payload["state_dict"] if k.endswith("bias"))
    state = {**payload["state_dict"], key: payload["state_dict"][key].double()}
    path = tmp_path / "dtype.pt"
    torch.save({**payload, "state_dict": state}, path)
    with pytest.raises(LowbitError, match="shape or dtype keys"):
        load_quantized(path)


def test_yaml_python_tags_are_refused(tmp_path, capsys):
    marker = tmp_path / "pwned"
    recipe = tmp_path / "evil.yaml"
    recipe.write_text(f'w_bits: !!python/object/apply:os.system ["touch {marker}"]\n')
    with pytest.raises(ConfigError, match="not valid YAML"):
        read_recipe(str(recipe))
    code, _, err = cli(capsys, "quantize", "--model", "digits_cnn", "--data", "digits",
                       "--recipe", recipe, "--out", tmp_path / "q")
    assert one_line_error(code, err) and not marker.exists()
    assert not (tmp_path / "q").exists()


def _onnx_file(path, external=None, domain=""):
    weight = helper.make_tensor("w", TensorProto.FLOAT, [2], [1.0, 2.0])
    if external:
        weight.ClearField("float_data")
        weight.data_location = TensorProto.EXTERNAL
        weight.external_data.add(key="location", value=external)
    node = helper.make_node("Mul", ["x", "w"], ["y"], domain=domain)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, [1, 2])], [helper.make_tensor_value_info(
        "y", TensorProto.FLOAT, [1, 2])], [weight])
    opsets = [helper.make_opsetid("", 21)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    path.write_bytes(helper.make_model(graph, opset_imports=opsets).SerializeToString())
    return path


def test_onnx_files_must_be_self_contained(tmp_path, capsys):
    assert read_onnx(_onnx_file(tmp_path / "ok.onnx")).graph.node[0].op_type == "Mul"
    (tmp_path / "weights.bin").write_bytes(bytes(8))
    # onnx's checker refuses external data it cannot resolve; read_onnx refuses the rest
    for path, message in ((_onnx_file(tmp_path / "ext.onnx", "weights.bin"), "should be stored"
                           "|external"),
                          (_onnx_file(tmp_path / "up.onnx", "../../etc/passwd"), "outside"),
                          (_onnx_file(tmp_path / "dom.onnx", domain="evil.ops"), "domains"),
                          (tmp_path / "missing.onnx", "not found")):
        with pytest.raises(ExportError, match=message):
            read_onnx(path)
    code, _, err = cli(capsys, "eval", "--model", "digits_cnn", "--checkpoint",
                       tmp_path / "ext.onnx", "--data", "digits")
    assert one_line_error(code, err) and "ext.onnx" in err


def test_a_backtracking_layer_pattern_times_out():
    from lowbit.policy import _match

    with pytest.raises(ConfigError, match="simplify it"):
        _match(r"(\w|\w\w)*(x|\w)*\d$", "a" * 40 + "!")


# -- mutation suite ----------------------------------------------------------------------------

KINDS = fm.KINDS


def _check(kind, files, tmp_path, data: bytes, allowed=("identical", "refused")) -> str:
    paths, x, outputs = files
    path = tmp_path / f"mutated{paths[kind].suffix}"
    path.write_bytes(data)
    result = fm.outcome(loader(kind, x[:8]), path, outputs[kind], x)
    assert result in allowed, result
    return result


@pytest.mark.parametrize("kind", KINDS)
def test_truncation_at_every_section(kind, files, tmp_path):
    paths, _, _ = files
    raw = paths[kind].read_bytes()
    cuts = fm.cut_points(fm.sections(kind, raw), len(raw))
    results = [_check(kind, files, tmp_path, raw[:n]) for n in cuts]
    assert results.count("refused") == len(cuts)


@pytest.mark.parametrize("kind", KINDS)
@FUZZ
@given(changes=st.lists(st.tuples(st.integers(0, 2 ** 24), st.integers(1, 255)), min_size=1,
                        max_size=6))
def test_byte_flips(kind, files, tmp_path, changes):
    paths, _, _ = files
    _check(kind, files, tmp_path, fm.flips(paths[kind].read_bytes(), changes))


@pytest.mark.parametrize("kind", KINDS)
@FUZZ
@given(data=st.data())
def test_header_field_replacement(kind, files, tmp_path, data):
    paths, _, _ = files
    header = fm.header_of(kind, paths[kind])
    _check(kind, files, tmp_path, fm.with_header(kind, paths[kind], fm.edit(header, data.draw)))


@FUZZ
@given(data=st.data())
def test_state_tensor_replacement(files, tmp_path, data):
    """A state tensor replaced by one of another shape or dtype is refused (one of the same
    shape and dtype is a different model that the file validly describes: not drawn)."""
    paths, _, _ = files
    payload = torch.load(paths["quantized"], weights_only=True)
    state = payload["state_dict"]
    key = data.draw(st.sampled_from(sorted(state)))
    dims = data.draw(st.lists(st.integers(0, 3), max_size=3))
    dtype = data.draw(st.sampled_from([torch.float32, torch.int64, torch.uint8, torch.bool,
                                       torch.float64, torch.complex64]))
    value = torch.zeros(dims, dtype=dtype)
    if value.shape == state[key].shape and dtype == state[key].dtype:
        return
    mutated = fm.torch_bytes({**payload, "state_dict": {**state, key: value}})
    _check("quantized", files, tmp_path, mutated)


@pytest.mark.parametrize("kind", ["packed", "quantized"])
def test_mutated_files_through_the_cli(kind, files, tmp_path, capsys):
    paths, _, _ = files
    raw = paths[kind].read_bytes()
    code, good, _ = cli(capsys, "eval", "--checkpoint", paths[kind], "--data", "digits",
                        "--limit", 50)
    assert code == 0
    generator = torch.Generator().manual_seed(0)
    for i in range(12):
        n = len(raw)
        if i % 3 == 0:
            data = raw[: int(torch.randint(0, n, (1,), generator=generator))]
        else:
            changes = [(int(torch.randint(0, n, (1,), generator=generator)), 1 << (i % 8))]
            data = fm.flips(raw, changes)
        path = tmp_path / f"m{i}{paths[kind].suffix}"
        path.write_bytes(data)
        code, out, err = cli(capsys, "eval", "--checkpoint", path, "--data", "digits",
                             "--limit", 50)
        assert (code == 0 and out == good) or one_line_error(code, err), (code, out, err)
        if kind == "quantized":  # export writes its file only from a file that loads
            target = tmp_path / f"m{i}.lowbit"
            code, _, err = cli(capsys, "export", "--checkpoint", path, "--out", target)
            assert code == 0 or (one_line_error(code, err) and not target.exists()), err


def test_header_json_round_trip_is_what_the_suite_mutates(files):
    """The suite edits the real header: the fields it walks are the ones export writes."""
    paths, _, _ = files
    header, _, _ = fm.packed_parts(paths["packed"].read_bytes())
    assert {"model", "num_classes", "method", "config", "plan", "weights", "index"} <= set(header)
    assert json.loads(json.dumps(header)) == header
