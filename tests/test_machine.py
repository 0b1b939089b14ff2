"""The one machine identity (mgaudit.machine): the project's CPU kinds told apart by flags and
family/model (never by the name lscpu prints), and the keys that depend on it."""

from __future__ import annotations

import json
import re

import pytest
import torch

from mgaudit import machine


def _cpuinfo(vendor: str, family: int, model: int, name: str, flags: str) -> str:
    block = (f"processor\t: 0\nvendor_id\t: {vendor}\ncpu family\t: {family}\nmodel\t\t: {model}\n"
             f"model name\t: {name}\nflags\t\t: fpu sse2 {flags}\n")
    return block + "\n" + block.replace("processor\t: 0", "processor\t: 1")


#: The project's machines: name, /proc/cpuinfo, expected ISA label, expected describe() ISA text.
KINDS = {
    "intel-amx": (_cpuinfo("GenuineIntel", 6, 143, "Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz",
                           "avx2 fma avx512f avx512_bf16 amx_bf16 amx_tile amx_int8"),
                  "AMX", "AMX, AVX512-BF16"),
    "zen4": (_cpuinfo("AuthenticAMD", 25, 17, "AMD EPYC", "avx2 fma avx512f avx512_bf16 avx512_vnni"),
             "AVX512-BF16", "AVX512-BF16, no AMX"),
    "zen3": (_cpuinfo("AuthenticAMD", 25, 1, "AMD EPYC", "avx2 fma f16c"), "AVX2", "AVX2, no AVX512"),
    "zen5": (_cpuinfo("AuthenticAMD", 26, 2, "AMD EPYC", "avx2 fma avx512f avx512_bf16 avx512_vp2intersect"),
             "AVX512-BF16", "AVX512-BF16, no AMX"),
}


@pytest.mark.parametrize("kind", list(KINDS))
def test_each_cpu_kind_is_told_apart_by_flags_and_family(kind) -> None:
    text, isa, isa_text = KINDS[kind]
    ident = machine.cpu_identity(machine.parse_cpuinfo(text))
    assert ident["isa"] == isa
    assert "sse2" not in ident["isa_flags"] and "avx2" in ident["isa_flags"]  # only kernel-relevant flags
    line = machine.describe({**ident, "logical_cores": 2, "gpu": None})
    assert line == f"{ident['cpu_model_name']} (family {ident['cpu_family']}, model {ident['cpu_model']}): " \
                   f"{isa_text}, 2 cores"


def test_the_amd_kinds_share_a_name_but_not_an_identity() -> None:
    idents = {k: machine.cpu_identity(machine.parse_cpuinfo(KINDS[k][0])) for k in ("zen3", "zen4", "zen5")}
    assert {i["cpu_model_name"] for i in idents.values()} == {"AMD EPYC"}
    assert len({json.dumps(i, sort_keys=True) for i in idents.values()}) == 3
    assert idents["zen4"]["cpu_vendor"] == "AMD" and (idents["zen4"]["cpu_family"], idents["zen4"]["cpu_model"]) == (25, 17)


def test_this_machine_identity_is_json_and_one_line() -> None:
    ident = machine.identity()
    json.dumps(ident)
    assert ident["torch_threads"] == torch.get_num_threads() and ident["logical_cores"] >= 1
    assert ident["isa"] and isinstance(ident["isa_flags"], list)
    assert (ident["gpu"] is None) == (not torch.cuda.is_available())
    assert re.fullmatch(r".+: .+, \d+ cores(; GPU .+)?", machine.describe())


def test_the_probe_key_and_the_server_build_key_follow_the_isa(monkeypatch, tiny_lm) -> None:
    from mgaudit.decoding.invariance import fingerprint
    from mgaudit.endpoint.llama_server import build_key

    keys = {}
    for kind in ("zen3", "zen4", "intel-amx"):
        monkeypatch.setattr(machine, "_cpuinfo", lambda kind=kind: machine.parse_cpuinfo(KINDS[kind][0]))
        keys[kind] = (json.dumps(fingerprint(tiny_lm.model), sort_keys=True), build_key())
    assert len({k[0] for k in keys.values()}) == 3 and len({k[1] for k in keys.values()}) == 3
    monkeypatch.setattr(machine, "_cpuinfo", lambda: machine.parse_cpuinfo(KINDS["zen4"][0]))
    assert (json.dumps(fingerprint(tiny_lm.model), sort_keys=True), build_key()) == keys["zen4"]  # stable


def test_provenance_names_the_machine(tiny_lm) -> None:
    prov = tiny_lm.provenance()
    assert prov["machine"] == machine.identity()
    assert prov["model"]["device_name"] == machine.cpu_identity()["cpu_model_name"]
