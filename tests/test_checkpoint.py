import os

from rpo.training import checkpoint


def make(logdir, step, resumable=True):
    path = checkpoint.begin(str(logdir), step)
    os.makedirs(os.path.join(path, "ema"))
    if resumable:
        os.makedirs(os.path.join(path, "state"))
        open(os.path.join(path, "state", "trainer.pt"), "wb").close()
    return path


def test_latest_resumable_skips_weight_only_and_temporary_folders(tmp_path):
    assert checkpoint.latest_resumable(str(tmp_path)) is None
    make(tmp_path, 4)
    checkpoint.commit(str(tmp_path), 4, keep=1)
    make(tmp_path, 8)
    checkpoint.commit(str(tmp_path), 8, keep=1)
    # ckpt-4 lost its state (keep=1) but kept its weights
    assert os.path.isdir(tmp_path / "ckpt-4" / "ema") and not (tmp_path / "ckpt-4" / "state").exists()
    assert checkpoint.latest_resumable(str(tmp_path)) == (8, str(tmp_path / "ckpt-8"))
    # a crash mid-save: the temporary folder is never picked, even if newer and complete-looking
    make(tmp_path, 12)
    assert checkpoint.latest_resumable(str(tmp_path)) == (8, str(tmp_path / "ckpt-8"))
    # a checkpoint whose state lost its marker (crash while pruning) is not resumable
    make(tmp_path, 16)
    checkpoint.commit(str(tmp_path), 16, keep=2)
    os.remove(tmp_path / "ckpt-16" / "state" / "trainer.pt")
    assert checkpoint.latest_resumable(str(tmp_path)) == (8, str(tmp_path / "ckpt-8"))
    checkpoint.clean_temporaries(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["ckpt-16", "ckpt-4", "ckpt-8"]
    assert [step for step, _ in checkpoint.list_checkpoints(str(tmp_path))] == [4, 8, 16]  # numeric, not text, order
