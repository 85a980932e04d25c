import pytest

from lorascope import LorascopeError, models


def test_killed_conversion_leaves_nothing_that_loads(tmp_path, monkeypatch):
    monkeypatch.setenv("LORASCOPE_CACHE", str(tmp_path))

    def dies_half_way(gguf_dir, gguf_file, out_dir):
        (out_dir / "config.json").write_text("{}")
        (out_dir / "model.safetensors").write_bytes(b"partial")
        raise KeyboardInterrupt  # as a kill would interrupt it

    monkeypatch.setattr(models, "convert_gguf", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        models.resolve_model("smollm2-135m")
    target = tmp_path / "models" / models.ALIASES["smollm2-135m"]["dirname"]
    assert not target.exists()
    assert not list((tmp_path / "models").iterdir())  # no temporary folder left either


def test_local_directory_and_errors(tiny_model, tmp_path):
    assert models.resolve_model(str(tiny_model)) == str(tiny_model.resolve())
    with pytest.raises(LorascopeError, match="has no config.json"):
        models.resolve_model(str(tmp_path))
    with pytest.raises(LorascopeError, match="no such directory"):
        models.resolve_model("./missing/model")


def test_pickle_weights_are_refused(tiny_model, tmp_path):
    import shutil

    d = tmp_path / "m"
    shutil.copytree(tiny_model, d)
    (d / "model.safetensors").rename(d / "pytorch_model.bin")
    with pytest.raises(LorascopeError, match="safetensors only"):
        models.load_model(str(d))


def test_fingerprint_tells_architectures_apart(tiny_model, tmp_path):
    from transformers import AutoConfig

    other = models.build_tiny_llama(tmp_path / "o", hidden=32)
    a, b = AutoConfig.from_pretrained(tiny_model), AutoConfig.from_pretrained(other)
    assert models.model_fingerprint(a) == models.model_fingerprint(AutoConfig.from_pretrained(tiny_model))
    assert models.model_fingerprint(a) != models.model_fingerprint(b)
