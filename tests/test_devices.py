"""Device profiles: every shipped profile validates, cites its numbers, and bad profiles are refused
with the file, the field and what was expected."""

import copy

import pytest
import yaml

from perfsim.device import builtin_devices, device_from_data, get_device
from perfsim.errors import UserError

A16 = builtin_devices()["a16"]


def a16_data():
    with open(A16.path) as f:
        return yaml.safe_load(f)


def test_required_profiles_ship_with_the_package():
    required = {"a16", "m2", "ryzen-7840u", "i7-1360p", "a100-80gb-sxm", "h100-sxm", "l4", "t4"}
    assert required <= set(builtin_devices())


def test_profile_names_match_their_files():
    for name, device in builtin_devices().items():
        assert device.name == name, device.path


def test_spec_values_from_datasheets():
    # shared/DATA.md: A16 LPDDR5-6400 x 64 bit; A100 80GB 2,039 GB/s; H100 SXM 3,350 GB/s; T4 INT8 130 TOPS.
    devices = builtin_devices()
    assert devices["a16"].peak_bandwidth_gb_s == 51.2
    assert devices["a100-80gb-sxm"].peak_bandwidth_gb_s == 2039
    assert devices["h100-sxm"].peak_bandwidth_gb_s == 3350
    assert devices["t4"].unit().peak_tflops["int8"] == 130


def test_a16_has_cpu_gpu_and_npu_with_a_default():
    assert set(A16.units) == {"cpu", "gpu", "npu"}
    assert A16.default_unit == "gpu"
    assert A16.unit().type == "gpu"
    assert A16.unit("cpu").cores == 2


def test_a16_carries_the_phi3_reference():
    (ref,) = A16.references
    assert (ref.model, ref.decode_tokens_per_s, ref.relation) == ("phi-3-mini", 12, ">")
    assert "2404.14219" in ref.source


def test_unknown_unit_names_the_units():
    with pytest.raises(UserError, match="its units: gpu, cpu, npu"):
        A16.unit("tpu")


def test_unknown_device_lists_known_ones():
    with pytest.raises(UserError, match="known devices: .*a16"):
        get_device("pixel-9")


def test_an_uncited_number_is_refused():
    data = a16_data()
    del data["sources"]["units.gpu.overhead_us_per_op"]
    with pytest.raises(UserError, match="no source for units.gpu.overhead_us_per_op"):
        device_from_data(data, "x.yaml")


def test_a_prefix_source_cites_the_fields_under_it():
    data = a16_data()
    data["sources"] = {k: v for k, v in data["sources"].items() if not k.startswith("units.gpu.")} | {"units.gpu": "all of it"}
    assert device_from_data(data, "x.yaml").unit("gpu").peak_tflops["f32"] == 1.79


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d["memory"].pop("peak_bandwidth_gb_s"), "x.yaml: memory.peak_bandwidth_gb_s: missing"),
        (lambda d: d["memory"].update(peak_bandwidth_gb_s=-5), "memory.peak_bandwidth_gb_s: expected a number > 0, got -5"),
        (lambda d: d["memory"].update(peak_bandwidth_gb_s=0), "memory.peak_bandwidth_gb_s: expected a number > 0, got 0"),
        (lambda d: d["memory"].update(peak_bandwidth_gb_s="fast"), "memory.peak_bandwidth_gb_s: expected a number, got a string 'fast'"),
        (lambda d: d["units"]["gpu"].update(bandwidth_efficiency=1.5), "units.gpu.bandwidth_efficiency: expected a number <= 1"),
        (lambda d: d["units"]["gpu"].update(turbo=True), "units.gpu.turbo: unknown key"),
        (lambda d: d.update(colour="blue"), "x.yaml: colour: unknown key"),
        (lambda d: d.update(default_unit="tpu"), "default_unit: expected one of gpu, cpu, npu"),
        (lambda d: d["units"]["cpu"].update(cores=2.5), "units.cpu.cores: expected a whole number"),
        (lambda d: d["references"][0].update(weights="q3_k"), "references[0].weights: unknown format"),
        (lambda d: d["memory"].update(usable_gb=8), "memory.usable_gb: expected a number <= 6"),
    ],
)
def test_bad_profiles_name_file_field_and_expectation(edit, message):
    data = copy.deepcopy(a16_data())
    edit(data)
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace("[", r"\[")):
        device_from_data(data, "x.yaml")
