"""cpu_model_name on real /proc/cpuinfo layouts: the generic names of virtual machines."""

from __future__ import annotations

import pytest

from engines.hardware import cpu_model_name

_CPUINFO = ("processor\t: 0\nvendor_id\t: {vendor}\ncpu family\t: {family}\nmodel\t\t: {model}\n"
            "model name\t: {name}\n")


@pytest.mark.parametrize("vendor, family, model, name, expected", [
    ("AuthenticAMD", 25, 17, "AMD EPYC", "AMD EPYC (family 25, model 17)"),  # Zen 4 behind a generic name
    ("AuthenticAMD", 26, 2, "AMD EPYC", "AMD EPYC (family 26, model 2)"),  # Zen 5, the same name
    ("GenuineIntel", 6, 143, "Intel(R) Xeon(R) Platinum 8488C", "Intel(R) Xeon(R) Platinum 8488C"),
])
def test_a_generic_name_gets_its_family_and_model(vendor, family, model, name, expected):
    text = _CPUINFO.format(vendor=vendor, family=family, model=model, name=name) * 2  # two processors
    assert cpu_model_name(text) == expected


def test_this_machine_has_a_name():
    assert cpu_model_name().strip()
