"""[network] is the options model of the method its type names: an option of another method
is refused by name (its owners and the fix, every problem in one line), full dumps of the
old single model still load, presets load, and dump_config writes the method's options only."""
from __future__ import annotations

import logging
import tomllib
import typing

import pytest
import tomli_w

from studio import PRESETS_DIR
from studio.adapters.methods import METHODS, NetworkOptions
from studio.config import OPTION_OWNERS, TrainConfig, dump_config, load_config, network_config, parse_config
from studio.errors import StudioError

# [network] of a run folder's config.toml as LoRA Studio wrote it before the options were per
# method (dump_config at fc51234 for network.type "lokr": every field but those at None).
OLD_FULL_DUMP = """
type = "lokr"
rank = 8
alpha = 8.0
dropout = 0.0
target_modules = ["to_q", "to_k", "to_v", "to_out.0"]
conv_target_modules = ["conv1", "conv2", "conv_shortcut", "time_emb_proj", "downsamplers.0.conv", "upsamplers.0.conv"]
use_dora = false
use_rslora = false
init = "default"
lokr_factor = -1
tlora_min_rank = 4
tlora_exponent = 1.0
tlora_ortho = true
tlora_conv = false
singlora_ramp_steps = 100
rank_allocation = "none"
sensitivity_batches = 4
squeeze_at_step = 100
squeeze_anneal_steps = 0
ard_l1 = 0.001
ard_tv = 0.001
ard_threshold = 0.1
ard_prune_every = 0
ard_lr_ratio = 10.0
adalora_orth_reg = 0.1
train_text_encoder = false
pivotal_vectors = 0
pivotal_init = ""
text_encoder_target_modules = ["q_proj", "k_proj", "v_proj", "out_proj"]
"""
# What the first versions with LoCon, LoHa, LoKr and T-LoRA wrote (before block ranks, SingLoRA,
# rank allocation, squeeze, ARD, AdaLoRA and pivotal tuning).
OLDEST_FULL_DUMP_KEYS = ("type", "rank", "alpha", "dropout", "target_modules", "conv_target_modules", "use_dora",
                         "use_rslora", "init", "lokr_factor", "tlora_min_rank", "tlora_exponent", "tlora_ortho",
                         "train_text_encoder", "text_encoder_target_modules")

# Configs of the issue that trained and ignored another method's option, and more.
CROSS_METHOD = [
    ("lora", "singlora_ramp_steps", 50), ("lora", "tlora_min_rank", 2), ("lokr", "conv_rank", 4),
    ("lokr", "ard_l1", 0.1), ("vera", "lokr_factor", 4), ("loha", "adalora_init_r", 12), ("tlora", "lokr_factor", 4),
    ("lora_fa", "singlora_ramp_steps", 50), ("vera", "use_dora", True), ("singlora", "block_rank_up", 4),
    ("adalora", "rank_allocation", "ard"), ("tlora", "block_rank_mid", 4), ("locon", "adalora_tinit", 3),
]


def _owners_text(option: str) -> str:
    owners = OPTION_OWNERS[option]
    return owners[0] if len(owners) == 1 else f"{', '.join(owners[:-1])} and {owners[-1]}"


def _old_config(tmp_path, network: dict):
    """A config.toml with today's other sections and `network` as [network], loaded."""
    data = tomllib.loads(dump_config(TrainConfig()))
    data["network"] = network
    path = tmp_path / "config.toml"
    path.write_text(tomli_w.dumps(data))
    return load_config(path)


@pytest.mark.parametrize("method", list(METHODS))
def test_an_old_full_dump_loads_as_its_methods_options(method, tmp_path, caplog):
    old = {**tomllib.loads(OLD_FULL_DUMP), "type": method, "rank": 6}
    with caplog.at_level(logging.WARNING, logger="studio.config"):
        config = _old_config(tmp_path, old)
    assert not caplog.records  # every other method's option held its default
    assert type(config.network) is METHODS[method].options and config.network.rank == 6
    written = tomllib.loads(dump_config(config))["network"]
    assert written.keys() <= METHODS[method].options.model_fields.keys()
    assert {key: old[key] for key in written if key in old} == {key: written[key] for key in written if key in old}
    # the same table less one mark of a full dump is a person's config: other methods' options refused
    foreign = sorted(key for key in old if key not in METHODS[method].options.model_fields)
    assert foreign
    del old["tlora_ortho" if method != "tlora" else "use_dora"]
    with pytest.raises(StudioError, match=rf"network\.{foreign[0]}: an option of .*, not of {method}"):
        _old_config(tmp_path, old)


@pytest.mark.parametrize("method", ["lora", "lokr", "tlora"])
def test_the_oldest_full_dumps_load_too(method, tmp_path):
    old = {key: value for key, value in tomllib.loads(OLD_FULL_DUMP).items() if key in OLDEST_FULL_DUMP_KEYS}
    config = _old_config(tmp_path, {**old, "type": method})
    assert config.network.type == method


def test_an_old_dumps_unused_option_with_a_value_is_dropped_with_a_warning(tmp_path, caplog):
    old = {**tomllib.loads(OLD_FULL_DUMP), "type": "lora", "tlora_min_rank": 2, "lokr_factor": 4, "use_dora": True}
    with caplog.at_level(logging.WARNING, logger="studio.config"):
        config = _old_config(tmp_path, old)
    assert config.network.use_dora and not hasattr(config.network, "tlora_min_rank")
    [record] = caplog.records
    assert "lokr_factor = 4, tlora_min_rank = 2, which a lora network does not use, dropped" in record.getMessage()


@pytest.mark.parametrize("method, option, value", CROSS_METHOD)
def test_another_methods_option_is_refused_by_name(method, option, value):
    with pytest.raises(StudioError) as error:
        parse_config({"network": {"type": method, option: value}})
    owners = OPTION_OWNERS[option]
    fix = f'set network.type = "{owners[0]}"' if len(owners) == 1 else "set network.type to one of them"
    assert str(error.value) == (f"config: network.{option}: an option of {_owners_text(option)}, not of {method}; "
                                f"{fix} or remove it. Fix the value and try again.")


def test_every_option_only_other_methods_take_is_refused_for_every_method():
    """The whole matrix, at each owner's default: a person's config giving another method's
    option is refused even when the value changes nothing."""
    checked = 0
    for method, taken in ((name, m.options.model_fields) for name, m in METHODS.items()):
        for option, owners in OPTION_OWNERS.items():
            if option in taken:
                continue
            default = METHODS[owners[0]].options.model_fields[option].get_default(call_default_factory=True)
            with pytest.raises(StudioError, match=rf"network\.{option}: an option of {_owners_text(option)}, "
                                                  rf"not of {method}; set network\.type"):
                parse_config({"network": {"type": method, option: default}})
            checked += 1
    assert checked > 100


def test_all_problems_at_once_and_unknown_keys_keep_pydantics_words():
    with pytest.raises(StudioError) as error:
        parse_config({"network": {"type": "vera", "rank": 0, "lokr_factor": 4, "lokr_factr": 4},
                      "training": {"max_steps": 0}})
    message = str(error.value)
    assert "\n" not in message and message.startswith("config: ") and "Fix these 4 values" in message
    assert "network.rank: Input should be greater than or equal to 1" in message
    assert 'network.lokr_factor: an option of lokr, not of vera; set network.type = "lokr" or remove it' in message
    assert "network.lokr_factr: Extra inputs are not permitted" in message
    assert "training.max_steps: " in message
    for network in ({"type": "lorax"}, {"type": ["lora"]}, {"type": {"a": 1}}, {"type": None}):
        with pytest.raises(StudioError, match=r"network\.type: Input should be 'lora', 'locon', .* or 'adalora'\."):
            parse_config({"network": network})
    with pytest.raises(StudioError, match=r"network: Input should be a table of network options \(type = 'lora'"):
        parse_config({"network": "lora"})


def test_each_methods_options_are_its_own_model_and_network_is_their_union():
    """Derived from METHODS: each method's options model has type Literal[its name]; the
    [network] union holds exactly those; an option several methods take is defined once."""
    members = typing.get_args(TrainConfig.model_fields["network"].annotation)
    assert [typing.get_args(m)[0] for m in members] == [m.options for m in METHODS.values()]
    for name, method in METHODS.items():
        assert issubclass(method.options, NetworkOptions) and method.name == name
        assert typing.get_args(method.options.model_fields["type"].annotation) == (name,)
        assert type(network_config(name)) is method.options
    for option, owners in ((o, owners) for o, owners in OPTION_OWNERS.items() if o != "type"):
        fields = [METHODS[owner].options.model_fields[option] for owner in owners]
        assert len({(f.description, repr(f.get_default(call_default_factory=True)), str(f.annotation))
                    for f in fields}) == 1, option
    assert type(TrainConfig().network) is METHODS["lora"].options
    assert parse_config({"network": {"rank": 4}}).network.type == "lora"  # no type: LoRA


def test_presets_and_the_default_config_load_and_dumps_round_trip():
    for path in sorted(PRESETS_DIR.glob("*.toml")):
        load_config(path)
    for name, method in METHODS.items():
        config = TrainConfig(network={"type": name})
        written = tomllib.loads(dump_config(config))
        assert written["network"]["type"] == name
        assert written["network"].keys() <= method.options.model_fields.keys()
        assert parse_config(written) == config


def test_network_config_keeps_the_options_both_methods_take():
    locon = network_config("locon", rank=4, use_rslora=True, conv_rank=2, train_text_encoder=True)
    lora_fa = network_config("lora_fa", like=locon)
    assert (lora_fa.rank, lora_fa.use_rslora, lora_fa.train_text_encoder) == (4, True, True)
    assert network_config(like=lora_fa, rank=8).type == "lora_fa"
    tlora = network_config("tlora", like=network_config("locon", conv_target_modules=["conv1"]))
    assert tlora.conv_target_modules == ["conv1"]
