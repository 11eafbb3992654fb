"""Adapter folders the service would refuse are refused at the edge, in one clear line, by the
real client and the `seqr adapters put` command (nothing is sent)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from seqr_client import AdapterFolderError, InvalidArgumentError, RouterClient
from seqr_cli.main import main

from .conftest import LIB, create_library


def _pickled(world, root: Path) -> Path:
    """A real PEFT adapter saved the old way: adapter_model.bin (a torch pickle)."""
    from peft import LoraConfig, get_peft_model
    import copy
    model = get_peft_model(copy.deepcopy(world.model), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    model.save_pretrained(str(root / "pickled"), safe_serialization=False)
    assert (root / "pickled" / "adapter_model.bin").is_file()
    assert not (root / "pickled" / "adapter_model.safetensors").exists()
    return root / "pickled"


def _without(src: Path, dst: Path, drop: str) -> Path:
    shutil.copytree(src, dst)
    (dst / drop).unlink()
    return dst


@pytest.fixture
def folders(world, tmp_path):
    good = world.adapters[world.shared_names[0]]
    return {
        "pickle": (_pickled(world, tmp_path),
                   "pickles are refused (adapter_model.bin); re-save with "
                   "`save_pretrained(..., safe_serialization=True)`"),
        "no-safetensors": (_without(good, tmp_path / "no-st", "adapter_model.safetensors"),
                           "missing adapter_model.safetensors"),
        "no-config": (_without(good, tmp_path / "no-config", "adapter_config.json"),
                      "missing adapter_config.json"),
        "absent": (tmp_path / "nowhere", "no such adapter folder"),
        "a-file": (good / "adapter_model.safetensors", "not a folder"),
    }


CASES = ["pickle", "no-safetensors", "no-config", "absent", "a-file"]


@pytest.mark.parametrize("case", CASES)
def test_client_refuses_unservable_folders_before_sending(case, folders, world, start_server, tmp_path):
    path, want = folders[case]
    h = start_server(tmp_path / "d")
    with RouterClient(h.target) as c:
        create_library(c, world)
        with pytest.raises(AdapterFolderError) as ei:
            c.put_adapter(path, library=LIB)
        assert want in str(ei.value) and str(path) in str(ei.value)
        assert ei.value.field == "path" and ei.value.code == "INVALID_ARGUMENT"
        assert c.list_adapters(LIB) == []


@pytest.mark.parametrize("case", CASES)
def test_cli_refusal_is_one_line_without_traceback(case, folders, world, start_server, tmp_path, capsys):
    path, want = folders[case]
    h = start_server(tmp_path / "d")
    with RouterClient(h.target) as c:
        create_library(c, world)
    assert main(["adapters", "put", str(path), "--target", h.target, "--library", LIB]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error: INVALID_ARGUMENT: ") and want in err


def test_adapter_for_another_base_model_is_one_clear_line(world, start_server, tmp_path, capsys):
    h = start_server(tmp_path / "d")
    with RouterClient(h.target) as c:
        create_library(c, world)
        with pytest.raises(InvalidArgumentError) as ei:
            c.put_adapter(world.other_model_dir, library=LIB)
        assert "base model mismatch" in str(ei.value) and ei.value.field.startswith("adapter.")
    assert main(["adapters", "put", str(world.other_model_dir), "--target", h.target, "--library", LIB]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error: INVALID_ARGUMENT: ") and "base model mismatch" in err and "d_in=32" in err
