"""The bundled default model: its name resolves to the package's models/ folder,
and an install without its weights says so in one line."""

import pytest
import torch

from rcc import DEFAULT_MODEL, RCCError, RCCModel, bundled
from rcc.bundled import MODELS_DIR, resolve_bundled
from rcc.checkpoint import CONFIG_NAME
from rcc.loading import load_model
from rcc.cli import main
from tests.conftest import tiny_rcc, tiny_tokenizer
from tests.cli.test_cli import DOC, assert_user_error, rcc

BUNDLED_PRESENT = (MODELS_DIR / DEFAULT_MODEL / CONFIG_NAME).is_file()


def _save_bundled(models_dir, trained: bool):
    model = tiny_rcc("llama", window=64, ratio=8)
    model.tokenizer = tiny_tokenizer()
    model.config.trained = trained
    model.save_pretrained(str(models_dir / DEFAULT_MODEL))
    return model


@pytest.fixture
def models_dir(tmp_path, monkeypatch):
    """An empty folder standing in for the package's models/ (the code under test is unchanged)."""
    monkeypatch.setattr(bundled, "MODELS_DIR", tmp_path)
    return tmp_path


def test_other_names_pass_through_unchanged(tmp_path):
    for spec in ("embedded:smollm2", f"./{DEFAULT_MODEL}", f"someone/{DEFAULT_MODEL}", str(tmp_path), "gpt2"):
        assert resolve_bundled(spec, tmp_path) == spec


def test_bundled_name_resolves_to_the_models_folder(tmp_path):
    _save_bundled(tmp_path, trained=True)
    assert resolve_bundled(DEFAULT_MODEL, tmp_path) == str(tmp_path / DEFAULT_MODEL)


@pytest.mark.parametrize("leftover", [None, ".gitkeep"])
def test_missing_weights_is_one_line_error(tmp_path, leftover):
    if leftover:  # a folder without rcc_config.json counts as missing too
        (tmp_path / DEFAULT_MODEL).mkdir()
        (tmp_path / DEFAULT_MODEL / leftover).write_text("")
    with pytest.raises(RCCError) as err:
        resolve_bundled(DEFAULT_MODEL, tmp_path)
    msg = str(err.value)
    assert "\n" not in msg
    assert "missing from this install" in msg and "--model" in msg and "embedded:smollm2" in msg


def test_load_model_and_from_pretrained_load_the_bundled_model(models_dir):
    saved = _save_bundled(models_dir, trained=True)
    for model in (load_model(DEFAULT_MODEL), RCCModel.from_pretrained(DEFAULT_MODEL)):
        assert model.config.trained
        assert model.tokenizer.get_vocab() == saved.tokenizer.get_vocab()
        assert torch.equal(model.G.weight, saved.G.weight)
        assert all(torch.equal(a.weight, b.weight) for a, b in zip(model.A, saved.A))


def test_load_model_and_from_pretrained_raise_when_weights_missing(models_dir):
    for load in (load_model, RCCModel.from_pretrained):
        with pytest.raises(RCCError, match="missing from this install"):
            load(DEFAULT_MODEL)


@pytest.mark.parametrize("trained", [True, False])
def test_cli_default_model_warns_only_when_untrained(models_dir, tmp_path, capsys, one_thread, trained):
    _save_bundled(models_dir, trained=trained)
    out = tmp_path / "doc.rcc"
    assert main(["compress", "--context", str(DOC), "-o", str(out), "--quiet"]) == 0
    assert out.is_file()
    assert ("UNTRAINED" in capsys.readouterr().err) is not trained


@pytest.mark.skipif(BUNDLED_PRESENT, reason=f"the bundled weights are installed at {MODELS_DIR / DEFAULT_MODEL}")
@pytest.mark.parametrize("command", [["ask", "--context", DOC, "-q", "Who?"], ["bench", "--lengths", "2k", "-o"],
                                     ["eval", "passkey", "--no-plot", "-o"]])
def test_cli_without_bundled_weights_exits_2_with_one_line(command, tmp_path):
    res = rcc(*command, *([tmp_path / "out.json"] if command[-1] == "-o" else []))
    assert_user_error(res, DEFAULT_MODEL, "missing from this install", "--model")
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr
