"""The training module's checkpoint helpers: rebuilding a classifier, refusing what is not one."""

import lightning as L
import pytest
import torch

from csdlab.lit import ClassificationModule, load_classifier
from csdlab.lit.module import read_checkpoint

TINY = dict(num_classes=10, img_size=16, in_chans=1, pool_stages=[2, 3])


@pytest.fixture
def tiny_ckpt(tmp_path):
    torch.manual_seed(0)
    module = ClassificationModule("csdformer_tiny", TINY)
    trainer = L.Trainer(logger=False, enable_progress_bar=False, accelerator="cpu")
    trainer.strategy.connect(module)
    trainer.save_checkpoint(tmp_path / "tiny.ckpt")
    return tmp_path / "tiny.ckpt", module


def test_load_classifier_rebuilds_the_same_network(tiny_ckpt):
    path, module = tiny_ckpt
    model, hp = load_classifier(path, expected_model="csdformer_tiny")
    assert hp["model_kwargs"] == TINY and not model.training
    x = torch.randn(3, 1, 16, 16)
    torch.testing.assert_close(model(x), module.model.eval()(x), rtol=0, atol=0)


def test_checkpoint_of_another_model_is_refused(tiny_ckpt):
    with pytest.raises(ValueError, match="holds a 'csdformer_tiny' model, expected 'csdformer_4_384'"):
        load_classifier(tiny_ckpt[0], expected_model="csdformer_4_384")


def test_foreign_text_truncated_and_missing_files_are_named(tmp_path, tiny_ckpt):
    torch.save({"weights": torch.zeros(3)}, tmp_path / "foreign.pt")
    with pytest.raises(ValueError, match="foreign.pt is not a csdlab training checkpoint"):
        load_classifier(tmp_path / "foreign.pt")
    (tmp_path / "notes.txt").write_text("these are my notes, not a checkpoint\n")
    with pytest.raises(ValueError, match=r"notes.txt is not a PyTorch checkpoint \(torch.load: "):
        load_classifier(tmp_path / "notes.txt")
    data = tiny_ckpt[0].read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(data[: len(data) // 2])  # a write that stopped half-way
    with pytest.raises(ValueError, match="cut.ckpt is not a PyTorch checkpoint"):
        read_checkpoint(tmp_path / "cut.ckpt")
    with pytest.raises(FileNotFoundError, match="checkpoint .*nowhere.ckpt does not exist"):
        load_classifier(tmp_path / "nowhere.ckpt")


def test_data_with_other_class_count_is_refused():
    module = ClassificationModule("csdformer_tiny", dict(TINY, num_classes=7))
    trainer = L.Trainer(logger=False, enable_progress_bar=False, accelerator="cpu", max_epochs=1)
    from csdlab.lit import ImageDataModule

    with pytest.raises(ValueError, match=r"the data has 10 classes .* has 7; set model.model_kwargs.num_classes: 10"):
        trainer.fit(module, ImageDataModule("digits"))


def test_model_summary_counts_flops():
    module = ClassificationModule("csdformer_tiny", TINY)
    assert module.example_input_array.shape == (1, 1, 16, 16)  # so the summary's FLOPs are not "0"


def test_init_from_starts_from_the_checkpoint_weights_and_refuses_another_model(tiny_ckpt):
    path, module = tiny_ckpt
    torch.manual_seed(1)  # a fresh init would differ from the checkpoint's
    stage2 = ClassificationModule("csdformer_tiny", TINY, init_from=str(path))
    stage2.setup("fit")
    for (name, a), b in zip(stage2.model.state_dict().items(), module.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert "init_from" not in stage2.hparams  # a checkpoint of stage 2 does not depend on stage 1's file
    other = ClassificationModule("csdformer_tiny", {**TINY, "img_size": 32}, init_from=str(path))
    with pytest.raises(ValueError, match="model_kwargs"):
        other.setup("fit")
