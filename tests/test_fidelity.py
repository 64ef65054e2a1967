"""Every recipe against docs/fidelity.md: the page's tables are the expected values, so a recipe change that
breaks fidelity to its release fails here, and the page and the recipes cannot drift apart silently.

Each `### `recipe:variant`` section holds rows `| setting | key | value | source | note |`; a row whose key is a
config key (`optim.learning_rate`) or a derived key (`student_start()`, `sigma_range()`, `sampler()`) is checked
against the recipe's config, its value read as a Python literal. A section titled "as `base`, except" inherits
the base section's rows. Configs only: nothing is built or trained (a fraction of a second).
"""
import ast
import importlib
import os
import re

import pytest

from cmjax import methods

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(ROOT, "docs", "fidelity.md")
# Every recipe and variant of configs/ that reproduces a release (configs/digits.py is cmjax's own demo).
RECIPES = [
    "cifar10_edm", "cifar10_cd:lpips", "cifar10_cd:l2", "cifar10_ct", "cifar10_ict", "cifar10_ict:deep",
    "cifar10_ect", "cifar10_sct", "imagenet64_edm", "imagenet64_edm:trigflow",
    "imagenet64_cd:lpips", "imagenet64_cd:l2", "imagenet64_ct",
    "imagenet64_ct:init_teacher", "imagenet64_ict", "imagenet64_sct", "imagenet64_scd",
    "lsun_bedroom256_edm", "lsun_bedroom256_cd:lpips",
    "lsun_bedroom256_cd:l2", "lsun_bedroom256_ct", "lsun_bedroom256_ct:init_teacher",
    "cifar10_meanflow", "imagenet256_meanflow", "imagenet256_meanflow:b4", "imagenet256_meanflow:b2",
    "imagenet256_meanflow:m2", "imagenet256_meanflow:l2", "imagenet256_imf", "imagenet256_imf:b2",
    "imagenet256_imf:m2", "imagenet256_imf:l2", "imagenet256_sit", "imagenet256_sit:s2", "imagenet256_sit:b2",
    "imagenet256_sit:l2",
]
REQUIRED_ROWS = {
    "optimizer", "learning rate", "lr schedule", "warm-up", "batch", "steps", "EMA rates", "dropout", "σ range",
    "N schedule", "distance", "weighting", "initialisation", "x-flip", "2-step σ", "sampler", "quantisation",
    "FID protocol",
}
HEADING = re.compile(r"^###\s+`([a-z0-9_]+(?::[a-z0-9_]+)?)`(?:\s+—\s+as\s+`([a-z0-9_:]+)`, except)?\s*$")


def parse(text):
    """{recipe: {"base": name or None, "rows": [(setting, key, value text)]}} of the page's recipe sections."""
    sections, current = {}, None
    for line in text.splitlines():
        match = HEADING.match(line)
        if match:
            current = sections.setdefault(match.group(1), {"base": match.group(2), "rows": []})
            continue
        if line.startswith("## "):
            current = None
        if current is None or not line.startswith("|"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 5 or cells[0] in ("setting", "---"):
            continue
        current["rows"].append((cells[0], cells[1], cells[2]))
    return sections


SECTIONS = parse(open(DOC, encoding="utf-8").read())


def rows_of(name):
    """The section's rows after its base's (inherited, then overridden by setting and key)."""
    section = SECTIONS[name]
    rows = rows_of(section["base"]) if section["base"] else {}
    rows.update({(setting, key): value for setting, key, value in section["rows"]})
    return rows


def recipe_config(name):
    recipe, _, variant = name.partition(":")
    return importlib.import_module(f"configs.{recipe}").get_config(variant or None)


def student_start(config):
    if not methods.starts_from_teacher(config):
        return "fresh"
    return f"teacher_{config.teacher.init_online_from}"


def sigma_range(config):
    noise = methods.noise_range(config)
    return (noise["sigma_min"], noise["sigma_max"])


def sampler(config):
    s = methods.sampler_settings(config)
    return (s["parameterization"], s["sigma_min"], s["renoise"], s["clip"])


DERIVED = {"student_start()": student_start, "sigma_range()": sigma_range, "sampler()": sampler}


def value_of(config, key):
    if key in DERIVED:
        return DERIVED[key](config)
    node = config
    for part in key.split("."):
        node = node[part]
    return node


def same(actual, expected):
    """Equal, floats to 1e-9 relative (the page writes the recipes' floats in full), bools and strings exactly."""
    if isinstance(expected, tuple):
        actual = tuple(actual)
        return len(actual) == len(expected) and all(same(a, e) for a, e in zip(actual, expected))
    if isinstance(expected, bool) or expected is None or isinstance(expected, str):
        return type(actual) is type(expected) and actual == expected
    if isinstance(actual, bool) or not isinstance(actual, (int, float)):
        return False
    return actual == pytest.approx(expected, rel=1e-9, abs=0)


def test_the_page_has_a_section_for_every_recipe_and_no_other():
    assert sorted(SECTIONS) == sorted(RECIPES)
    recipe_files = {f[:-3] for f in os.listdir(os.path.join(ROOT, "configs"))
                    if f.endswith(".py") and f not in ("__init__.py", "common.py", "default.py", "digits.py")}
    assert {name.partition(":")[0] for name in RECIPES} == recipe_files


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_matches_the_fidelity_table(name):
    config = recipe_config(name)
    rows = rows_of(name)
    assert REQUIRED_ROWS <= {setting for setting, _ in rows}, sorted(REQUIRED_ROWS - {s for s, _ in rows})
    checked = 0
    for (setting, key_cell), value_cell in rows.items():
        if key_cell == "—":
            continue
        key = key_cell.strip("`")
        assert key_cell == f"`{key}`" and value_cell.startswith("`"), (name, setting, key_cell, value_cell)
        expected = ast.literal_eval(value_cell.strip("`"))
        actual = value_of(config, key)
        assert same(actual, expected), f"{name}: {setting} ({key}) is {actual!r}; docs/fidelity.md says {expected!r}"
        checked += 1
    assert checked >= len(REQUIRED_ROWS) - 4  # EDM teachers have no distance / N / 2-step σ / sampler keys


def test_a_changed_recipe_fails_the_comparison():
    """The comparison itself: a drifted value is caught, a bool is not an int, a float is compared in full."""
    config = recipe_config("cifar10_cd:lpips")
    assert same(value_of(config, "optim.warmup_steps"), 0)
    assert not same(19_531, 0)
    assert not same(0.8, 0.5853481231945422) and not same(0.58535, 0.5853481231945422)
    assert not same(1, True) and not same("lpips", "lpips_avgpool")
    assert same((0.999, 0.9999), (0.999, 0.9999)) and not same((0.999,), (0.999, 0.9999))
