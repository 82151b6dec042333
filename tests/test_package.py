"""What ships: the fms package holds the product only (benchmarks, soak and the cluster helper
live beside it, in benchmarks/ and tests/), and nothing in it installs software."""

import configparser
import os
import pkgutil
import re

import pytest
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


def test_the_distribution_has_a_name_of_its_own_and_fms_stays_the_package_and_command():
    cfg = configparser.ConfigParser()
    cfg.read(os.path.join(ROOT, "setup.cfg"))
    # `fms` on PyPI is an unrelated project, which the old hints installed.
    assert cfg["metadata"]["name"] == fms.DISTRIBUTION == "fms-store"
    scripts = cfg["options.entry_points"]["console_scripts"].split()
    assert scripts[:2] == ["fms", "="]
    assert "fms-store[postgres]" in fms.install_hint("postgres")


def test_no_message_or_page_tells_to_install_the_pypi_name_fms():
    wrong = re.compile(r"pip install[^\n]*['\" ]fms\[")
    paths = [os.path.join(ROOT, "README.md")]
    for top in ("fms", "docs", "benchmarks", "tests"):
        for folder, _dirs, files in os.walk(os.path.join(ROOT, top)):
            paths += [os.path.join(folder, n) for n in files if n.endswith((".py", ".md"))]
    for path in paths:
        with open(path, encoding="utf-8") as f:
            assert not wrong.search(f.read()), path


def test_a_missing_backend_library_names_the_distribution_and_its_extra():
    from fms.storage.engine import StoreError, _optional

    def load():
        raise ModuleNotFoundError("No module named 'psycopg'", name="psycopg")

    with pytest.raises(StoreError, match=r"pip install 'fms-store\[postgres\]'"):
        _optional("postgres", "psycopg", load)


def test_info_lines_of_the_s3_library_stay_out_of_the_log_unless_debug(capfd):
    import logging

    from fms.logutil import setup_logging

    root = logging.getLogger()
    saved = root.handlers[:], root.level
    root.handlers[:] = []
    try:
        setup_logging("INFO")
        logging.getLogger("botocore.credentials").info("Found credentials in environment")
        logging.getLogger("fms.storage").info("event=ours")
        err = capfd.readouterr().err
        assert "event=ours" in err and "Found credentials" not in err
        root.handlers[:] = []
        setup_logging("DEBUG")
        logging.getLogger("botocore.credentials").info("Found credentials in environment")
        assert "Found credentials" in capfd.readouterr().err
    finally:
        root.handlers[:], root.level = saved
        for name in ("botocore", "boto3", "s3transfer", "urllib3"):
            logging.getLogger(name).setLevel(logging.NOTSET)
