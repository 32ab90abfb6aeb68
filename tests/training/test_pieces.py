"""Optimizer steps cut into pieces (runtime/training/pieces.py, slices.py): any cut gives the
uninterrupted step bit for bit, serving between pieces sees nothing of the job, a budget of
zero pauses at every pause point, and a step abandoned mid-way lets go of everything."""
from __future__ import annotations

import pytest
import torch

from runtime.models.base import load_base
from runtime.nn.attention import AttentionBatch
from runtime.training.pieces import Abandoned, PiecewiseCall
from runtime.training.slices import ResidentRun
from tests.training.conftest import jsonl, learn_rows
from trainer import TrainConfig
from trainer.loop import Trainer, read_examples

STEPS = 3


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("rows") / "learn.jsonl"
    path.write_bytes(jsonl(learn_rows()))
    return path


@pytest.fixture
def base(chat_model_dir):
    return load_base(str(chat_model_dir), "nf4", None, "cpu")  # as quiver serve: fused, merged


def _config(data, tmp_path, **kw) -> TrainConfig:
    return TrainConfig(**{**dict(method="lora", data=str(data), output=str(tmp_path / "out"), rank=4,
                                 max_steps=STEPS, batch_size=4, lr=1e-2, progress=False, seed=0, dropout=0.1),
                          **kw})


def _params(trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.method.named_parameters()}


def _run_in_pieces(cfg, base, budget_s: float, between=None) -> tuple[ResidentRun, list[int]]:
    """STEPS optimizer steps; `between()` after every piece (a serving step). Pieces per step."""
    run = ResidentRun(cfg, base, read_examples(cfg, base))
    run.setup()
    pieces = []
    for _ in range(STEPS):
        n = 1
        while run.advance(budget_s) is None:
            n += 1
            if between is not None:
                between()
        pieces.append(n)
    return run, pieces


@pytest.mark.parametrize("method", ["lora", "dora", "prefix"])
def test_a_step_in_many_pieces_is_the_whole_step_bit_for_bit(method, data, base, tmp_path):
    cfg = _config(data, tmp_path, method=method)
    whole, whole_pieces = _run_in_pieces(cfg, base, float("inf"))
    assert whole_pieces == [1] * STEPS
    ref = _params(whole.trainer)
    whole.close()
    cut, cut_pieces = _run_in_pieces(cfg, base, 0.0)  # a pause at every pause point
    assert min(cut_pieces) > 10
    mine = _params(cut.trainer)
    assert [h[1] for h in cut.trainer.history] == [h[1] for h in whole.trainer.history]
    cut.close()
    offline = Trainer(cfg, base)  # quiver train on the same base, one thread, no pieces
    offline.setup()
    for _ in range(STEPS):
        offline.train_step()
    theirs = _params(offline)
    offline.cleanup()
    for name in ref:
        assert torch.equal(mine[name], ref[name]), name
        assert torch.equal(mine[name], theirs[name]), name


def test_serving_between_pieces_sees_nothing_of_the_job(data, base, tmp_path):
    ids = torch.tensor([5, 6, 7, 8])
    model = base.model

    def served() -> torch.Tensor:
        with torch.no_grad():
            return model(ids, torch.arange(4), AttentionBatch.without_cache([4]))

    ref, rng = served(), torch.get_rng_state()
    seen = []

    def between():
        seen.append(torch.equal(served(), ref) and torch.equal(torch.get_rng_state(), rng))

    run, pieces = _run_in_pieces(_config(data, tmp_path), base, 0.0, between)
    assert len(seen) == sum(pieces) - STEPS and all(seen)
    assert not model.training
    run.close()


def test_a_budget_of_zero_pauses_at_every_pause_point(data, base, tmp_path):
    """Forward: before each projection; backward: once each projection input's gradient is done.
    So a budget-0 step has at least as many pieces as the forward has projection calls."""
    calls = []
    handles = [lin.register_forward_pre_hook(lambda m, a: calls.append(1))
               for lin in base.model.adapted_linears().values()]
    run, pieces = _run_in_pieces(_config(data, tmp_path), base, 0.0)
    for h in handles:
        h.remove()
    assert sum(pieces) > len(calls)  # every forward call paused, and backward pauses too
    run.close()


def test_abandoning_a_step_mid_way_gives_the_model_back(data, base, tmp_path):
    linears = base.model.adapted_linears()
    before = {n: lin.lora for n, lin in linears.items()}
    run = ResidentRun(_config(data, tmp_path), base, read_examples(_config(data, tmp_path), base))
    run.setup()
    assert run.advance(0.0) is None and run.mid_step
    run.close()
    assert {n: lin.lora for n, lin in linears.items()} == before
    assert not base.model.training and not run._call._thread.is_alive()


def test_a_call_raises_on_the_engine_thread_and_the_piece_thread_goes_on():
    call = PiecewiseCall(threads=1)

    def fails():
        call.pause_point()
        raise ValueError("bad row")

    with pytest.raises(ValueError, match="bad row"):
        while not call.run(fails, 0.0)[0]:
            pass
    assert call.run(lambda: 7, 1.0) == (True, 7)
    steps = []

    def long():
        for i in range(5):
            steps.append(i)
            call.pause_point()
        return "done"

    assert call.run(long, 0.0) == (False, None) and steps == [0]
    call.abandon()
    assert not call.in_flight and steps == [0]
    assert issubclass(Abandoned, BaseException) and not issubclass(Abandoned, Exception)
    call.close()
