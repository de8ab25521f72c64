import re

import pytest

from fedtower.simulations.presets import PRESETS_DIR, list_presets, load_preset, parse_overrides

KEBAB_CASE = re.compile(r"[a-z0-9]+(-[a-z0-9]+)*")


def test_the_seven_presets_are_shipped():
    names = list_presets()

    assert names == ["movielens-cross-device", "movielens-sites", "synthetic-cross-device", "synthetic-cross-device-dp",
                     "synthetic-sites",
                     "synthetic-sites-dp", "synthetic-sites-gpu"]


@pytest.mark.parametrize("name", list_presets())
def test_every_preset_is_flat_kebab_case_scalars_with_a_header_comment(name):
    preset = load_preset(name)

    assert preset["partitioning"] in ("sites", "users")
    assert isinstance(preset["data"], str)
    assert all(KEBAB_CASE.fullmatch(key) for key in preset)
    assert all(type(value) in (str, int, float, bool) for value in preset.values())
    assert (PRESETS_DIR / f"{name}.toml").read_text().startswith("# ")


def test_synthetic_sites_preset_holds_the_agreed_values():
    preset = load_preset("synthetic-sites")

    assert preset == {
        "data": "synthetic:users=1000,items=2000,seed=0",
        "partitioning": "sites",
        "num-sites": 10,
        "size-skew": 0.5,
        "taste-skew": 0.5,
        "num-server-rounds": 10,
        "local-epochs": 2,
        "fraction-train": 1.0,
        "strategy": "fedavg",
        "eval-every": 2,
    }
    assert isinstance(preset["fraction-train"], float)


def test_gpu_preset_is_synthetic_sites_plus_client_resources():
    gpu = load_preset("synthetic-sites-gpu")

    extra = {key: value for key, value in gpu.items() if key not in load_preset("synthetic-sites")}

    assert extra == {"client-num-gpus": 0.25, "client-num-cpus": 1}
    assert {key: gpu[key] for key in load_preset("synthetic-sites")} == load_preset("synthetic-sites")


def test_the_cross_device_presets_share_one_recipe_and_movielens_sites_holds_its_values():
    # The recipe the cross-device benchmarks measured (docs/benchmarks.md, "Cross-device").
    recipe = {"partitioning": "users", "fraction-train": 0.1, "local-epochs": 1, "local-optimizer": "sgd",
              "lr": 0.5, "reconstruction-epochs": 2, "reconstruction-lr": 0.006, "strategy": "fedadam",
              "server-beta-2": 0.999, "server-tau": 1e-8, "keep-item-moments": False}  # fmt: skip
    synthetic, movielens_users = load_preset("synthetic-cross-device"), load_preset("movielens-cross-device")
    movielens = load_preset("movielens-sites")

    for preset in (synthetic, movielens_users):
        assert {key: preset[key] for key in recipe} == recipe
    assert synthetic["data"] == "synthetic:users=20000,items=2000,seed=0" and synthetic["num-server-rounds"] == 20
    assert movielens_users["num-server-rounds"] == 80 and movielens_users["server-lr"] == 0.015
    assert movielens["data"] == "../shared/data/ml-latest-small"
    assert (movielens["size-skew"], movielens["taste-skew"]) == (0.0, 0.0)
    assert (movielens["num-server-rounds"], movielens["local-epochs"], movielens["lr"]) == (40, 4, 0.006)


def test_a_preset_loads_from_a_path(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text('# my run\nnum-server-rounds = 3\ndata = "synthetic"\n')

    preset = load_preset(path)

    assert preset == {"num-server-rounds": 3, "data": "synthetic"}
    assert load_preset(str(path)) == preset


def test_an_unknown_preset_name_lists_the_available_ones():
    with pytest.raises(ValueError, match=r"no preset named 'sites'.*'synthetic-sites'"):
        load_preset("sites")


def test_a_preset_file_with_a_table_is_refused_naming_the_key(tmp_path):
    path = tmp_path / "nested.toml"
    path.write_text("rounds = 3\n[strategy]\nname = 'fedavg'\n")

    with pytest.raises(ValueError, match="key 'strategy' holds a dict"):
        load_preset(path)


def test_a_missing_preset_file_is_named(tmp_path):
    with pytest.raises(ValueError, match="Cannot read the preset file .*absent.toml"):
        load_preset(tmp_path / "absent.toml")


def test_overrides_parse_ints_text_booleans_and_floats():
    overrides = parse_overrides("key1=1 key2='text' key3=true key4=0.5")

    assert overrides == {"key1": 1, "key2": "text", "key3": True, "key4": 0.5}
    assert [type(value) for value in overrides.values()] == [int, str, bool, float]


def test_overrides_keep_spaces_and_equals_signs_inside_quotes():
    overrides = parse_overrides(
        """  data="synthetic:users=50,seed=1"   title='two words'  path="C:\\\\data" secure=false """
    )

    assert overrides == {
        "data": "synthetic:users=50,seed=1",
        "title": "two words",
        "path": "C:\\data",
        "secure": False,
    }


def test_empty_overrides_are_an_empty_config():
    assert parse_overrides("   ") == {}


def test_overrides_load_from_a_toml_file(tmp_path):
    path = tmp_path / "overrides.toml"
    path.write_text("num-sites = 4\nsize-skew = 1.5\n")

    overrides = parse_overrides(f" {path} ")

    assert overrides == {"num-sites": 4, "size-skew": 1.5}


@pytest.mark.parametrize(
    "text, message",
    [
        ("num-sites=10 oops", "override 'oops' is not of the form key=value"),
        ("=3", "override '=3' is not of the form"),
        ("name='unterminated", 'override "name=\'unterminated" is not of the form'),
        ("data=synthetic:users=5", "'data=synthetic:users=5' has a value that is not a TOML value"),
        ("secure=tru", "'secure=tru' has a value that is not a TOML value"),
        ("sites=[1,2]", "'sites=\\[1,2\\]' is a list"),
        ("num-sites=1 num-sites=2", "'num-sites' is given more than once"),
    ],
)
def test_bad_overrides_are_refused_naming_the_bad_token(text, message):
    with pytest.raises(ValueError, match=message):
        parse_overrides(text)


def test_every_shipped_preset_lists_with_a_one_sentence_description_and_dp_presets_are_among_them():
    from typer.testing import CliRunner

    from fedtower.cli import app
    from fedtower.simulations.presets import describe_preset, list_presets

    # Execute
    listed = CliRunner().invoke(app, ["simulate", "--list-presets"])
    # Assert
    assert listed.exit_code == 0
    for name in list_presets():
        description = describe_preset(name)
        assert description.endswith(".") and len(description) > 20, name
        assert f"{name}  " in listed.output and description in listed.output
    assert {"synthetic-sites-dp", "synthetic-cross-device-dp"} <= set(list_presets())


def test_show_prints_the_settings_a_run_would_use():
    from typer.testing import CliRunner

    from fedtower.cli import app

    shown = CliRunner().invoke(app, ["simulate", "--preset", "synthetic-sites", "--show", "--run-config",
                                     "num-server-rounds=3"])  # fmt: skip
    assert shown.exit_code == 0
    assert "num-server-rounds = 3" in shown.output and 'partitioning = "sites"' in shown.output
    assert "Simulating" not in shown.output
