"""diffmath._io: atomic writes and safetensors files that are the same bytes in every run."""

import json

import pytest
import torch
from safetensors.torch import load_file, safe_open

from diffmath.pipeline.io import read_json, read_sidecar, safetensors_metadata, save_safetensors


def test_safetensors_bytes_are_reproducible(tmp_path):
    # The library writes header metadata from a Rust HashMap (random order per map): without
    # sorting, 30 saves of two metadata keys all agree with probability 2^-29.
    tensors = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(5, dtype=torch.float64)}
    meta = {"step": 7, "note": 'ü / "quoted"'}
    digests = {save_safetensors(tmp_path / f"{i}.safetensors", tensors, "diffmath.test/1", meta) for i in range(30)}
    blobs = {(tmp_path / f"{i}.safetensors").read_bytes() for i in range(30)}
    assert len(digests) == 1 and len(blobs) == 1


def test_safetensors_round_trip_after_canonical_header(tmp_path):
    tensors = {"a": torch.randn(3, 4), "z": torch.arange(7, dtype=torch.int64), "m": torch.zeros(0)}
    path = tmp_path / "x.safetensors"
    save_safetensors(path, tensors, "diffmath.test/1", {"k": [1, 2]})
    back = load_file(str(path))
    assert set(back) == set(tensors) and all(torch.equal(back[k], tensors[k]) for k in tensors)
    with safe_open(str(path), framework="pt") as f:
        md = f.metadata()
    assert md == {"format": "diffmath.test/1", "meta": json.dumps({"k": [1, 2]})}
    assert safetensors_metadata(path, "diffmath.test/1", "test file")["format"] == "diffmath.test/1"
    n = int.from_bytes(path.read_bytes()[:8], "little")
    assert n % 8 == 0  # the header stays padded to 8 bytes, as the format asks
    with pytest.raises(ValueError, match="lacks format='other/1'"):
        safetensors_metadata(path, "other/1", "checkpoint")


@pytest.mark.parametrize("text", ["[]", "[1]", '{"format": "other/1"}', "{not json", "3"])
def test_json_files_that_are_not_ours_name_the_file(tmp_path, text):
    # a sidecar or latent.json holding a list raised AttributeError ('list' has no 'get')
    p = tmp_path / "x.json"
    p.write_text(text)
    with pytest.raises(ValueError, match=r"x\.json.* is not a (readable )?diffmath checkpoint"):
        read_json(p, "diffmath.test/1", "checkpoint")
    with pytest.raises(ValueError, match=r"x\.json"):
        read_sidecar(p, tmp_path / "w.safetensors", "diffmath.test/1", "checkpoint")
