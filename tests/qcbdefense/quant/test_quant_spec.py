"""QuantSpec: presets say what the papers deploy, round-trip through every format, and refuse nonsense."""

from __future__ import annotations

import json

import pytest

from qcbdefense.errors import InputError
from qcbdefense.quant import SPECS, QuantSpec, get_spec

PRESETS = SPECS.names()


def test_presets_registered():
    assert {"w8a8", "w4a4", "w4a8", "w8a8-per-tensor", "quanti-w8a8", "quanti-w4a4", "pqbackdoor-w8a8",
            "pqbackdoor-w4a4"} <= set(PRESETS)


@pytest.mark.parametrize("name", PRESETS)
def test_preset_carries_its_name(name):
    spec = get_spec(name)
    assert spec.name == name
    assert get_spec(spec) is spec


@pytest.mark.parametrize("name", ["w8a8", "w4a4", "w4a8"])
def test_lac_presets(name):
    spec = get_spec(name)
    assert (spec.weight_bits, spec.act_bits) == (int(name[1]), int(name[3]))
    assert spec.weight_per_channel and not spec.weight_symmetric and spec.weight_scale == "mse"
    assert not spec.act_symmetric and spec.act_calibration == "percentile"
    assert (spec.first_layer_bits, spec.last_layer_bits) == (8, 8) and not spec.fold_bn


def test_per_tensor_presets():
    assert get_spec("w8a8-per-tensor") == get_spec("w8a8").replace(weight_per_channel=False)
    assert get_spec("pqbackdoor-w8a8-per-tensor") == get_spec("pqbackdoor-w8a8").replace(
        weight_per_channel=False, name="pqbackdoor-w8a8-per-tensor")


@pytest.mark.parametrize("bits", [8, 4])
def test_quanti_presets(bits):
    spec = get_spec(f"quanti-w{bits}a{bits}")
    assert (spec.weight_bits, spec.act_bits) == (bits, bits)
    assert not spec.weight_per_channel and spec.weight_symmetric and spec.weight_scale == "absmax"
    assert not spec.act_symmetric and spec.act_calibration == "minmax"
    assert spec.first_bits == spec.last_bits == bits


@pytest.mark.parametrize("bits", [8, 4])
def test_pqbackdoor_presets(bits):
    spec = get_spec(f"pqbackdoor-w{bits}a{bits}")
    assert spec.weight_per_channel and spec.weight_symmetric and spec.weight_scale == "absmax-half"
    assert not spec.weight_narrow_range  # PyTorch qint8: [-128, 127]
    assert spec.first_bits == spec.last_bits == bits


@pytest.mark.parametrize("bits", [8, 4])
def test_deploy_presets_are_what_integer_kernels_take(bits):
    spec = get_spec(f"w{bits}a8-deploy")
    assert spec.quantize_adds and spec.act_bits == 8 and not spec.act_symmetric  # uint8 activations everywhere
    assert spec.weight_symmetric and spec.weight_per_channel and spec.weight_narrow_range  # int8, zero point 0
    assert spec.weight_bits == min(bits, 7) and (spec.first_bits, spec.last_bits) == (7, 7)
    # no CPU saturates a u8 x s8 pair sum (VPMADDUBSW without VNNI: int16), so the file computes the same anywhere
    for weight_bits in (spec.weight_bits, spec.first_bits, spec.last_bits):
        assert 2 * (2 ** spec.act_bits - 1) * (2 ** (weight_bits - 1) - 1) <= 2 ** 15 - 1
    assert QuantSpec.from_yaml(spec.to_yaml()) == spec and "adds quantized" in spec.label
    assert spec != spec.replace(quantize_adds=False)
    with pytest.raises(InputError, match="quantize_adds"):
        spec.replace(act_bits=None)


def test_label():
    assert get_spec("w4a4").label == "W4A4 per-channel asym mse, act asym percentile, first/last W8/W8"
    assert get_spec("quanti-w8a8").label == "W8A8 per-tensor sym narrow absmax, act asym minmax"
    assert QuantSpec(act_bits=None, fold_bn=True).label.startswith("W8Af per-channel")


@pytest.mark.parametrize("name", PRESETS)
def test_round_trips(name, tmp_path):
    spec = get_spec(name)
    for restored in (QuantSpec.from_dict(spec.to_dict()), QuantSpec.from_json(spec.to_json()),
                     QuantSpec.from_yaml(spec.to_yaml()), get_spec(spec.save(tmp_path / "s.json")),
                     get_spec(spec.save(tmp_path / "s.yaml")), get_spec(str(tmp_path / "s.yaml"))):
        assert restored == spec and restored.name == name
        assert restored.to_dict() == spec.to_dict()
    assert json.loads(spec.to_json())["version"] == 1


def test_equality_ignores_name_and_replace_resets_it():
    custom = get_spec("w4a4").replace(weight_bits=4)
    assert custom == get_spec("w4a4") and custom.name == "custom"
    assert get_spec("w4a4").replace(name="mine").name == "mine"
    assert hash(custom) == hash(get_spec("w4a4"))


def test_partial_dict_takes_defaults():
    assert QuantSpec.from_dict({"weight_bits": 4}) == QuantSpec(weight_bits=4)


@pytest.mark.parametrize("data, match", [
    ({"weight_bitz": 4}, "unknown quant spec key"),
    ({"version": 2}, "version"),
    ({"weight_bits": 9}, "weight_bits"),
    ({"weight_bits": 1}, "weight_bits"),
    ({"weight_bits": 4.0}, "weight_bits"),
    ({"weight_bits": True}, "weight_bits"),
    ({"act_bits": 16}, "act_bits"),
    ({"first_layer_bits": 0}, "first_layer_bits"),
    ({"weight_scale": "max"}, "weight_scale"),
    ({"weight_scale": "absmax"}, "asymmetric"),           # absmax is a symmetric rule
    ({"weight_symmetric": True, "weight_scale": "minmax"}, "symmetric"),
    ({"act_calibration": "entropy"}, "act_calibration"),
    ({"weight_per_channel": "yes"}, "weight_per_channel"),
    ({"fold_bn": 1}, "fold_bn"),
    ({"name": ""}, "name"),
])
def test_nonsense_raises(data, match):
    with pytest.raises(InputError, match=match):
        QuantSpec.from_dict(data)


def test_bad_documents_raise():
    with pytest.raises(InputError, match="mapping"):
        QuantSpec.from_dict([1, 2])
    with pytest.raises(InputError, match="JSON"):
        QuantSpec.from_json("{not json")
    with pytest.raises(InputError, match="YAML"):
        QuantSpec.from_yaml("a: [1,")
    with pytest.raises(InputError, match="unknown QuantSpec field"):
        get_spec("w8a8").replace(bits=4)


def test_get_spec_unknown_name_lists_presets():
    with pytest.raises(InputError) as err:
        get_spec("w3a3")
    assert all(name in str(err.value) for name in PRESETS)


def test_get_spec_bad_paths_and_types(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        get_spec(tmp_path / "missing.json")
    with pytest.raises(InputError, match="must end in"):
        QuantSpec().save(tmp_path / "spec.txt")
    (tmp_path / "bad.yaml").write_text("weight_bits: 4\nextra: 1\n")
    with pytest.raises(InputError, match="extra"):
        get_spec(tmp_path / "bad.yaml")
    with pytest.raises(InputError, match="QuantSpec"):
        get_spec(8)
