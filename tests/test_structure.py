"""The shared pieces: atomic writes, versioned documents, and options declared once."""

from __future__ import annotations

import argparse
import dataclasses
import os

import pytest

from rainforest import storage
from rainforest.cli import add_config_options, build_parser, given
from rainforest.cluster import SlurmSettings
from rainforest.config import AudioConfig, cli_fields, flag_of
from rainforest.documents import check_format
from rainforest.ec2 import EC2Settings
from rainforest.errors import DatasetFormatError, ParameterError
from rainforest.fetch import FetchConfig
from rainforest.generate import GenerationConfig
from rainforest.plan import PlanConfig
from rainforest.train import TrainConfig

CONFIGS = [AudioConfig, TrainConfig, GenerationConfig, SlurmSettings, FetchConfig,
           EC2Settings, PlanConfig]


def _leftovers(folder) -> list[str]:
    return [name for name in os.listdir(folder) if storage.TEMP_MARKER in name]


def test_staged_file_appears_whole_on_success(tmp_path):
    target = tmp_path / "out" / "a.bin"
    with storage.Staged(str(target)) as staging:
        with open(staging, "wb") as handle:
            handle.write(b"new")
        assert not target.exists(), "visible before the commit"
        assert storage.TEMP_MARKER in os.path.basename(staging)
    assert target.read_bytes() == b"new"
    assert _leftovers(target.parent) == []


@pytest.mark.parametrize("failure", [RuntimeError, KeyboardInterrupt])
def test_staged_file_keeps_the_old_content_when_writing_fails(tmp_path, failure):
    target = tmp_path / "a.bin"
    target.write_bytes(b"old")
    with pytest.raises(failure):
        with storage.Staged(str(target)) as staging:
            with open(staging, "wb") as handle:
                handle.write(b"half")
            raise failure()
    assert target.read_bytes() == b"old"
    assert _leftovers(tmp_path) == []


def test_staged_folder_replaces_the_old_folder_whole(tmp_path):
    target = tmp_path / "step-1"
    target.mkdir()
    (target / "stale.txt").write_text("from an earlier attempt")
    with storage.Staged(str(target), folder=True) as staging:
        with open(os.path.join(staging, "a.txt"), "w") as handle:
            handle.write("a")
        assert (target / "stale.txt").exists()
    assert sorted(os.listdir(target)) == ["a.txt"]
    assert _leftovers(tmp_path) == []


def test_staged_folder_is_removed_on_failure(tmp_path):
    target = tmp_path / "step-1"
    with pytest.raises(OSError):
        with storage.Staged(str(target), folder=True) as staging:
            open(os.path.join(staging, "a.txt"), "w").close()
            raise OSError("disk full")
    assert not target.exists() and _leftovers(tmp_path) == []


def test_one_format_check_names_what_is_wrong():
    good = {"format": "rainforest-x", "version": 3}
    assert check_format(good, kind="rainforest-x", version=3, where="f.json",
                        error=DatasetFormatError, advice="do y") is good
    with pytest.raises(DatasetFormatError, match=r"f.json has format version 4, .*reads "
                                                 r"version 3; do y"):
        check_format({**good, "version": 4}, kind="rainforest-x", version=3, where="f.json",
                     error=DatasetFormatError, advice="do y")
    with pytest.raises(DatasetFormatError, match=r"not a rainforest file .*found 'keras'"):
        check_format({"format": "keras"}, kind="rainforest-x", version=3, where="f.json",
                     error=DatasetFormatError, advice="")
    with pytest.raises(DatasetFormatError, match="found 'list'"):
        check_format([1], kind="rainforest-x", version=3, where="f.json",
                     error=DatasetFormatError, advice="")


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__name__)
def test_configs_round_trip_and_refuse_unknown_keys(cls):
    config = cls()
    assert cls.from_dict(config.to_dict()) == config
    with pytest.raises(ParameterError, match="does not know the key"):
        cls.from_dict({**config.to_dict(), "no_such_setting": 1})


def _parse(cls, argv):
    parser = argparse.ArgumentParser()
    add_config_options(parser, cls)
    return given(parser.parse_args(argv), cls)


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__name__)
def test_command_line_options_come_from_the_config_declarations(cls):
    assert _parse(cls, []) == {}, "an option not typed must not override anything"
    assert cls(**_parse(cls, [])) == cls()
    for field in cli_fields(cls):
        choices = field.metadata.get("choices")
        if field.metadata.get("repeat"):
            kind = field.metadata.get("type") or str
            first, second = ("a", "b") if kind is str else ("3", "4")
            assert _parse(cls, [flag_of(field), first, flag_of(field), second]) == {
                field.name: (kind(first), kind(second))}, field.name
            continue
        if (field.metadata.get("type") or type(field.default)) is bool:  # --x / --no-x
            no = "--no-" + flag_of(field)[2:]
            assert _parse(cls, [flag_of(field)]) == {field.name: True}, field.name
            assert _parse(cls, [no]) == {field.name: False}, field.name
            continue
        if choices:
            value = next(c for c in choices if c != field.default)
        elif field.metadata.get("type") is int:
            value = 3
        elif field.metadata.get("type") is float:
            value = 2.5
        elif field.default is None:
            value = "x"
        else:
            value = type(field.default)(field.default * 2 + 1)
        assert _parse(cls, [flag_of(field), str(value)]) == {field.name: value}, field.name


def test_help_shows_each_declared_default_and_choice(capsys):
    fields = [("train", TrainConfig), ("generate", GenerationConfig),
              ("preprocess", AudioConfig), ("preprocess", SlurmSettings),
              ("preprocess", EC2Settings), ("fetch", FetchConfig), ("plan", PlanConfig)]
    for command, cls in fields:
        with pytest.raises(SystemExit):
            build_parser().parse_args([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        for field in cli_fields(cls):
            assert flag_of(field) in text, (command, field.name)
            if field.default not in (None, ()):
                assert f"default: {field.default}" in text, (command, field.name)
            for choice in field.metadata.get("choices") or ():
                assert choice in text, (command, field.name, choice)


def test_docstrings_list_every_declared_setting():
    for cls in CONFIGS:
        for field in dataclasses.fields(cls):
            assert f"    {field.name}\n" in cls.__doc__, (cls.__name__, field.name)
