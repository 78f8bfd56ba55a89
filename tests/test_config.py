import pytest

from cmafnet.config import list_configs, load_config
from cmafnet.errors import ConfigError
from cmafnet.registry import Registry


def test_every_shipped_config_validates():
    names = list_configs()
    assert {"paper", "smoke"} <= set(names)
    for name in names:
        load_config(name)


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("model.fusion.heds=3", "model.fusion.heds: unknown key. Did you mean 'heads'?"),
        ("model.fusion.heads=7", "heads (7) must divide dim"),
        ("train.batch_size=abc", "train.batch_size"),
        ("modle.x=1", "Did you mean 'model'?"),
        ("train.stages.0.lr=-1", "train.stages.0.lr"),
        ("model.fusion.tau_init.kind=gamma", "model.fusion.tau_init.kind"),
        ("data.imbalance=9010", "data.imbalance"),
    ],
)
def test_bad_values_name_the_key(override, expected):
    with pytest.raises(ConfigError, match=None) as err:
        load_config("smoke", [override])
    assert expected in str(err.value)


def test_overrides_reach_list_items_and_defaults():
    assert load_config("smoke", ["train.stages.2.lr=0.5"]).train.stages[2].lr == 0.5
    assert load_config(None, ["train.stages.1.epochs=3"]).train.stages[1].epochs == 3
    assert load_config(None, ["data.imbalance=90:10"]).data.imbalance == "90:10"


def test_registry_refuses_duplicates_and_suggests():
    reg: Registry[int] = Registry("thing")
    reg.add("alpha", 1)
    with pytest.raises(ValueError, match="already registered"):
        reg.add("alpha", 2)
    with pytest.raises(ConfigError, match="Did you mean 'alpha'"):
        reg.get("alpah")
