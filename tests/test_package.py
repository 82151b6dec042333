"""What ships: the fms package holds the product only (benchmarks, soak and the cluster helper
live beside it, in benchmarks/ and tests/), and nothing in it installs software."""

import configparser
import os
import pkgutil

from harness import ROOT
from setuptools import find_packages

import fms


def test_the_package_ships_no_benchmark_soak_or_test_harness_and_runs_no_apt_get():
    modules = {m.name for m in pkgutil.walk_packages(fms.__path__, "fms.")}
    assert not {"fms.bench", "fms.soak", "fms.floods", "fms.harness"} & modules
    for folder, _dirs, files in os.walk(os.path.dirname(fms.__file__)):
        for name in files:
            if name.endswith(".py"):
                with open(os.path.join(folder, name), encoding="utf-8") as f:
                    assert "apt-get" not in f.read(), os.path.join(folder, name)


def test_setup_installs_fms_and_its_subpackages_only():
    cfg = configparser.ConfigParser()
    cfg.read(os.path.join(ROOT, "setup.cfg"))
    include = [s.strip() for s in cfg["options.packages.find"]["include"].split(",")]
    found = find_packages(ROOT, include=include)
    assert "fms" in found and "fms.storage.meta" in found
    assert all(name == "fms" or name.startswith("fms.") for name in found)
