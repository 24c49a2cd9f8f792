"""convert.py through the one evaluation path: figures, units, report files, bad input, DDP."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from csdlab.cli import make_convert_cli, run_cli
from tests.checkpoints import DIGITS_CSDFORMER, REPO, make_checkpoint

CSDFORMER = "csdlab.convert.csdformer.CSDformerConverter"


def _args(ckpt: Path, out: Path, *extra: str, converter: str = CSDFORMER) -> list[str]:
    return ["test", "--model.converter", converter, "--model.checkpoint", str(ckpt),
            "--data.batch_size", "64", "--data.limit", "128", "--data.data_dir", str(out / "data"),
            "--trainer.accelerator", "cpu", "--progress_bar.refresh_rate", "0",
            "--report.out_dir", str(out), "--trainer.default_root_dir", str(out), *extra]


def test_csdformer_conversion_figures_and_report(digits_qann: Path, tmp_path: Path, caplog) -> None:
    caplog.set_level("INFO", logger="csdlab")
    cli = make_convert_cli(_args(digits_qann, tmp_path, "--model.converter.delays", "[0, 3]"))
    r = cli.model.results
    f = r["figures"]
    assert f["samples"] == 128.0
    assert 0.0 <= f["ref/top1"] <= 1.0  # fractions, never percent
    assert f["snn/D3/agreement"] == 1.0 and f["snn/D3/max_logit_diff"] < 1e-4  # exact at D = T - 1
    assert f["snn/D3/top1"] == f["ref/top1"] == f["snn/D3/top1_t4"]
    assert f["snn/D0/max_logit_diff"] > 1e-3  # plain IF is not exact: the check can fail
    assert 0 < f["snn/D3/firing_rate"] < 1 and 0 < f["energy/D3/ratio"] < 1
    ratios = [f[f"energy/D3/ratio_t{t}"] for t in range(1, 5)]
    assert ratios == sorted(ratios) and ratios[-1] == f["energy/D3/ratio"]  # energy of steps 1..t grows
    assert r["variants"]["D3"] == {"time_steps": 4, "latency": 7, "readout_steps": [1, 2, 3, 4]}
    written = json.loads((tmp_path / "figures.json").read_text())
    assert written["images"] == 128 and written["limit"] == 128 and written["split"] == "test"
    assert written["spike_driven_check"]["D3"]["spike_driven"] is True
    assert "| SNN D3 | 7 |" in written["tables"]["summary"]
    assert sorted(p.name for p in tmp_path.glob("*.png")) == [
        "accuracy_vs_latency.png", "accuracy_vs_t.png", "energy_vs_t.png", "firing_rate_per_site.png"]
    # the spike-driven line gives its verdict and what it certifies
    lines = [r.getMessage() for r in caplog.records]
    assert any(re.match(r"spike-driven check D3: PASS: \d+ synaptic sites watched", m) for m in lines)
    assert "test batch 1/2: simulating D0" in lines  # then one line per 10 s at most


def test_given_delay_and_plain_if_only(digits_qann: Path, tmp_path: Path) -> None:
    cli = make_convert_cli(_args(digits_qann, tmp_path, "--model.converter.delay", "100", "--data.limit", "64"))
    assert list(cli.model.results["variants"]) == ["D0", "D100"]  # not 101 delays


def test_time_steps_hint_names_an_existing_option(digits_qann: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="allow_time_steps_mismatch true"):
        make_convert_cli(_args(digits_qann, tmp_path, "--model.converter.time_steps", "6"))
    cli = make_convert_cli(_args(digits_qann, tmp_path, "--model.converter.time_steps", "6", "--data.limit", "64",
                                 "--model.converter.allow_time_steps_mismatch", "true"))
    assert cli.model.results["variants"]["D3"]["time_steps"] == 6


def test_wrong_model_and_float_model_are_refused(digits_vit: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="takes a csdlab CSDformer, got VisionTransformer"):
        make_convert_cli(_args(digits_vit, tmp_path))
    relu = make_checkpoint(tmp_path / "relu.ckpt", "csdformer_tiny", {**DIGITS_CSDFORMER, "act": "relu"})
    with pytest.raises(ValueError, match="float CSDformer"):
        make_convert_cli(_args(relu, tmp_path))


def test_text_file_is_not_a_checkpoint(tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint\n")
    with pytest.raises(ValueError, match="is not a PyTorch checkpoint"):
        make_convert_cli(_args(text, tmp_path))


def test_nan_images_are_refused(digits_qann: Path) -> None:
    from csdlab.convert.csdformer import CSDformerConverter
    from csdlab.lit.module import load_classifier

    qann, _ = load_classifier(digits_qann)
    snn = CSDformerConverter().convert(qann)["D3"]
    x = torch.rand(2, 1, 16, 16)
    x[1, 0, 3, 3] = float("nan")
    assert torch.isnan(qann(x)[1]).all()  # the QANN propagates NaN ...
    with pytest.raises(ValueError, match="1 NaN/inf values"):  # ... the SNN refuses instead of going silent
        snn(x)


RUN = """
import sys
from csdlab.cli import make_convert_cli
make_convert_cli(sys.argv[1:])
"""


def run_convert(tmp_path: Path, args: list[str], devices: int) -> dict:
    """convert.py in a fresh process (DDP re-launches the script for rank 1); returns figures.json."""
    script = tmp_path / "run_convert.py"
    script.write_text(RUN)
    out = tmp_path / f"out{devices}"
    args = [a if a != str(tmp_path) else str(out) for a in args]
    env = {"PYTHONPATH": str(REPO), "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    strategy = ["--trainer.devices", str(devices), "--trainer.strategy", "ddp" if devices > 1 else "auto"]
    proc = subprocess.run([sys.executable, str(script), *args, *strategy], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "figures.json").read_text())


@pytest.mark.parametrize("method", ["csdformer", "ecmt", "mbe"])
def test_two_processes_give_the_figures_of_one(method: str, digits_qann: Path, digits_vit: Path,
                                               tmp_path: Path) -> None:
    if method == "csdformer":
        args = _args(digits_qann, tmp_path, "--model.converter.delays", "[0, 3]", "--data.limit", "100")
    elif method == "ecmt":
        args = _args(digits_vit, tmp_path, "--model.converter.T", "3", "--data.limit", "100",
                     "--data.calib_batches", "2", "--model.early_exit", "auto", "--data.exit_images", "150",
                     converter="csdlab.convert.ecmt.ECMTConverter")  # early exit: N processes choose as one
    else:
        args = _args(digits_vit, tmp_path, "--model.converter.Ts", "[8]", "--data.limit", "100",
                     "--data.calib_batches", "2", converter="csdlab.convert.mbe.MBEConverter")
    one, two = run_convert(tmp_path, args, 1), run_convert(tmp_path, args, 2)
    assert (one["world_size"], two["world_size"]) == (1, 2)
    f1, f2 = one["figures"], two["figures"]
    assert f1["samples"] == f2["samples"] == 100  # no padded or repeated images
    assert f1.keys() == f2.keys()
    for k in f1:
        # early exit charges each image its batch's mean ops per step (docs/early_exit.md): N
        # processes batch the images differently, which moves that estimate (measured: 2e-4 relative)
        rel = 1e-3 if k.startswith("exit/") and "energy_ratio" in k else 1e-5
        assert f2[k] == pytest.approx(f1[k], rel=rel, abs=1e-6), k


# -- the command line itself ----------------------------------------------------------------------
def _help(args: list[str], capsys) -> str:
    assert run_cli(make_convert_cli, args, prog="convert.py") == 0
    return capsys.readouterr().out


def test_help_lists_mbe_fit_and_a_short_complete_test(capsys) -> None:
    top = _help(["--help"], capsys)
    assert "mbe-fit" in top and "test" in top
    test = _help(["test", "--help"], capsys)
    assert "--optimizer" not in test and "--lr_scheduler" not in test  # a conversion never optimises
    assert "--trainer.max_epochs" not in test and "--ckpt_path" not in test  # the training loop's
    assert "--trainer.enable_progress_bar" in test and "--trainer.devices" in test
    assert "measure every spiking variant against it on the evaluation split." in " ".join(top.split())
    assert "into the run's folder (logs/convert/<config>/version_N unless --report.out_dir)." in " ".join(
        test.split())
    assert len(test.splitlines()) < 450
    assert "--replace_shipped" in _help(["mbe-fit", "--help"], capsys)


def test_converters_resolve_by_class_name(digits_vit: Path, tmp_path: Path, capsys) -> None:
    assert "--model.converter.percentile" in _help(["test", "--model.converter.help", "ECMTConverter"], capsys)
    assert "--model.converter.Ts" in _help(["test", "--model.converter.help", "MBEConverter"], capsys)
    cli = make_convert_cli(_args(digits_vit, tmp_path, "--model.converter.T", "2", "--data.limit", "32",
                                 "--data.calib_batches", "1", converter="ECMTConverter"))
    assert cli.model.converter.name == "ecmt" and list(cli.model.results["variants"]) == ["T2"]


def test_progress_bar_off_and_calibration_progress(digits_vit: Path, tmp_path: Path, caplog) -> None:
    caplog.set_level("INFO", logger="csdlab")
    args = [a for a in _args(digits_vit, tmp_path, "--model.converter.T", "2", "--data.limit", "32",
                             "--data.calib_batches", "2", "--trainer.enable_progress_bar", "false",
                             converter="csdlab.convert.ecmt.ECMTConverter")
            if a not in ("--progress_bar.refresh_rate", "0")]
    cli = make_convert_cli(args)
    assert cli.trainer.progress_bar_callback is None
    lines = [r.getMessage() for r in caplog.records]
    assert "ecmt calibration: batch 1/2" in lines and "ecmt calibration: batch 2/2" in lines
    assert "ecmt calibration: 2 batches observed, fixing the constants" in lines


def test_every_run_gets_its_own_folder_and_wandb_run(digits_qann: Path, tmp_path: Path, monkeypatch) -> None:
    """No --report.out_dir: logs/convert/version_N per run (config, figures, plots, CSV) and an
    offline W&B run; a re-run writes version_1, never over version_0."""
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    wandb.teardown()  # W&B's process-wide settings were made by earlier tests with WANDB_MODE=disabled
    args = ["test", "--model.converter", "CSDformerConverter", "--model.converter.delays", "[3]",
            "--model.checkpoint", str(digits_qann), "--data.limit", "32", "--data.data_dir", str(tmp_path / "data"),
            "--trainer.accelerator", "cpu", "--progress_bar.refresh_rate", "0"]
    try:
        for _ in range(2):
            make_convert_cli(args)
    finally:
        wandb.teardown()
    root = tmp_path / "logs" / "convert"  # the tests run in tmp_path
    for version in ("version_0", "version_1"):
        run = root / version
        assert {"config.yaml", "figures.json", "metrics.csv", "energy_vs_t.png"} <= {p.name for p in run.iterdir()}
    assert len(list((root / "wandb").glob("offline-run-*"))) == 2
    assert not (root / "config.yaml").exists()


@pytest.mark.parametrize("config", sorted(p.name for p in (REPO / "configs" / "convert").glob("*.yaml")))
def test_convert_configs_version_their_runs(config: str, monkeypatch) -> None:
    monkeypatch.chdir(REPO)  # assets/ are named relative to the repository root
    cli = make_convert_cli(["--config", str(REPO / "configs" / "convert" / config)], run=False)
    name = config.removesuffix(".yaml")
    assert cli.trainer.default_root_dir == f"logs/convert/{name}"
    csv, wandb = cli.trainer.loggers
    assert (type(csv).__name__, type(wandb).__name__) == ("CSVLogger", "WandbLogger")
    assert Path(csv.log_dir).parent == Path(f"logs/convert/{name}") and Path(csv.log_dir).name.startswith("version_")


def test_mbe_fit_writes_a_new_folder_unless_told_to_replace(tmp_path: Path, monkeypatch) -> None:
    import csdlab.snn.mbe_fit as mbe_fit
    from csdlab.snn.mbe import table_path

    calls = []

    def fake_fit_all(out_dir, Ts, Ns):
        calls.append((Path(out_dir), list(Ts), list(Ns)))
        return {"files": [str(Path(out_dir) / f"mbe_T{T}_N{N}.json") for T in Ts for N in Ns]}

    monkeypatch.setattr(mbe_fit, "fit_all", fake_fit_all)
    make_convert_cli(["mbe-fit", "--Ts", "[4]", "--Ns", "[4]"])
    make_convert_cli(["mbe-fit"])
    assert calls[0] == (Path("logs/mbe_fit/version_0"), [4], [4])
    assert calls[1] == (Path("logs/mbe_fit/version_1"), [2, 3, 4, 8, 10, 12, 16], [4, 8])
    make_convert_cli(["mbe-fit", "--out_dir", str(tmp_path / "mine")])
    assert calls[2][0] == tmp_path / "mine"
    with pytest.raises(ValueError, match="not both"):
        make_convert_cli(["mbe-fit", "--out_dir", "x", "--replace_shipped", "true"])
    monkeypatch.setattr("csdlab.cli.check_writable", lambda *a: None)  # never touch the package here
    make_convert_cli(["mbe-fit", "--replace_shipped", "true", "--Ts", "[8]", "--Ns", "[8]"])
    assert calls[3] == (table_path(8, 8).parent, [8], [8])
