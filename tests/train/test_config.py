"""The sectioned training config: typed values, did-you-mean errors, overrides, the saved resolved config."""
import pytest
import yaml

from fastmil._config import ConfigError
from fastmil.cli import main
from fastmil.data import SynthConfig, synthesize_store
from fastmil.train import TrainConfig, load_config


def test_yaml_scientific_notation_and_strings_become_the_declared_types(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("optim:\n  lr: 2e-4\n  epochs: '3'\n  grad_clip: null\nmodel:\n  gated: 'false'\n")
    assert yaml.safe_load(path.read_text())["optim"]["lr"] == "2e-4"  # what PyYAML alone gives
    cfg = load_config(path)
    assert cfg.optim.lr == 2e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.optim.epochs == 3 and cfg.optim.grad_clip is None and cfg.model.gated is False


@pytest.mark.parametrize("data,match", [
    ({"optim": {"lrr": 1e-3}}, r"optim: unknown key 'lrr' \(did you mean 'lr'\?\)"),
    ({"lr": 1e-3}, r"unknown section 'lr' \(did you mean 'optim.lr'\?\)"),
    ({"embed_dim": 64}, r"unknown section 'embed_dim' \(did you mean 'model.embed_dim'\?\)"),
    ({"optim": {"lr": "fast"}}, r"optim.lr: expected a number, got 'fast'"),
    ({"optim": {"epochs": 2.5}}, r"optim.epochs: expected an integer"),
    ({"run": {"amp": "bf15"}}, r"run.amp: must be one of .* \(did you mean 'bf16'\?\)"),
    ({"model": {"name": "abmill"}}, r"unknown model 'abmill' \(did you mean 'abmil'\?\)"),
    ({"model": {"name": "meanmil", "attn_dim": 8}}, r"model: unknown key 'attn_dim'"),
    ({"optim": {"epochs": 0}}, r"optim: epochs must be >= 1"),
    ({"data": {"bags_per_step": None}}, r"data: set bags_per_step and/or max_instances_per_step"),
    ({"optim": 3}, r"section 'optim' must be a mapping"),
])
def test_bad_configs_name_the_key(data, match):
    with pytest.raises(ConfigError, match=match):
        TrainConfig.from_dict(data)


def test_overrides_apply_on_top_of_the_file_and_switch_sections_cleanly(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("model:\n  name: abmil\n  attn_dim: 32\noptim:\n  lr: 1.0e-3\n")
    cfg = load_config(path, ["optim.lr=1e-4", "run.amp=bf16", "data.prefetch=4"])
    assert (cfg.optim.lr, cfg.run.amp, cfg.data.prefetch, cfg.model.attn_dim) == (1e-4, "bf16", 4, 32)
    other = cfg.with_overrides(["model.name=meanmil"])  # another model starts from its own defaults
    assert other.model.name == "meanmil" and not hasattr(other.model, "attn_dim")
    with pytest.raises(ConfigError, match=r"override 'lr': expected section.key .* \(did you mean 'optim.lr'\?\)"):
        cfg.with_overrides(["lr=1"])
    with pytest.raises(ConfigError, match="expected section.key=value"):
        cfg.with_overrides(["optim.lr"])
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg  # the saved form reads back to the same config


def test_cli_overrides_land_in_the_saved_config(tmp_path, capsys):
    store = synthesize_store(SynthConfig(n_slides=12, dim=8, median_instances=40, min_instances=16, seed=2),
                             tmp_path / "store", progress=False)
    assert main(["train", "--store", str(store.path), "--out", str(tmp_path / "run"), "--epochs", "1", "-q",
                 "optim.lr=1e-4", "model.embed_dim=8", "model.attn_dim=4", "data.test_fraction=0.0"]) == 0
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["optim"]["lr"] == 1e-4 and saved["optim"]["epochs"] == 1 and saved["model"]["embed_dim"] == 8
    assert main(["train", "--store", str(store.path), "--out", str(tmp_path / "r2"), "-q", "optim.lrr=1"]) == 2
    assert "did you mean 'lr'" in capsys.readouterr().err
    assert main(["train", "--store", str(store.path), "--out", str(tmp_path / "r3"), "--method", "abmil", "-q"]) == 2
    assert "is a model, not a training method: use --model abmil" in capsys.readouterr().err


def test_override_order_does_not_matter_for_a_new_model_name():
    cfg = TrainConfig().with_overrides(["model.embed_dim=64", "model.name=meanmil"])
    assert cfg.model.name == "meanmil" and cfg.model.embed_dim == 64


def test_cli_resume_continues_with_the_runs_own_config(tmp_path):
    store = synthesize_store(SynthConfig(n_slides=12, dim=8, median_instances=40, min_instances=16, seed=2),
                             tmp_path / "store", progress=False)
    run = str(tmp_path / "run")
    common = ["train", "--store", str(store.path), "--out", run, "-q"]
    assert main([*common, "--epochs", "1", "model.embed_dim=8", "model.attn_dim=4", "data.test_fraction=0.0",
                 "optim.lr=3e-3"]) == 0
    assert main([*common, "--resume", "--epochs", "2"]) == 0  # no config given: the run's own, plus --epochs
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["model"]["embed_dim"] == 8 and saved["optim"]["lr"] == 3e-3 and saved["optim"]["epochs"] == 2
    history = yaml.safe_load((tmp_path / "run" / "history.json").read_text())
    assert [r["epoch"] for r in history] == [0, 1]


def test_cli_imports_a_module_that_registers_a_method(tmp_path, monkeypatch, capsys):
    (tmp_path / "my_lab_methods.py").write_text(
        "from dataclasses import dataclass\n"
        "from fastmil.methods import PlainMIL, register_method\n"
        "@register_method('plain-copy')\n"
        "class PlainCopy(PlainMIL):\n"
        "    @dataclass\n"
        "    class Config:\n"
        "        name: str = 'plain-copy'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    store = synthesize_store(SynthConfig(n_slides=12, dim=8, median_instances=40, min_instances=16, seed=2),
                             tmp_path / "store", progress=False)
    args = ["train", "--store", str(store.path), "--out", str(tmp_path / "run"), "-q", "--epochs", "1",
            "--method", "plain-copy", "model.embed_dim=8", "model.attn_dim=4", "data.test_fraction=0.0"]
    assert main(args) == 2 and "unknown method 'plain-copy'" in capsys.readouterr().err
    assert main(["train", "--import", "my_lab_methods", *args[1:]]) == 0
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["method"]["name"] == "plain-copy"
    assert main(["train", "--import", "no_such_module_xyz", *args[1:]]) == 2
    assert "--import no_such_module_xyz" in capsys.readouterr().err


@pytest.mark.parametrize("text, error", [
    ("optim: {lr: [1e-4\n", "not valid YAML"),  # truncated
    ("- optim\n- run\n", "must be a mapping of key: value, got list"),
])
def test_broken_yaml_files_name_the_file(tmp_path, text, error):
    """A truncated or non-mapping YAML file is a ConfigError naming the file: a training config, a run folder's
    config.yaml and a sweep config (all read by one helper)."""
    from fastmil.train.run_folder import RunFolder
    from ray_jobs.space import load_spec

    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=error) as info:
        load_config(path)
    assert str(path) in str(info.value)
    run = RunFolder(tmp_path / "run")
    (tmp_path / "run").mkdir(exist_ok=True)
    (tmp_path / "run" / "config.yaml").write_text(text)
    with pytest.raises(ConfigError, match=error):
        run.read_config()
    with pytest.raises(ConfigError, match=error):
        load_spec(path, store="s", out="o")


BOMB = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, "
    f"*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n"
    for i in range(8))  # 10^9 values once expanded, 700 bytes on disk


@pytest.mark.parametrize("where", ["model: {name: *i}", "optim: {lr: *i}", "run: {seed: *i}"])
def test_a_yaml_alias_bomb_is_refused_at_once_with_a_short_message(tmp_path, where):
    """An alias bomb in ``model.name`` used to run until killed (the name was formatted into an error)."""
    import time

    path = tmp_path / "bomb.yaml"
    path.write_text(BOMB + where + "\n")
    start = time.monotonic()
    with pytest.raises(ConfigError, match="aliases expand to") as info:
        load_config(path)
    assert time.monotonic() - start < 5 and len(str(info.value)) < 400


def test_a_structured_model_name_and_huge_values_give_short_errors():
    with pytest.raises(ConfigError, match="model.name: must be a string, got a list") as info:
        TrainConfig.from_dict(model={"name": [["x"] * 10_000] * 100})
    assert len(str(info.value)) < 400
    with pytest.raises(ConfigError, match="optim.lr: expected a number") as info:
        TrainConfig.from_dict(optim={"lr": "9" * 1_000_000 + "x"})
    assert len(str(info.value)) < 400


@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan", "1e400"])
def test_non_finite_config_numbers_are_refused(value):
    """``lr: .inf`` used to train to NaN and fail later inside scikit-learn."""
    import yaml as pyyaml

    with pytest.raises(ConfigError, match="optim.lr: must be a finite number"):
        TrainConfig.from_dict(optim={"lr": pyyaml.safe_load(value)})


def test_an_oversized_config_file_is_refused_unread(tmp_path):
    path = tmp_path / "big.yaml"
    path.write_text("run: {seed: 1}\n" + "#" * (2 << 20))
    with pytest.raises(ConfigError, match="bytes"):
        load_config(path)
