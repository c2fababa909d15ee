import json

import pytest
import torch

from lowbit.cli import main
from tests.conftest import CIFAR10, RESNET20, needs_shared


def run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def digits_ckpt(tmp_path_factory):
    from lowbit.data.digits import load_digits
    from lowbit.models import build_model
    from lowbit.training import TrainConfig, train

    data = load_digits()
    config = TrainConfig(epochs=8, batch_size=64, optimizer="adam", lr=3e-3, augment=False,
                         eval_every=8)
    model = train(build_model("digits_cnn"), data, data.normalization(), config).model
    path = tmp_path_factory.mktemp("ck") / "digits.pt"
    torch.save({"state_dict": model.state_dict()}, path)
    return path


def test_quantize_writes_report_and_reloadable_checkpoint(capsys, tmp_path, digits_ckpt):
    out = tmp_path / "q"
    code, stdout, _ = run(capsys, "quantize", "--model", "digits_cnn", "--checkpoint", str(digits_ckpt),
                          "--data", "digits", "--w-bits", "4", "--a-bits", "4", "--clip", "aciq-laplace",
                          "--bit-alloc", "--bias-correction", "--calib", "512", "--out", str(out))
    assert code == 0 and "quantized" in stdout
    report = json.loads((out / "report.json").read_text())
    for key in ("fp_top1", "q_top1", "w_bits", "a_bits", "layers"):
        assert key in report
    assert report["w_bits"] == 4 and report["a_bits"] == 4
    assert all("weight_mse" in r and "weight_sqnr_db" in r for r in report["layers"])
    code, stdout, _ = run(capsys, "eval", "--checkpoint", str(out / "quantized.pt"), "--data", "digits")
    assert code == 0 and f"top-1 {report['q_top1']:.2f}%" in stdout


def test_bit_alloc_with_float_activations(capsys, tmp_path, digits_ckpt):
    code, _, _ = run(capsys, "quantize", "--model", "digits_cnn", "--checkpoint", str(digits_ckpt),
                     "--data", "digits", "--w-bits", "4", "--a-bits", "none", "--bit-alloc",
                     "--limit", "50", "--out", str(tmp_path / "wa"))
    report = json.loads((tmp_path / "wa" / "report.json").read_text())
    assert code == 0 and report["a_bits"] is None and report["config"]["w_bit_alloc"] is True


def test_recipe_and_limit(capsys, tmp_path, digits_ckpt):
    code, stdout, _ = run(capsys, "quantize", "--model", "digits_cnn", "--checkpoint", str(digits_ckpt),
                          "--data", "digits", "--recipe", "ptq-w4a4-banner", "--limit", "100",
                          "--out", str(tmp_path / "r"))
    assert code == 0
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert report["test_images"] == 100 and report["config"]["a_bit_alloc"] is True


def test_adaround_flag_replaces_the_recipes_weight_correction(capsys, tmp_path, digits_ckpt):
    code, _, err = run(capsys, "quantize", "--model", "digits_cnn", "--checkpoint", str(digits_ckpt),
                       "--data", "digits", "--recipe", "ptq-w4a4-best", "--adaround", "20",
                       "--calib", "128", "--limit", "100", "--out", str(tmp_path / "a"))
    assert code == 0, err
    config = json.loads((tmp_path / "a" / "report.json").read_text())["config"]
    assert config["w_round"] == "adaround" and config["round_iters"] == 20
    assert config["bias_correction"] is None


def test_streaming_flags_reach_the_config_and_spill(capsys, tmp_path, digits_ckpt):
    code, _, err = run(capsys, "quantize", "--model", "digits_cnn", "--checkpoint", str(digits_ckpt),
                       "--data", "digits", "--calib", "200", "--calib-batch-size", "48",
                       "--calib-memory", "0", "--limit", "50", "--out", str(tmp_path / "s"))
    assert code == 0, err
    report = json.loads((tmp_path / "s" / "report.json").read_text())
    assert report["config"]["calib_batch_size"] == 48 and report["config"]["calib_memory"] == "0"
    assert any("in batches of 48" in n and "spilled to disk" in n for n in report["notes"])


@pytest.mark.parametrize("extra,message", [
    (["--w-bits", "17"], "w_bits must be an integer from 1 to 16"),
    (["--recipe", "missing-recipe"], "recipe 'missing-recipe' not found"),
    (["--clip", "magic"], "clip must be one of"),
    (["--calib-memory", "lots"], "a memory size must be a number of bytes"),
    (["--calib-batch-size", "0"], "calib_batch_size must be a positive number"),
])
def test_bad_flags_give_one_line_and_keep_old_output(capsys, tmp_path, digits_ckpt, extra, message):
    out = tmp_path / "keep"
    out.mkdir()
    (out / "report.json").write_text('{"good": true}')
    code, _, err = run(capsys, "quantize", "--model", "digits_cnn", "--checkpoint", str(digits_ckpt),
                       "--data", "digits", "--out", str(out), *extra)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert (out / "report.json").read_text() == '{"good": true}'


def test_bad_recipe_key(capsys, tmp_path, digits_ckpt):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("w_bits: 4\nact_bits: 4\n")
    code, _, err = run(capsys, "quantize", "--model", "digits_cnn", "--checkpoint", str(digits_ckpt),
                       "--data", "digits", "--recipe", str(recipe), "--out", str(tmp_path / "o"))
    assert code == 2 and "unknown PTQ key 'act_bits'" in err and "a_bits" in err


def test_checkpoint_errors(capsys, tmp_path):
    code, _, err = run(capsys, "eval", "--model", "resnet20", "--checkpoint", str(tmp_path / "no.th"),
                       "--data", "digits")
    assert code == 2 and "checkpoint not found" in err
    bad = tmp_path / "bad.th"
    bad.write_bytes(b"not a checkpoint")
    code, _, err = run(capsys, "eval", "--model", "resnet20", "--checkpoint", str(bad), "--data", "digits")
    assert code == 2 and "cannot read checkpoint" in err
    from lowbit.models import build_model
    mismatched = tmp_path / "vgg.th"
    torch.save(build_model("digits_cnn").state_dict(), mismatched)
    code, _, err = run(capsys, "eval", "--model", "resnet20", "--checkpoint", str(mismatched),
                       "--data", "digits")
    assert code == 2 and "missing keys: conv1.weight" in err and "unexpected keys" in err


def test_nan_checkpoint_names_layer(capsys, tmp_path):
    from lowbit.models import build_model
    model = build_model("digits_cnn")
    state = model.state_dict()
    state["3.weight"][0, 0, 0, 0] = float("inf")
    path = tmp_path / "nan.th"
    torch.save(state, path)
    code, _, err = run(capsys, "quantize", "--model", "digits_cnn", "--checkpoint", str(path),
                       "--data", "digits", "--out", str(tmp_path / "o"))
    assert code == 2 and "3.weight contains NaN or Inf" in err


def test_wrong_data_path(capsys, tmp_path):
    code, _, err = run(capsys, "eval", "--model", "resnet20", "--data", f"cifar10={tmp_path}/nope")
    assert code == 2 and "CIFAR path not found" in err


def test_user_factory_model(capsys, tmp_path):
    from lowbit.models import build_model
    path = tmp_path / "w.pt"
    torch.save(build_model("digits_cnn").state_dict(), path)
    code, stdout, _ = run(capsys, "eval", "--model", "lowbit.models.small:digits_cnn",
                          "--checkpoint", str(path), "--data", "digits", "--limit", "50")
    assert code == 0 and "on 50 digits test images" in stdout


@needs_shared(CIFAR10, RESNET20)
def test_documented_cli_example_on_real_data(capsys, tmp_path):
    code, stdout, _ = run(capsys, "quantize", "--model", "resnet20", "--checkpoint", str(RESNET20),
                          "--data", f"cifar10={CIFAR10}", "--w-bits", "4", "--a-bits", "4",
                          "--clip", "aciq-laplace", "--bit-alloc", "--bias-correction",
                          "--calib", "256", "--limit", "500", "--out", str(tmp_path / "r20"))
    assert code == 0
    report = json.loads((tmp_path / "r20" / "report.json").read_text())
    assert report["q_top1"] > 70.0


def test_every_packaged_recipe_is_a_valid_config():
    from lowbit.recipes import load_recipe, recipe_names

    names = recipe_names()
    assert "ptq-w4a4-adaround" in names
    for name in names:
        assert load_recipe(name).validate()


def test_train_psg_writes_a_run_and_refuses_to_overwrite_it(capsys, tmp_path, digits_ckpt):
    out = tmp_path / "psg"
    argv = ["train", "--model", "digits_cnn", "--checkpoint", str(digits_ckpt), "--data",
            "digits", "--method", "psg", "--w-bits", "3", "--lambda-s", "50", "--epochs", "1",
            "--train-batch-size", "64", "--no-augment", "--lr", "0.01", "--out", str(out)]
    code, stdout, err = run(capsys, *argv)
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    assert report["method_config"]["lambda_s"] == 50 and "ptq_w3a32_top1" in report
    assert "psg: top-1" in stdout
    state = torch.load(out / "model.pt", weights_only=True)["state_dict"]
    assert not any("weight_quantizer" in k for k in state)  # the plain float model
    code, _, err = run(capsys, *argv)
    assert code == 2 and "--resume" in err
    code, _, err = run(capsys, *argv[:-2], "--method", "psg", "--w-bits", "1", "--out",
                       str(tmp_path / "bad"))
    assert code == 2 and "1 bit" in err


def test_plot_weights_writes_a_png_per_layer_and_a_page(capsys, tmp_path, digits_ckpt):
    code, _, err = run(capsys, "plot-weights", "--model", "digits_cnn", "--checkpoints",
                       f"a={digits_ckpt}", f"b={digits_ckpt}", "--w-bits", "3",
                       "--out", str(tmp_path / "pw"))
    assert code == 0, err
    page = (tmp_path / "pw" / "index.html").read_text()
    assert len(list((tmp_path / "pw").glob("*.png"))) == 4 and page.count("<img") == 4
    assert "a SSE" in page and "b SSE" in page
    code, _, err = run(capsys, "plot-weights", "--model", "digits_cnn", "--checkpoints",
                       str(digits_ckpt), "--w-bits", "1", "--out", str(tmp_path / "x"))
    assert code == 2 and "1 bit" in err


@pytest.mark.filterwarnings("ignore:.*distinct weights")  # k-means' 8-bit first layer says so
@pytest.mark.parametrize("method", [["lsq", "--w-bits", "3", "--a-bits", "3"], ["xnor"],
                                    ["bnn"], ["kmeans", "--w-bits", "3"]])
def test_trained_models_reload_with_the_same_accuracy(capsys, tmp_path, digits_ckpt, method):
    out = tmp_path / method[0]
    code, _, err = run(capsys, "train", "--model", "digits_cnn", "--checkpoint", str(digits_ckpt),
                       "--data", "digits", "--method", *method, "--optimizer", "adam",
                       "--lr", "1e-3", "--epochs", "1", "--train-batch-size", "64",
                       "--no-augment", "--out", str(out))
    assert code == 0, err
    top1 = json.loads((out / "report.json").read_text())["top1"]
    code, stdout, _ = run(capsys, "eval", "--checkpoint", str(out / "model.pt"), "--data", "digits")
    assert code == 0 and f"top-1 {top1:.2f}%" in stdout
    binary = method[0] in ("xnor", "bnn")  # XNOR-Net and BNN run on the binary kernel
    assert ("popcount kernel" in stdout) == binary
    code, stdout, err = run(capsys, "export", "--checkpoint", str(out / "model.pt"),
                            "--out", str(tmp_path / "m.lowbit"))
    assert code == 0, err
    code, stdout, _ = run(capsys, "eval", "--checkpoint", str(tmp_path / "m.lowbit"),
                          "--data", "digits")
    assert code == 0 and f"top-1 {top1:.2f}%" in stdout
    assert ("popcount kernel" in stdout) == binary
    if binary:  # timed beside the float and int8 models in one run
        bench = tmp_path / "bench.json"
        flags = ["bench-infer", "--model", "digits_cnn", "--checkpoint", str(digits_ckpt),
                 "--data", "digits", "--batch-sizes", "1,8", "--rounds", "1", "--limit", "64",
                 "--runners", "lowbit int8", "--out", str(bench)]
        code, _, err = run(capsys, *flags, "--binary", str(tmp_path / "m.lowbit"))
        assert code == 0, err
        timing = json.loads(bench.read_text())["timing"]["threads=1 batch=8"]
        assert set(timing) == {"fp32 eager", "lowbit int8", "xnor popcount"}
        code, _, err = run(capsys, *flags, "--binary", str(digits_ckpt))
        assert code == 2 and "--binary" in err
    code, _, err = run(capsys, "eval", "--checkpoint", str(digits_ckpt), "--data", "digits")
    assert code == 2 and "--model" in err


def test_train_psg_sparse_reports_pruned_accuracy(capsys, tmp_path, digits_ckpt):
    out = tmp_path / "sparse"
    code, _, err = run(capsys, "train", "--model", "digits_cnn", "--checkpoint", str(digits_ckpt),
                       "--data", "digits", "--method", "psg", "--sparse", "--lambda-s", "20",
                       "--epochs", "1", "--train-batch-size", "64", "--no-augment",
                       "--out", str(out))
    assert code == 0, err
    pruned = json.loads((out / "report.json").read_text())["pruned"]
    assert [p["threshold"] for p in pruned] == [1e-3, 1e-2, 3e-2]
    assert pruned[0]["sparsity"] < pruned[-1]["sparsity"] <= 1.0


def test_export_packed_and_evaluate_it(capsys, tmp_path, digits_ckpt):
    out = tmp_path / "q"
    code, _, err = run(capsys, "quantize", "--model", "digits_cnn", "--checkpoint",
                       str(digits_ckpt), "--data", "digits", "--w-bits", "4", "--a-bits", "8",
                       "--bit-alloc", "--out", str(out))
    assert code == 0, err
    q_top1 = json.loads((out / "report.json").read_text())["q_top1"]
    code, stdout, err = run(capsys, "export", "--checkpoint", str(out / "quantized.pt"),
                            "--out", str(tmp_path / "m.lowbit"))
    assert code == 0 and "ideal" in stdout, err
    code, stdout, _ = run(capsys, "eval", "--checkpoint", str(tmp_path / "m.lowbit"),
                          "--data", "digits")
    assert code == 0 and f"top-1 {q_top1:.2f}%" in stdout
    code, _, err = run(capsys, "export", "--checkpoint", str(digits_ckpt), "--out",
                       str(tmp_path / "x.lowbit"))
    assert code == 2 and "neither a quantized checkpoint" in err


def test_export_a_trained_binary_model_packed(capsys, tmp_path, digits_ckpt):
    run_dir = tmp_path / "twn"
    code, _, err = run(capsys, "train", "--model", "digits_cnn", "--checkpoint", str(digits_ckpt),
                       "--data", "digits", "--method", "twn", "--epochs", "1",
                       "--train-limit", "256", "--out", str(run_dir))
    assert code == 0, err
    top1 = json.loads((run_dir / "report.json").read_text())["top1"]
    code, stdout, err = run(capsys, "export", "--checkpoint", str(run_dir / "model.pt"),
                            "--out", str(tmp_path / "twn.lowbit"))
    assert code == 0 and "ideal" in stdout, err
    code, stdout, _ = run(capsys, "eval", "--checkpoint", str(tmp_path / "twn.lowbit"),
                          "--data", "digits")
    assert code == 0 and f"top-1 {top1:.2f}%" in stdout


def test_training_recipes_load_their_method_config(tmp_path):
    from lowbit.methods.qat import QATConfig
    from lowbit.recipes import load_recipe

    recipe = tmp_path / "lsq.yaml"
    recipe.write_text("method: lsq\nw_bits: 2\na_bits: 2\ntrain:\n  epochs: 3\n")
    config = load_recipe(str(recipe))
    assert isinstance(config, QATConfig) and config.quantizer == "lsq" and config.w_bits == 2
    recipe.write_text("method: dorefa\n")
    with pytest.raises(Exception, match="dorefa"):
        load_recipe(str(recipe))


def test_packaged_lsq_recipe_trains(capsys, tmp_path, digits_ckpt):
    out = tmp_path / "lsq"
    code, _, err = run(capsys, "train", "--model", "digits_cnn", "--checkpoint", str(digits_ckpt),
                       "--data", "digits", "--recipe", "lsq-w4a4-finetune", "--epochs", "1",
                       "--train-batch-size", "64", "--no-augment", "--out", str(out))
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    assert report["method_config"]["lsq_init"] == "mse"
    assert report["train"]["distill"] and report["train"]["epochs"] == 1


def test_packaged_binary_recipe_trains(capsys, tmp_path, digits_ckpt):
    out = tmp_path / "xnor"
    code, _, err = run(capsys, "train", "--model", "digits_cnn", "--checkpoint", str(digits_ckpt),
                       "--data", "digits", "--recipe", "xnor-bireal", "--epochs", "1",
                       "--train-batch-size", "64", "--no-augment", "--out", str(out))
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    assert report["method_config"]["shortcuts"] == "bireal"
    assert report["train"]["milestones"] == [15] and report["train"]["optimizer"] == "adam"
    state = torch.load(out / "model.pt", weights_only=True)["state_dict"]
    assert any(k.endswith("_rprelu.beta") for k in state)  # the recipe's modules were trained


@pytest.mark.parametrize("model, flags, reflect", [
    ("psg_resnet32", [], True), ("resnet20", [], False),
    ("psg_resnet32", ["--zero-pad"], False), ("resnet20", ["--reflect-pad"], True)])
def test_crop_padding_defaults_to_the_one_the_model_was_trained_with(model, flags, reflect):
    from lowbit.cli import _training_from_args, build_parser

    args = build_parser().parse_args(["train", "--model", model, "--data", "cifar10",
                                      "--out", "x", *flags])
    assert _training_from_args(args)[2].reflect_pad is reflect


def test_crop_padding_flags_exclude_each_other(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--model", "resnet20", "--data", "cifar10", "--out", "x",
              "--reflect-pad", "--zero-pad"])
    assert "not allowed with" in capsys.readouterr().err
