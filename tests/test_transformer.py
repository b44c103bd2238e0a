"""The text task, document partitions, and transformer / user-class federations on it."""
import numpy as np
import pytest
import torch
from torch import nn

from dimat.data import load_dataset, partition
from dimat.data.text import VOCAB, decode, encode
from dimat.entry import config_dir
from dimat.federation import read_metrics, simulate

TEXT = ["data=text", "data.max_docs=6", "data.stride=8", "data.context=16"]
MODEL = ["model=transformer", "model.dim=16", "model.depth=1", "model.heads=2"]
TINY = ["local_epochs=1",
        "train.batch_size=64", "merge=dimat", "train.optimizer=adam", "train.lr=0.01", "train.weight_decay=0",
        "merge.align_batches=2", "progress=false", "threads=1", "num_peers=2", "topology=fully_connected"]


def compose(*overrides: str, model=tuple(MODEL)):
    from hydra import compose as _compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(config_dir()), version_base=None):
        return _compose("config", overrides=[*TEXT, *TINY, *model, *overrides])


def test_text_windows_are_next_character_classification():
    b = load_dataset("text", max_docs=4, stride=8, context=16)
    x, y = b.train.tensors
    assert b.num_classes == len(VOCAB) == 70 and b.input_shape == (16,)
    assert x.dtype == torch.float32 and 0 <= int(x.min()) and int(x.max()) < 70
    assert len(b.groups) == len(y) and list(np.unique(b.groups)) == [0, 1, 2, 3]
    # consecutive windows of one document overlap by context - stride, and the label continues the text
    same = np.flatnonzero(b.groups[:-1] == b.groups[1:])[0]
    assert torch.equal(x[same, 8:], x[same + 1, :8])
    assert int(y[same]) == int(x[same + 1, 8])
    assert decode(encode("Hello, World\n")) == "hello, world\n"
    assert len(b.test) > 0 and b.documents[:2] == ["argparse", "base64"]


def test_document_partition_gives_whole_documents():
    b = load_dataset("text", max_docs=8, stride=16)
    parts = partition(b.train_labels, 3, scheme="document", groups=b.groups, seed=1)
    owners = [set(np.unique(b.groups[p])) for p in parts]
    assert sum(map(len, owners)) == 8 and not (owners[0] & owners[1] or owners[0] & owners[2] or owners[1] & owners[2])
    assert sorted(np.concatenate(parts).tolist()) == list(range(len(b.train_labels)))
    runs = partition(b.train_labels, 3, scheme="contiguous")
    assert [len(r) for r in runs] == [len(r) for r in np.array_split(np.arange(len(b.train_labels)), 3)]
    with pytest.raises(ValueError, match="needs groups"):
        partition(b.train_labels, 3, scheme="document")
    g1 = load_dataset("text", source="generated", seed=3)
    g2 = load_dataset("text", source="generated", seed=3)
    assert torch.equal(g1.train.tensors[0], g2.train.tensors[0])


def test_transformer_federation_on_text(tmp_path):
    summary = simulate(compose("rounds=2", "partition=iid", "partition.scheme=contiguous"), tmp_path / "run")
    recs = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert len(recs) == 4 and summary["final_mean_acc"] > 0.1  # chance is 1/70; spaces alone are about 0.15


class CharBag(nn.Module):
    """A user's model without permutation_spec(): embedding, GELU MLP over the mean of the window."""

    def __init__(self, num_classes, input_shape, dim=16):
        super().__init__()
        self.emb = nn.Embedding(num_classes, dim)
        self.fc = nn.Linear(dim * 2, 32)
        self.act = nn.GELU()
        self.out = nn.Linear(32, num_classes)

    def forward(self, x):
        e = self.emb(x.long())
        return self.out(self.act(self.fc(torch.cat([e.mean(1), e[:, -1]], dim=-1))))


def test_user_class_without_spec_runs_in_a_federation(tmp_path):
    summary = simulate(compose("rounds=1", "partition=iid",
                               model=("model=custom", "model.class=test_transformer:CharBag")), tmp_path / "run")
    assert summary["final_mean_acc"] > 1.0 / 70
    assert not hasattr(CharBag, "permutation_spec")
