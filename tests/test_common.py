"""The machinery every stage uses (common/): config loading and validation, the one CLI style, atomic writes."""

from __future__ import annotations

import os
from pathlib import Path
from dataclasses import dataclass, field
from typing import Dict, List

import fsspec
import pytest

from common.cli import main_for
from common.config import ConfigError, check, load_config
from common.files import atomic_open, atomic_path, atomic_write, sha256_file


@dataclass
class Part:
    size: int = 1  # how big
    names: List[str] = field(default_factory=list)

    def validate(self) -> None:
        check(self.size >= 1, "size", f"must be >= 1, got {self.size}")


@dataclass
class Root:
    name: str = "x"  # what it is called
    part: Part = field(default_factory=Part)
    parts: List[Part] = field(default_factory=lambda: [Part(), Part(2)])
    table: Dict[str, str] = field(default_factory=dict)

    def validate(self) -> None:
        check(self.part.size <= 10, "part.size", "must be <= 10 here")


def test_validation_names_the_full_key_of_nested_nodes_and_list_items():
    assert load_config(Root, None, ["part.size=3", "parts.1.size=5"]).parts[1].size == 5
    with pytest.raises(ConfigError, match=r"^part\.size: must be >= 1, got 0$"):
        load_config(Root, None, ["part.size=0"])
    with pytest.raises(ConfigError, match=r"^parts\.1\.size: must be >= 1"):
        load_config(Root, None, ["parts.1.size=-2"])
    with pytest.raises(ConfigError, match=r"^part\.size: must be <= 10 here"):  # the parent's own check
        load_config(Root, None, ["part.size=11"])
    with pytest.raises(ConfigError, match="nosuch"):
        load_config(Root, None, ["part.nosuch=1"])
    with pytest.raises(ConfigError, match="part.size"):
        load_config(Root, None, ["part.size=big"])


def test_text_keys_take_any_text_and_yaml11_words_stay_strings(tmp_path):
    cfg = load_config(Root, None, ['name={"a": [1, 2]}', "table.k=off"])
    assert cfg.name == '{"a": [1, 2]}' and cfg.table == {"k": "off"}
    (tmp_path / "c.yaml").write_text("name: from-file\npart: {size: 4}\n")
    cfg = load_config(Root, tmp_path / "c.yaml", ["part.names=[a,b]"])
    assert (cfg.name, cfg.part.size, cfg.part.names) == ("from-file", 4, ["a", "b"])
    (tmp_path / "bad.yaml").write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(Root, tmp_path / "bad.yaml")


class Boom(RuntimeError):
    pass


def test_cli_style_help_print_config_and_exit_codes(tmp_path, capsys):
    seen = []
    assert main_for(Root, seen.append, ["part.size=2"], prog="p") == 0 and seen[0].part.size == 2

    assert main_for(Root, seen.append, ["--help"], prog="p", doc="Does p.") == 0
    out = capsys.readouterr().out
    assert "usage: p [--config FILE.yaml]" in out and "Does p." in out
    assert "name = x" in out and "# what it is called" in out and "part.size = 1" in out and "# how big" in out
    (tmp_path / "c.yaml").write_text("part: {size: 7}\n")
    assert main_for(Root, seen.append, ["--help", "--config", str(tmp_path / "c.yaml")], prog="p") == 0
    assert "part.size = 7" in capsys.readouterr().out  # the file's values

    assert main_for(Root, seen.append, [f"--config={tmp_path / 'c.yaml'}", "--print-config", "name=zed"], prog="p") == 0
    printed = capsys.readouterr().out
    assert "name: zed" in printed and "size: 7" in printed and len(seen) == 1  # printed, not run

    assert main_for(Root, seen.append, ["part.size=0"], prog="p") == 2
    assert capsys.readouterr().err.strip() == "config error: part.size: must be >= 1, got 0"
    assert main_for(Root, seen.append, ["--sizes"], prog="p") == 2
    assert "unknown option '--sizes'" in capsys.readouterr().err

    def fails(cfg):
        raise Boom("the input is bad; fix it")

    assert main_for(Root, fails, [], prog="p", errors={Boom: 3}) == 3
    assert capsys.readouterr().err.strip() == "error: the input is bad; fix it"
    with pytest.raises(Boom):  # --debug: the traceback of an expected failure too
        main_for(Root, fails, ["--debug"], prog="p", errors={Boom: 3})
    with pytest.raises(Boom):  # an error the entry point does not expect keeps its traceback
        main_for(Root, fails, [], prog="p")


def test_atomic_writes_leave_the_old_file_on_failure_and_no_temp_files(tmp_path):
    target = tmp_path / "f.bin"
    atomic_write(target, b"one")
    with pytest.raises(RuntimeError):
        with atomic_open(target) as f:
            f.write(b"two, half written")
            raise RuntimeError("killed")
    assert target.read_bytes() == b"one"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            open(tmp, "wb").write(b"three")
            raise RuntimeError("failed after writing")
    assert target.read_bytes() == b"one" and os.listdir(tmp_path) == ["f.bin"]
    atomic_write(target, "two")
    assert target.read_bytes() == b"two" and oct(target.stat().st_mode & 0o777) == "0o644"
    assert os.listdir(tmp_path) == ["f.bin"]
    assert sha256_file(target) == sha256_file(open(target, "rb"))


def test_atomic_write_to_an_fsspec_url():
    fs = fsspec.filesystem("memory")
    atomic_write("memory://bucket/set/manifest.json", b"{}")
    assert fs.cat("/bucket/set/manifest.json") == b"{}"


def test_progress_off_a_terminal_is_a_plain_line_every_interval(caplog):
    """Not a terminal (pytest captures stderr): no carriage-return bar, one log line per interval with done/total,
    rate and ETA, and a last line at close."""
    import logging

    from common.logs import Progress

    caplog.set_level(logging.INFO)
    bar = Progress(10, "shards", "video", interval=0.0)
    for i in range(4):
        bar.update(1, note="1 rejected" if i == 3 else "")
    bar.close()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 5 and not any("\r" in ln for ln in lines)
    assert lines[0].startswith("shards: 1/10 videos (10%),") and "ETA" in lines[0]
    assert lines[-1].startswith("shards: 4/10 videos (40%)") and lines[-1].endswith(", 1 rejected")
    caplog.clear()
    quiet = Progress(10, "shards", "video", enabled=False, interval=0.0)
    quiet.update(5)
    quiet.close()
    assert not caplog.records


def test_log_file_and_console(tmp_path, capsys):
    import logging

    from common import logs

    logs.console(rank=0)
    log = logging.getLogger("tubelet.test")
    with logs.to_file(tmp_path / "run" / "train.log"):
        log.info("step 1 done")
        log.warning("a sample was skipped")
    log.info("after the run")
    out, err = capsys.readouterr()
    assert "step 1 done" in out and err.strip() == "warning: a sample was skipped"
    text = (tmp_path / "run" / "train.log").read_text()
    assert "INFO rank0 tubelet.test: step 1 done" in text and "WARNING rank0" in text and "after" not in text
    logs.console(rank=3)  # other ranks: warnings only
    log.info("not on rank 3")
    log.warning("rank 3 saw this")
    out, err = capsys.readouterr()
    assert out == "" and "rank 3 saw this" in err
    logs.console(rank=0)



def test_the_readme_module_map_names_every_product_module_and_only_modules_that_exist():
    """README's Layout table: every module it names exists, and every module of the product's stages (common,
    shards, pipeline, model, train) is named. A row's names without a folder are in the folder of the name before
    them; a folder row names its files in its description."""
    import re

    root = Path(__file__).resolve().parents[1]
    text = (root / "README.md").read_text()
    table = text[text.index("| folder / module | what |"):]
    table = table[:table.index("\n\n")]
    named, missing = set(), []
    for row in table.splitlines()[2:]:
        first, what = row.split(" | ", 1)
        folder = None
        for token in re.findall(r"`([^`]+)`", first):
            if token.endswith("/"):
                folder = token.rstrip("/")
                continue
            path = token if "/" in token else f"{folder}/{token}"
            folder = path.rsplit("/", 1)[0]
            named.add(path)
        if first.startswith("| **") and folder in ("benchmarks", "research"):  # their files, in the description
            named |= {f"{folder}/{t}" for t in re.findall(r"`([\w.]+\.(?:py|sh))`", what)}
    missing = sorted(p for p in named if not (root / p).exists())
    assert not missing, f"README names modules that do not exist: {missing}"
    product = {str(p.relative_to(root)) for stage in ("common", "shards", "pipeline", "model", "train")
               for p in (root / stage).rglob("*.py") if p.name != "__init__.py"}
    assert not product - named, f"modules missing from README's module map: {sorted(product - named)}"
