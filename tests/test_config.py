"""Config loading: YAML + dotted overrides, validated with errors that name the key."""

import pytest

from medformer.config import RunConfig, apply_overrides, load_config, parse_override
from medformer.errors import ConfigError


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("seed: 3\ntrain:\n  batch_size: 16\ndata:\n  - path: a.npz\n")
    cfg = load_config(
        RunConfig, path, ["train.batch_size=64", "preprocess.spacing=[1, 1, 2]", "data.0.size=64"]
    )
    assert cfg.seed == 3
    assert cfg.train.batch_size == 64
    assert cfg.preprocess.spacing == [1.0, 1.0, 2.0]
    assert cfg.data[0].size == 64 and cfg.data[0].path == "a.npz"


def test_scientific_notation_override_is_a_number():
    assert parse_override("optim.lr=3e-4") == (["optim", "lr"], pytest.approx(3e-4))


def test_flag_defaults_fill_keys_but_overrides_win(tmp_path):
    cfg = load_config(RunConfig, None, ["seed=7"], seed=5, device="cpu")
    assert cfg.seed == 7 and cfg.device == "cpu"


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("train.batch_sze=3", "'train.batch_size'"),
        ("preprocess.spacng=[1,1,1]", "'preprocess.spacing'"),
        ("seeed=1", "'seed'"),
        ("data.0.sze=64", "'data.0.size'"),
    ],
)
def test_unknown_key_names_closest(override, expected):
    overrides = ["data=[{path: x}]", override] if override.startswith("data") else [override]
    with pytest.raises(ConfigError) as e:
        load_config(RunConfig, None, overrides)
    assert "unknown key" in str(e.value) and f"did you mean {expected}" in str(e.value)


def test_wrong_type_names_key_and_type():
    with pytest.raises(ConfigError) as e:
        load_config(RunConfig, None, ["train.batch_size=lots"])
    msg = str(e.value)
    assert "train.batch_size" in msg and "int" in msg and "lots" in msg


def test_bad_yaml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(RunConfig, tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("seed: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(RunConfig, bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(RunConfig, listy)


def test_override_syntax_errors():
    with pytest.raises(ConfigError, match=r"key\.path=value"):
        apply_overrides({}, ["seed"])
    with pytest.raises(ConfigError, match="not an index"):
        apply_overrides({"data": [{"path": "a"}]}, ["data.3.path=b"])
