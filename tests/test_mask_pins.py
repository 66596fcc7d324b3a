"""A refactor changes no result: masks of every built-in recipe equal those of release 0.1.0.

The digests in ``tests/data/mask_pins.json`` were computed with release 0.1.0 by
``tests/mask_pins.py`` (see its docstring); each case here recomputes one.
"""

from __future__ import annotations

import json

import pytest

import mask_pins

PINNED = json.loads(mask_pins.PINS.read_text())


def _check(name: str, config: dict, got: dict | None = None) -> None:
    got = mask_pins.compute(config) if got is None else got
    want = PINNED[name]
    assert got["layers"] == want["layers"]
    assert got["masks"] == want["masks"], f"{name}: masks differ from release 0.1.0"
    assert got["weight_sum"] == pytest.approx(want["weight_sum"], rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("name", sorted(mask_pins._cases()))
def test_tiny_masks_equal_release_0_1_0(name):
    _check(name, mask_pins._cases()[name])


# Found when issue 24 put the slow tier into CI: these three SmolLM2 digests equal their 0.1.0 pins on
# some machines and differ on others, with the same code and the same package versions. CI showed
# both (stop 30's run differed, stop 31's matched, nothing in between touched wanda or gblm), and an
# AMD EPYC machine with AVX-512 matched them at one and at two threads on 2026-12-06. The packaged
# model is a 4-bit GGUF: its weights take 16 levels per group of 32, so |W| ties are everywhere and
# a last-bit difference in the activation norms that break them (torch picks its kernels by the
# processor's instruction set) is the suspect, not yet proven. smollm2/wanda/unstructured and every
# random:tiny pin match everywhere. On a machine where one of the three differs the case is an xfail
# that names the machine, so the log says where; where it matches it is asserted in full.
CPU_SENSITIVE = {"smollm2/gblm/2:4", "smollm2/gblm/unstructured", "smollm2/wanda/2:4"}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(mask_pins._slow_cases()))
def test_smollm2_masks_equal_release_0_1_0(name):
    config = mask_pins._slow_cases()[name]
    got = mask_pins.compute(config)
    if name in CPU_SENSITIVE and got["masks"] != PINNED[name]["masks"]:
        import platform

        import torch

        machine = platform.processor() or platform.machine()
        pytest.xfail(f"{name}: masks differ from the 0.1.0 pin on this machine ({machine}, torch CPU capability "
                     f"{torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads); "
                     "they match on others (see CPU_SENSITIVE)")
    _check(name, config, got)


@pytest.mark.parametrize("name", sorted(mask_pins._cases_0_2()))
def test_tiny_masks_equal_their_0_2_pins(name):
    """OWL, Wanda++, RO, streamed and 2-rank runs: pinned when they were added (0.2)."""
    got = mask_pins.compute(mask_pins._cases_0_2()[name])
    want = PINNED[name]
    assert got["layers"] == want["layers"]
    assert got["masks"] == want["masks"], f"{name}: masks differ from their 0.2 pin"
    # RO's RMSprop steps divide by running gradient norms and carry a CPU's last-bit differences
    # forward: llama/wanda/update-ro's weight sum differs by 2.1e-5 relative between the machine
    # that pinned it and an AMD EPYC one (same masks). Every other run is a closed-form update.
    rel = 1e-4 if mask_pins._cases_0_2()[name].get("update") == "ro" else 1e-5
    assert got["weight_sum"] == pytest.approx(want["weight_sum"], rel=rel, abs=1e-6)


@pytest.mark.parametrize("way", ["streamed", "2-ranks"])
@pytest.mark.parametrize("metric", ["wanda", "gblm"])
def test_streamed_and_2_rank_pins_are_the_in_memory_0_1_0_pins(way, metric):
    """The streamed engine and 2 ranks give the single-process in-memory masks of release 0.1.0."""
    assert PINNED[f"llama/{metric}/{way}"] == PINNED[f"llama/{metric}/unstructured"]
