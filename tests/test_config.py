"""Run-config validation: every bad input fails before compute, naming the problem and the fix."""
import re

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
    ("num-rounds", "three", "expected an int"),
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


@pytest.mark.parametrize("key,value,message", [
    ("num-rounds", 2.5, "expected an int"),
    ("max-train-examples", -5, "max-train-examples must be >= 0"),
    ("dev-examples", -1, "dev-examples must be >= 0"),
    ("holdout-examples", -1, "holdout-examples must be >= 0"),
    ("method", "far0", "method 'far0'"),
    ("method", "far150", "method 'far150'"),
    ("aggregator", "mode", "aggregator 'mode'.*median"),
    ("trim-share", 0.5, "trim-share"),
    ("round-timeout-s", -1.0, "round-timeout-s"),
    ("faults", "/nonexistent/faults.toml", "faults file .*no such file"),
])
def test_bad_counts_methods_and_robustness_keys_are_rejected(key, value, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        RunConfig.from_flower({key: value})


@pytest.mark.parametrize("settings,message", [
    ({"reprime-every": -1}, "reprime-every must be >= 0"),
    ({"reprime-every": 2, "method": "full"}, "reprime-every = 2 refreshes a global FAR mask.*method 'full'"),
    ({"reprime-every": 2, "method": "random10-emb"}, "set method to far<N>"),
    ({"reprime-every": 2, "mask-mode": "local"}, "mask-mode 'local'"),
])
def test_a_mask_refresh_needs_a_global_far_mask(settings, message):
    with pytest.raises(ValueError, match=message):
        RunConfig.from_flower(settings)
    assert RunConfig.from_flower({"reprime-every": 2}).label == "far10-emb-global-reprime2-float32"


@pytest.mark.parametrize("text,message", [
    ('[[fault]]\npartition = 0\nkind = "explode"\n', "kind 'explode'.*scale:<factor>"),
    ('[[fault]]\npartition = -1\nkind = "nan"\n', "partition must be"),
    ('[[fault]]\npartition = 0\nrounds = [0]\nkind = "nan"\n', "rounds must be"),
    ('[[fault]]\npartition = 0\nkind = "scale:x"\n', "finite factor"),
    ('[[fault]]\npartition = 0\nkind = "nan"\nwhen = 1\n', "unknown key"),
    ('[[fault]]\npartition = 0\nkind = "hang"\n', "round-timeout-s"),
    ('[[fault]\n', "not valid TOML"),
])
def test_a_faults_file_is_validated_up_front_naming_the_file_and_entry(tmp_path, text, message):
    path = tmp_path / "faults.toml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message) as err:
        RunConfig.from_flower({"faults": str(path)})
    assert str(path) in str(err.value)


def test_a_faults_file_reads_into_faults_by_partition_and_round(tmp_path):
    path = tmp_path / "faults.toml"
    path.write_text('[[fault]]\npartition = 1\nrounds = [2]\nkind = "scale:1000"\n'
                    '[[fault]]\npartition = 2\nkind = "hang"\n')
    cfg = RunConfig.from_flower({"faults": str(path), "round-timeout-s": 30.0})
    assert cfg.fault(1, 2).kind == "scale" and cfg.fault(1, 2).factor == 1000.0 and cfg.fault(1, 2).label == "scale:1000"
    assert cfg.fault(1, 1) is None and cfg.fault(0, 2) is None
    assert cfg.fault(2, 1).kind == "hang" and cfg.fault(2, 7).kind == "hang"  # no rounds: every round


def _glue_copy(tmp_path, drop_column=False, missing_dev=False):
    """A classic GLUE folder with CoLA's real files (optionally broken)."""
    from fedfar.data import default_glue_dir

    src = default_glue_dir() / "CoLA"
    dst = tmp_path / "glue" / "CoLA"
    dst.mkdir(parents=True)
    for name in ("train.tsv", "dev.tsv"):
        if missing_dev and name == "dev.tsv":
            continue
        lines = (src / name).read_text().splitlines()[:50]
        if drop_column:  # CoLA has no header: keep 3 of its 4 columns
            lines = ["\t".join(line.split("\t")[:3]) for line in lines]
        (dst / name).write_text("\n".join(lines) + "\n")
    return tmp_path / "glue"


@pytest.mark.realdata
@pytest.mark.parametrize("broken,message", [
    ({"missing_dev": True}, "GLUE file not found"),
    ({"drop_column": True}, "expected 4 tab-separated fields"),
])
def test_fedfar_run_checks_the_data_before_starting_any_process(tmp_path, capsys, monkeypatch, broken, message):
    from fedfar.federation import launch

    monkeypatch.setattr(launch.subprocess, "Popen", lambda *a, **k: pytest.fail("a process was started"))
    data = _glue_copy(tmp_path, **broken)
    with pytest.raises(SystemExit) as exit_info:
        main(["run", "configs/tiny.toml", "--supernodes", "2", "--set", f"data={data}"])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_fedfar_run_names_a_missing_default_data_folder(tmp_path, capsys, monkeypatch):
    from fedfar.federation import launch

    monkeypatch.setattr(launch.subprocess, "Popen", lambda *a, **k: pytest.fail("a process was started"))
    monkeypatch.setenv("FEDFAR_GLUE_DIR", str(tmp_path / "no-glue-here"))
    with pytest.raises(SystemExit) as exit_info:
        main(["run", "configs/tiny.toml", "--supernodes", "2"])
    assert exit_info.value.code == 2
    assert "no-glue-here" in capsys.readouterr().err


def test_a_malformed_run_config_names_its_file(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text("num-rounds = = 3\n")
    with pytest.raises(SystemExit):
        main(["run", str(bad)])
    assert f"run config {bad}: not valid TOML" in capsys.readouterr().err


@pytest.mark.realdata
def test_finetune_never_overwrites_a_finished_run_and_writes_its_config_only_when_it_starts(tmp_path, capsys):
    out = tmp_path / "run"
    with pytest.raises(SystemExit):  # fails while loading data: nothing may be left behind
        main(["finetune", "--data", str(_glue_copy(tmp_path, missing_dev=True)), "--out", str(out)])
    assert not out.exists()
    out.mkdir()
    (out / "metrics.json").write_text("{}")
    (out / "config.json").write_text('{"mine": 1}')
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["finetune", "--model", "random:bert-tiny", "--out", str(out)])
    assert "holds a finished run" in capsys.readouterr().err
    assert (out / "config.json").read_text() == '{"mine": 1}'


def test_method_strings_build_their_method_and_bad_ones_name_what_is_wrong():
    from fedfar.methods import FAR, BitFit, Full, LoRA, RandomSelection, parse_method, policy_name

    assert parse_method("far10-emb") == FAR(retention=0.1, policy=policy_name("emb"))
    assert parse_method(" FAR40 ") == FAR(retention=0.4, policy=policy_name("paper"))
    assert parse_method("far40-paper") == parse_method("far40")
    assert parse_method("random25-attn") == RandomSelection(retention=0.25, policy=policy_name("attn"))
    assert parse_method("full-emb") == Full(policy=policy_name("emb")) != parse_method("full")
    assert parse_method("bitfit") == BitFit()
    assert parse_method("lora8") == LoRA(rank=8, targets="qv") and parse_method("lora4-all") == LoRA(4, "all")
    for text, message in [("far", "far needs its retention in percent, e.g. far10"),
                          ("random-emb", "random needs its retention in percent, e.g. random10"),
                          ("full10", "full takes no number: write full"),
                          ("bitfit2", "bitfit takes no number: write bitfit"),
                          ("bitfit-emb", "bitfit has its own freeze rule"),
                          ("lora", "lora needs its rank as a whole number"), ("lora2.5", "got '2.5'"),
                          ("adapter8", "cannot read method 'adapter8'")]:
        with pytest.raises(ValueError, match=re.escape(message)):
            parse_method(text)
