"""Run-config validation: every bad input fails before compute, naming the problem and the fix."""
import pytest

from fedfar.cli import main
from fedfar.federation.config import RunConfig
from fedfar.federation.launch import app_config_defaults


def test_pyproject_defaults_are_exactly_the_run_config_fields():
    defaults = app_config_defaults()
    cfg = RunConfig.from_flower(defaults)
    assert cfg == RunConfig()  # the two places that hold defaults agree
    assert set(defaults) == set(RunConfig().as_dict())


@pytest.mark.parametrize("key,value,message", [
    ("methd", "far10", "unknown run-config key.*valid keys"),
    ("method", "lora", "far<retention"),
    ("task", "colaa", "Unknown GLUE task.*valid names"),
    ("codec", "int4", "codec 'int4'.*int8"),
    ("mask-mode", "random", "mask-mode 'random'"),
    ("partitioner", "pathological", "partitioner 'pathological'"),
    ("num-rounds", "three", "expected a int"),
    ("num-rounds", 0, "num-rounds must be at least 1"),
    ("data", "/nonexistent/glue", "does not exist"),
    ("federated-eval", "yes", "expected a bool"),
])
def test_bad_run_config_values_are_rejected_with_the_fix(key, value, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        RunConfig.from_flower({key: value})


def test_fedfar_run_validates_before_starting_anything(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["run", "configs/tiny.toml", "--set", "codec=int4"])
    assert exit_info.value.code == 2
    assert "codec 'int4'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["run", "configs/does-not-exist.toml"])
    assert "run config file not found" in capsys.readouterr().err


def test_finetune_rejects_bad_input_before_loading_anything(capsys, tmp_path):
    for argv, message in ([["--task", "colab"], "Unknown GLUE task"], [["--method", "far"], "far<retention"],
                          [["--data", str(tmp_path / "nope")], "does not exist"]):
        with pytest.raises(SystemExit):
            main(["finetune", *argv, "--out", str(tmp_path / "out")])
        assert message in capsys.readouterr().err
