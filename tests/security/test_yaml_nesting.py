"""A YAML file nested thousands of levels deep is refused with one line naming the file, never a traceback.

The threat: whoever can hand a site or the coordinator a config file (a job spec to check or build, a
``sites.yml``, a ``NETWORK.yml``, a kit's ``local/medsilo_site.yml``) writes ``[[[[...]]]]`` or
``{a: {a: ...}}`` a few thousand levels deep. PyYAML's composer recurses once per level, so loading it
raised ``RecursionError`` with a traceback — a crash instead of the usual refusal, and in a long-running
process one that no ``MedsiloError`` handler catches.
"""

from __future__ import annotations

import re
from importlib.resources import files
from pathlib import Path

import pytest

from medsilo.cli import main
from medsilo.config import ConfigError, load_job_spec, load_site_config, load_sites_file
from medsilo.config.loading import MAX_YAML_DEPTH
from medsilo.provisioning.network import load_network

DEPTH = 5000
BLOCK_DEPTH = 1000
"""Block style indents each level, so its text grows with the square of the depth."""
DOCUMENTS = {
    "flow lists": "[" * DEPTH + "]" * DEPTH + "\n",
    "flow mappings": "{a: " * DEPTH + "1" + "}" * DEPTH + "\n",
    "block mappings": "".join(f"{' ' * i}a:\n" for i in range(BLOCK_DEPTH)) + f"{' ' * BLOCK_DEPTH}b: 1\n",
    "under a real field": "site: hospital-1\ndatasets:\n  cxr: " + "[" * DEPTH + "]" * DEPTH + "\n",
}
LOADERS = {"job spec": load_job_spec, "site config": load_site_config, "sites.yml": load_sites_file,
           "NETWORK.yml": load_network}  # fmt: skip
REFUSAL = rf"line \d+, column \d+: nested deeper than {MAX_YAML_DEPTH} levels of lists/mappings"


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize("loader", LOADERS.values(), ids=LOADERS.keys())
@pytest.mark.parametrize("document", DOCUMENTS.values(), ids=DOCUMENTS.keys())
def test_every_loader_refuses_deep_nesting_naming_the_file(tmp_path, loader, document):
    path = _write(tmp_path, "deep.yml", document)
    with pytest.raises(ConfigError, match=REFUSAL) as info:
        loader(path)
    assert info.value.file == str(path) and str(info.value).startswith(f"{path}: line ")


def test_the_refusal_points_at_the_first_collection_too_deep(tmp_path):
    path = _write(tmp_path, "deep.yml", DOCUMENTS["under a real field"])
    with pytest.raises(ConfigError) as info:
        load_site_config(path)
    # the top mapping and datasets' mapping are levels 1-2; the first '[' (column 8) is level 3
    too_deep = MAX_YAML_DEPTH + 1
    assert info.value.problems[0].startswith(f"line 3, column {8 + too_deep - 3}: ")


def test_nesting_up_to_the_limit_is_parsed_and_validated_as_usual(tmp_path):
    at_limit = _write(tmp_path, "limit.yml", "{a: " * MAX_YAML_DEPTH + "1" + "}" * MAX_YAML_DEPTH + "\n")
    with pytest.raises(ConfigError, match="a: unknown field") as info:
        load_site_config(at_limit)
    assert "nested deeper" not in str(info.value)
    over_limit = MAX_YAML_DEPTH + 1
    over = _write(tmp_path, "over.yml", "{a: " * over_limit + "1" + "}" * over_limit + "\n")
    with pytest.raises(ConfigError, match=REFUSAL):
        load_site_config(over)


def _cli(capsys, argv: list[str]) -> tuple[int, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.err


@pytest.mark.parametrize("document", DOCUMENTS.values(), ids=DOCUMENTS.keys())
def test_cli_commands_print_one_line_and_exit_2(tmp_path, capsys, document):
    deep = _write(tmp_path, "deep.yml", document)
    demo_job = Path(str(files("medsilo.jobs") / "cxr_demo.yml"))
    commands = {
        "job check": ["job", "check", str(deep)],
        "job build": ["job", "build", str(deep), "--out", str(tmp_path / "built")],
        "provision": ["provision", "--network", str(deep), "--out", str(tmp_path / "kits")],
        "sim (sites.yml)": ["sim", str(demo_job), "--data", str(deep), "--out", str(tmp_path / "run"),
                            "--quiet"],
        "pcevolve (sites.yml)": ["pcevolve", "--sites", str(deep), "--site", "hospital-1", "--epsilon", "1",
                                 "--out", str(tmp_path / "syn"), "--no-progress"],
    }  # fmt: skip
    for name, argv in commands.items():
        code, err = _cli(capsys, argv)
        assert code == 2, name
        assert re.fullmatch(rf"medsilo: error: {re.escape(str(deep))}: {REFUSAL}[^\n]*\n", err), (name, err)
    assert not any((tmp_path / out).exists() for out in ("built", "kits", "run", "syn"))  # nothing written


def test_site_check_reports_a_deep_site_config_as_a_failed_row(tmp_path, capsys):
    kit = tmp_path / "hospital-1"
    (kit / "local").mkdir(parents=True)
    config = _write(kit / "local", "medsilo_site.yml", DOCUMENTS["under a real field"])
    assert main(["site", "check", "--kit", str(kit), "--quiet"]) == 1
    out = capsys.readouterr().out
    assert re.search(rf"site config\s+FAIL\s+{re.escape(str(config))}: {REFUSAL}", out), out
    assert "Traceback" not in out and "RecursionError" not in out
