"""What a study reads from its cells: MQAR rows, scoring and accuracy against an oracle written
here; loss by position against the model's own loss on the first span; the power-law fits, their
bootstrap intervals and the crossing point against lines with known answers; ablation
differences against hand arithmetic."""

import math
import statistics

import numpy as np
import pytest
import torch

from retnet.model import RetNetConfig, RetNetLM
from retnet.study import analysis
from retnet.study.archs import RetNetLoss
from retnet.study.evaluate import HarnessView, loss_by_position
from retnet.study.grid import Recall
from retnet.study.mqar import RecallBatches, RecallLoss, accuracy, rows, scored

RECALL = Recall(seq_len=32, pairs=(2, 4, 8), vocab_size=66, test_rows=16)


def _pairs_of(row: list[int], n: int) -> dict[int, int]:
    return {row[2 * i]: row[2 * i + 1] for i in range(n)}


@pytest.mark.parametrize("n", [2, 4, 8])
def test_a_recall_row_asks_every_key_once_after_its_pairs(n):
    batch = rows(RECALL, n, 20, np.random.default_rng(n))
    assert batch.shape == (20, RECALL.seq_len + 1)
    for row in batch.tolist():
        pairs = _pairs_of(row, n)
        assert len(pairs) == n and all(1 <= k <= RECALL.keys < v < 66 for k, v in pairs.items())
        asked = [(t, row[i + 1]) for i, t in enumerate(row[2 * n:-1], 2 * n) if t in pairs]
        assert sorted(k for k, _ in asked) == sorted(pairs)  # each key asked once
        assert all(pairs[k] == v for k, v in asked)  # followed by its own value
        rest = [t for i, t in enumerate(row[2 * n:], 2 * n)]
        assert rest.count(0) == len(rest) - 2 * n  # the rest is blank


def test_only_the_values_after_a_repeated_key_are_scored():
    batch = rows(RECALL, 4, 8, np.random.default_rng(1))
    ids, targets = batch[:, :-1], batch[:, 1:]
    marked = scored(ids, targets, RECALL.keys)
    for row, mark in zip(batch.tolist(), marked.tolist()):
        pairs = _pairs_of(row, 4)
        expected = [row[p + 1] if p >= 8 and row[p] in pairs else -100 for p in range(32)]
        assert mark == expected
    # values repeat across pairs; a repeated value is not a key and is never scored
    same = torch.tensor([[5, 40, 6, 40, 0, 6, 40, 0, 5, 40, 0]])
    assert scored(same[:, :-1], same[:, 1:], 32).tolist() == [
        [-100, -100, -100, -100, -100, 40, -100, -100, 40, -100]]


class Oracle(torch.nn.Module):
    """Logits that recall perfectly: after a key seen before, the value that followed it."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(*ids.shape, self.vocab)
        for b, row in enumerate(ids.tolist()):
            first: dict[int, int] = {}
            for p, t in enumerate(row):
                if t in first and first[t] + 1 < len(row):
                    out[b, p, row[first[t] + 1]] = 1.0
                first.setdefault(t, p)
        return out


def test_accuracy_is_one_for_an_oracle_and_near_chance_for_a_constant():
    perfect = accuracy(RecallLoss(Oracle(66), RECALL.keys), RECALL, seed=0)
    assert perfect == {"2": 1.0, "4": 1.0, "8": 1.0}

    class Constant(Oracle):
        def logits(self, ids):
            out = torch.zeros(*ids.shape, self.vocab)
            out[..., RECALL.keys + 1] = 1.0  # always the first value
            return out

    blind = accuracy(RecallLoss(Constant(66), RECALL.keys), RECALL, seed=0)
    assert all(a < 0.15 for a in blind.values())  # chance: 1 in 33 values


def test_recall_batches_are_a_function_of_seed_and_step():
    batches = RecallBatches(RECALL)
    assert torch.equal(batches.batch(0, 5, 4), batches.batch(0, 5, 4))
    assert not torch.equal(batches.batch(0, 5, 4), batches.batch(0, 6, 4))
    # two ranks' rows are the halves of one global batch
    whole = batches.batch(1, 3, 4, 0, 1)
    halves = torch.cat([batches.batch(1, 3, 2, r, 2) for r in (0, 1)])
    assert halves.shape == whole.shape


def test_loss_by_position_starts_with_the_loss_the_model_trained_on():
    torch.manual_seed(0)
    model = RetNetLoss(RetNetLM(RetNetConfig(vocab_size=50, d_model=32, n_layers=2,
                                             n_heads=2))).double()
    windows = [torch.randint(0, 50, (2, 8 * 6 + 1)) for _ in range(3)]
    buckets = loss_by_position(model, windows, 8)
    # a causal model's first span sees only the first 6 tokens: its own loss on them
    first = statistics.mean(model.loss(w[:, :6], w[:, 1:7]).item() for w in windows)
    assert buckets[0] == pytest.approx(first, rel=1e-9)
    whole = statistics.mean(model.loss(w[:, :-1], w[:, 1:]).item() for w in windows)
    assert statistics.mean(buckets) == pytest.approx(whole, rel=1e-9)


def test_the_harness_view_refuses_padding():
    model = RetNetLoss(RetNetLM(RetNetConfig(vocab_size=50, d_model=32, n_layers=1)))
    view = HarnessView(model)
    ids = torch.randint(0, 50, (1, 5))
    assert torch.equal(view(ids, attention_mask=torch.ones(1, 5)).logits, model.logits(ids))
    with pytest.raises(ValueError, match="unpadded"):
        view(ids, attention_mask=torch.tensor([[0, 1, 1, 1, 1]]))


def test_a_fit_recovers_a_power_law_and_its_interval_covers_it():
    rng = np.random.default_rng(0)
    sizes = [1e5, 3e5, 1e6, 3e6]
    exact = analysis.fit({s: [(s, 9 * s ** -0.07)] * 3 for s in sizes})
    assert exact.b == pytest.approx(-0.07, abs=1e-12) and exact.at(1e6) == pytest.approx(
        9 * 1e6 ** -0.07)
    assert exact.b_low == pytest.approx(-0.07) and exact.b_high == pytest.approx(-0.07)
    noisy = analysis.fit({s: [(s, 9 * s ** -0.07 * math.exp(rng.normal(0, 0.01)))
                              for _ in range(3)] for s in sizes})
    assert noisy.b_low < -0.07 < noisy.b_high and noisy.b_high - noisy.b_low < 0.03
    assert noisy.points == 12 and noisy.sizes == 4
    assert analysis.fit({1e5: [(1e5, 3.0)]}) is None  # one size: no fit


def test_two_fits_cross_where_their_lines_meet():
    sizes = [1e5, 1e6, 1e7]
    # log L = 2 − 0.10·log N and 1.5 − 0.05·log N meet at log N = 10
    steep = analysis.fit({s: [(s, math.exp(2 - 0.10 * math.log(s)))] * 2 for s in sizes})
    flat = analysis.fit({s: [(s, math.exp(1.5 - 0.05 * math.log(s)))] * 2 for s in sizes})
    c = analysis.crossing(steep, flat)
    assert 10 ** c["log10_x"] == pytest.approx(math.exp(10)) and c["first_better_above"]
    assert 10 ** c["log10_low"] == pytest.approx(math.exp(10)) and c["share"] == 1.0
    # nearly parallel lines cross far away: in logs, no overflow
    near = analysis.fit({s: [(s, math.exp(2.5 - 0.1000001 * math.log(s)))] * 2 for s in sizes})
    far = analysis.crossing(near, steep)["log10_x"]  # log x* = 0.5 / 1e-7
    assert far == pytest.approx(5e6 / math.log(10), rel=1e-3)
    assert analysis.crossing(steep, steep) is None


def test_an_ablation_difference_and_its_standard_error():
    d = analysis.difference([4.0, 4.2, 4.1], [3.9, 3.95, 4.0])
    assert d["diff"] == pytest.approx(4.1 - 3.95)
    se = math.sqrt(statistics.variance([4.0, 4.2, 4.1]) / 3
                   + statistics.variance([3.9, 3.95, 4.0]) / 3)
    assert d["se"] == pytest.approx(se) and d["n"] == 3


def test_the_sweep_names_the_lowest_rate_and_whether_it_sits_at_an_edge():
    recs = [{"status": "done", "task": "lm", "size": "s1", "variant": "base", "seed": 0,
             "arch": a, "lr": lr, "val_loss": loss}
            for a, lr, loss in [("x", 1e-3, 4.0), ("x", 2e-3, 3.8), ("x", 4e-3, 3.9),
                                ("y", 1e-3, 4.0), ("y", 2e-3, 3.9)]]
    found = analysis.sweep(recs, "s1")
    assert found["x"]["best"] == 2e-3 and not found["x"]["edge"]
    assert found["y"]["best"] == 2e-3 and found["y"]["edge"]


def test_a_measurement_that_cannot_run_is_recorded_and_the_rest_kept():
    from retnet.study.cell import Data, _measure
    from retnet.tokenizer import ByteTokenizer

    torch.manual_seed(0)
    model = RetNetLoss(RetNetLM(RetNetConfig(vocab_size=258, d_model=32, n_layers=1)))
    out = _measure(model, Data(ByteTokenizer(), None, [], []))  # no long window to read
    assert "no window" in out["measure_errors"]["loss_by_position"]
    assert "loss_by_position" not in out and set(out["few_shot"]["python_mc"]) == {"0", "3"}


def test_the_sweep_section_shows_a_rate_checked_at_a_larger_size():
    from retnet.compare.config import VARIANTS
    from retnet.study import load
    from retnet.study.sections import sweep_section

    grid = load("cpu", tuple(VARIANTS))
    recs = [{"status": "done", "task": "lm", "size": size, "variant": "base", "seed": 0,
             "arch": "retnet", "lr": lr, "val_loss": loss}
            for size, lr, loss in [("s1", 4e-3, 3.9), ("s1", 8e-3, 3.8), ("s3", 8e-3, 2.9),
                                   ("s3", 4e-3, 2.8)]]
    text = "\n".join(sweep_section(grid, recs))
    assert "| retnet | 3.9000 | **3.8000** |" in text and "size s1" in text
    assert "- At s3, retnet (seed 0): 0.004: 2.8000, 0.008: 2.9000; lowest 0.004" in text
