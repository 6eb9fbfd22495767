"""Perturbation files: one schema, validated on load."""

import json

import numpy as np
import pytest

from rat_tf import data, perturbation_files

V = np.random.default_rng(0).uniform(-0.2, 0.2, (10, 28, 28, 1)).astype(np.float32)


def _raw(path, v, meta):
    np.savez(path, perturbations=v, meta=np.array(json.dumps(meta)))
    return str(path)


def test_save_writes_the_schema(tmp_path):
    x = np.random.default_rng(1).uniform(0, 1, (5, 28, 28, 1)).astype(np.float32)
    path = perturbation_files.save(str(tmp_path / "v"), V, eps=0.2, norm=np.inf, search_images=x)
    assert path.endswith("v.npz")
    v, meta = perturbation_files.load(path, image_shape=(28, 28, 1), num_classes=10)
    np.testing.assert_array_equal(v, V)
    assert meta["eps"] == 0.2 and meta["norm_type"] == "linf" and "norm" not in meta
    assert meta[perturbation_files.FINGERPRINT_KEY] == data.fingerprints(x).tolist()


@pytest.mark.parametrize("kwargs,message", [
    (dict(eps=0.1), "outside their radius eps 0.1"),
    (dict(eps=-1.0), "eps"),
    (dict(eps=0.3, norm="l1"), "norm"),
    (dict(eps=0.3, norm_type="linf"), "pass the norm as norm="),
])
def test_save_refuses_bad_settings(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        perturbation_files.save(str(tmp_path / "v.npz"), V, **kwargs)


def test_save_refuses_a_bad_shape(tmp_path):
    with pytest.raises(ValueError, match=r"\[K,H,W,C\]"):
        perturbation_files.save(str(tmp_path / "v.npz"), V[0, :, :, 0], eps=0.3)


def test_load_reads_the_older_norm_key(tmp_path):
    path = _raw(tmp_path / "v.npz", V, {"eps": 0.3, "norm": "linf"})
    _, meta = perturbation_files.load(path)
    assert meta["norm_type"] == "linf" and "norm" not in meta


@pytest.mark.parametrize("v,meta,kwargs,message", [
    (V * 10, {"eps": 0.3, "norm_type": "linf"}, {}, "outside their radius"),
    (np.full_like(V, np.nan), {}, {}, "NaN"),
    (V, {"eps": 0.3, "search_fingerprints": ["xyz"]}, {}, "16-hex-digit"),
    (V, {"eps": 0.3}, dict(image_shape=(32, 32, 3)), r"not \(32, 32, 3\)"),
    (V, {"eps": 0.3}, dict(num_classes=3), "one perturbation per class of 3"),
    (V[0, :, :, 0], {"eps": 0.3}, {}, r"\[K,H,W,C\]"),
])
def test_load_refuses(tmp_path, v, meta, kwargs, message):
    with pytest.raises(ValueError, match=message):
        perturbation_files.load(_raw(tmp_path / "v.npz", v, meta), **kwargs)


def test_load_refuses_metadata_that_is_not_json(tmp_path):
    np.savez(tmp_path / "v.npz", perturbations=V, meta=np.array("{not json"))
    with pytest.raises(ValueError, match="not JSON"):
        perturbation_files.load(str(tmp_path / "v.npz"))
